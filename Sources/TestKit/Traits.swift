import CCap
import CLinux
import Foundation
import Glibc
import Synchronization
import Testing

/// Host checks behind the traits, separate so that their reasons can be unit-tested.
/// Each returns nil when the requirement holds, else the reason shown for the skip.
public enum HostRequirement {
    /// Effective capabilities, not uid: `sudo` gives them, and so does a capable container
    /// where uid 0 alone would not be enough.
    public static func missingCapabilities() -> String? {
        let wanted: [(cap_value_t, String)] = [(cap_value_t(CAP_NET_ADMIN), "CAP_NET_ADMIN"), (cap_value_t(CAP_SYS_ADMIN), "CAP_SYS_ADMIN")]
        guard let caps = cap_get_proc() else {
            return "cannot read capabilities: \(SystemError.text(errno))"
        }
        defer { cap_free(UnsafeMutableRawPointer(caps)) }
        let missing = wanted.filter { cap, _ in
            var value = CAP_CLEAR
            return cap_get_flag(caps, cap, CAP_EFFECTIVE, &value) != 0 || value != CAP_SET
        }
        guard !missing.isEmpty else { return nil }
        return "needs root: missing effective \(missing.map(\.1).joined(separator: ", ")) (run with sudo)"
    }

    public static func kvmUnavailable(path: String = "/dev/kvm") -> String? {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return "\(path): \(SystemError.text(errno))" }
        closeDescriptor(fd)
        return nil
    }

    public static func binaryMissing(_ name: String) -> String? {
        VMMBinary.findExecutable(name) == nil ? "\(name) not found on PATH" : nil
    }

    public static func guestImageMissing() -> String? {
        let image = BundledGuest.image
        guard access(image, R_OK) != 0 else { return nil }
        return "guest image \(image): \(SystemError.text(errno)) (build it in assets/guest or set \(BundledGuest.environmentKey))"
    }

    /// What the namespace, TAP and pinger tests need: the capabilities, /dev/net/tun,
    /// and a kernel (or container) that lets a thread unshare its network namespace.
    /// Computed once per process: it creates a throwaway namespace.
    public static func networkNamespacesUnavailable() -> String? { networkNamespacesReason }

    private static let networkNamespacesReason: String? = {
        if let missing = missingCapabilities() { return missing }
        let tun = open("/dev/net/tun", O_RDWR | O_CLOEXEC)
        guard tun >= 0 else { return "/dev/net/tun: \(SystemError.text(errno))" }
        closeDescriptor(tun)
        // On a thread that ends right after, so that no thread of the test process stays
        // in the throwaway namespace (which the kernel then frees).
        let outcome = Mutex<String?>("unshare(CLONE_NEWNET) did not run")
        do {
            let thread = try BlockingThread(name: "tk-netns-probe") {
                let reason = cl_unshare(CL_CLONE_NEWNET) == 0 ? nil : "unshare(CLONE_NEWNET): \(SystemError.text(errno))"
                outcome.withLock { $0 = reason }
            }
            thread.join()
        } catch {
            return "\(error)"
        }
        if let reason = outcome.withLock({ $0 }) { return reason }
        if mkdir(NetworkNamespace.runDirectory, 0o755) != 0, errno != EEXIST {
            return "mkdir \(NetworkNamespace.runDirectory): \(SystemError.text(errno))"
        }
        guard access(NetworkNamespace.runDirectory, W_OK) == 0 else {
            return "\(NetworkNamespace.runDirectory): \(SystemError.text(errno))"
        }
        return nil
    }()

    /// In-kernel vhost-net: /dev/vhost-net opens read-write (`modprobe vhost_net` creates it).
    public static func vhostNetUnavailable(path: String = "/dev/vhost-net") -> String? {
        let fd = open(path, O_RDWR | O_CLOEXEC)
        guard fd >= 0 else { return "\(path): \(SystemError.text(errno)) (kernel vhost-net; try modprobe vhost_net)" }
        closeDescriptor(fd)
        return nil
    }

    public static func vmmMissing() -> String? {
        do {
            _ = try VMMBinary.resolve()
            return nil
        } catch {
            return "\(error)"
        }
    }
}

/// Strict mode: `TESTKIT_REQUIRE=kvm,netns,...` names requirements that must hold on this
/// host. A test whose listed requirement is missing then fails with the reason instead of
/// skipping, so that a CI run on a runner without /dev/kvm cannot pass by skipping
/// everything. Keys: `root`, `netns`, `kvm`, `vhost-net`, `guest`, `vmm`, and a binary's name
/// (`qemu-system-x86_64`) for `.requiresBinary`; `all` makes every requirement strict.
public enum StrictRequirements {
    public static let environmentKey = "TESTKIT_REQUIRE"

    public static func keys(environment: [String: String] = ProcessInfo.processInfo.environment) -> Set<String> {
        Set((environment[environmentKey] ?? "").split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) }.filter { !$0.isEmpty })
    }

    /// Whether a missing `key` fails the test rather than skipping it.
    public static func isStrict(_ key: String, environment: [String: String] = ProcessInfo.processInfo.environment) -> Bool {
        let keys = keys(environment: environment)
        return keys.contains(key) || keys.contains("all")
    }
}

/// A requirement listed in `TESTKIT_REQUIRE` that this host does not meet.
public struct RequirementNotMet: Error, CustomStringConvertible {
    public var key: String
    public var reason: String
    public var description: String { "\(StrictRequirements.environmentKey) lists '\(key)', but: \(reason)" }
}

extension Trait where Self == ConditionTrait {
    // Each reason is computed when the trait is built, so a skipped test shows exactly
    // what is missing on this host.

    /// CAP_NET_ADMIN and CAP_SYS_ADMIN in the effective set (namespaces, TAP, netlink).
    public static var requiresRoot: Self { condition("root", HostRequirement.missingCapabilities()) }

    /// `.requiresRoot`, plus /dev/net/tun and `unshare(CLONE_NEWNET)`: for tests that create
    /// namespaces (`NetworkNamespace`), TAPs (`TapDevice`) or ping (`Pinger`).
    public static var requiresNetworkNamespaces: Self { condition("netns", HostRequirement.networkNamespacesUnavailable()) }

    /// /dev/kvm can be opened read-write.
    public static var requiresKVM: Self { condition("kvm", HostRequirement.kvmUnavailable()) }

    /// /dev/vhost-net can be opened read-write (strict-mode key `vhost-net`).
    public static var requiresVhostNet: Self { condition("vhost-net", HostRequirement.vhostNetUnavailable()) }

    /// An executable of this name on PATH, e.g. "qemu-system-x86_64".
    public static func requiresBinary(_ name: String) -> Self { condition(name, HostRequirement.binaryMissing(name)) }

    /// `BundledGuest.image` exists and is readable.
    public static var requiresGuestImage: Self { condition("guest", HostRequirement.guestImageMissing()) }

    /// The VMM that `Machine` would launch ($TESTKIT_VMM or the bundled vmm) exists.
    public static var requiresVMM: Self { condition("vmm", HostRequirement.vmmMissing()) }

    /// Skips with `reason` when it is not nil, or fails with it when `key` is strict.
    private static func condition(_ key: String, _ reason: String?) -> Self {
        if let reason, StrictRequirements.isStrict(key) {
            // A condition that throws fails the test with the error instead of skipping it.
            return .enabled(Comment(rawValue: reason)) { throw RequirementNotMet(key: key, reason: reason) }
        }
        return .enabled(if: reason == nil, reason.map { Comment(rawValue: $0) })
    }
}
