import CCap
import Glibc
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

    public static func vmmMissing() -> String? {
        do {
            _ = try VMMBinary.resolve()
            return nil
        } catch {
            return "\(error)"
        }
    }
}

extension Trait where Self == ConditionTrait {
    // Each reason is computed when the trait is built, so a skipped test shows exactly
    // what is missing on this host.

    /// CAP_NET_ADMIN and CAP_SYS_ADMIN in the effective set (namespaces, TAP, netlink).
    public static var requiresRoot: Self { condition(HostRequirement.missingCapabilities()) }

    /// /dev/kvm can be opened read-write.
    public static var requiresKVM: Self { condition(HostRequirement.kvmUnavailable()) }

    /// An executable of this name on PATH, e.g. "qemu-system-x86_64".
    public static func requiresBinary(_ name: String) -> Self { condition(HostRequirement.binaryMissing(name)) }

    /// `BundledGuest.image` exists and is readable.
    public static var requiresGuestImage: Self { condition(HostRequirement.guestImageMissing()) }

    /// The VMM that `Machine` would launch ($TESTKIT_VMM or the bundled vmm) exists.
    public static var requiresVMM: Self { condition(HostRequirement.vmmMissing()) }

    private static func condition(_ reason: String?) -> Self {
        .enabled(if: reason == nil, reason.map { Comment(rawValue: $0) })
    }
}
