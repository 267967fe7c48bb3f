import CLinux
import Glibc
import Synchronization

/// Persistent TAP devices for a VMM to open later, as `ip tuntap add mode tap
/// multi_queue` makes them. All functions act on the network namespace of the calling
/// thread: call them inside `NetworkNamespace.run` (or use `createTap`).
public enum TapDevice {
    /// Creates TAP `name` (at most 15 bytes; a template like `tap%d` lets the kernel
    /// number it) and returns its name. `queues` queues are attached while it is set up,
    /// which proves the kernel takes that many, then all are closed: the VMM opens its
    /// own. `multiQueue` (default: `queues > 1`) must match how the VMM opens it: QEMU
    /// and the bundled vmm ask for IFF_MULTI_QUEUE only with more than one queue.
    /// `vnetHeader` only sets the initial flag; the VMM's own TUNSETIFF decides.
    @discardableResult
    public static func create(
        name: String, queues: Int = 1, multiQueue: Bool? = nil, vnetHeader: Bool = false
    ) throws(SystemError) -> String {
        let multiQueue = multiQueue ?? (queues > 1)
        let flags = Self.flags(multiQueue: multiQueue, vnetHeader: vnetHeader)
        guard name.utf8.count < Int(CL_IFNAMSIZ) else { throw SystemError("create TAP \(name)", code: ENAMETOOLONG) }
        guard queues >= 1, multiQueue || queues == 1 else {
            throw SystemError("create TAP \(name) with \(queues) queues\(multiQueue ? "" : " without IFF_MULTI_QUEUE")", code: EINVAL)
        }
        // TUNSETIFF on an existing name attaches to that device instead of failing; a
        // leftover from another test must not be silently shared.
        if !name.contains("%"), if_nametoindex(name) != 0 {
            throw SystemError("create TAP \(name)", code: EEXIST)
        }
        let attached = try TapQueues(name: name, count: queues, extraFlags: flags)
        defer { attached.close() }
        let rc = cl_tun_set_persist(attached.descriptors[0], 1)
        guard rc == 0 else { throw SystemError("TUNSETPERSIST 1 on \(attached.name)", code: -rc) }
        return attached.name
    }

    /// Removes the device (RTM_DELLINK), also while a VMM still holds queues of it.
    public static func delete(name: String) throws(NetlinkError) {
        let route = try RouteSocket()
        defer { route.close() }
        try route.deleteLink(name)
    }

    /// Attaches `count` queues to an existing TAP, the way a VMM does; the caller owns them.
    public static func openQueues(
        name: String, count: Int, multiQueue: Bool? = nil, vnetHeader: Bool = false
    ) throws(SystemError) -> TapQueues {
        try TapQueues(name: name, count: count, extraFlags: flags(multiQueue: multiQueue ?? (count > 1), vnetHeader: vnetHeader))
    }

    static func flags(multiQueue: Bool, vnetHeader: Bool) -> Int32 {
        (multiQueue ? CL_IFF_MULTI_QUEUE : 0) | (vnetHeader ? CL_IFF_VNET_HDR : 0)
    }

    /// For error messages: `IFF_TAP|IFF_NO_PI|IFF_MULTI_QUEUE`.
    static func describe(flags: Int32) -> String {
        var names = ["IFF_TAP", "IFF_NO_PI"]
        if flags & CL_IFF_MULTI_QUEUE != 0 { names.append("IFF_MULTI_QUEUE") }
        if flags & CL_IFF_VNET_HDR != 0 { names.append("IFF_VNET_HDR") }
        return names.joined(separator: "|")
    }
}

/// Open queue fds of one TAP; closes them all on `close()` or deinit.
public final class TapQueues: Sendable {
    public let name: String
    private let fds: Mutex<[Int32]>

    /// The open fds (empty after `close()`); they stay owned by this object.
    public var descriptors: [Int32] { fds.withLock { $0 } }

    init(name: String, count: Int, extraFlags: Int32) throws(SystemError) {
        var opened: [Int32] = []
        var actualName = name
        for queue in 0..<count {
            var nameOut = [CChar](repeating: 0, count: Int(CL_IFNAMSIZ))
            // The first queue may have been given a template (`tap%d`); the others attach by the real name.
            let fd = cl_tap_open_queue(actualName, extraFlags, &nameOut)
            guard fd >= 0 else {
                opened.forEach(closeDescriptor)
                throw SystemError(
                    "TUNSETIFF \(actualName) (\(TapDevice.describe(flags: extraFlags))) queue \(queue + 1) of \(count)", code: -fd)
            }
            opened.append(fd)
            actualName = String(decoding: nameOut.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        }
        self.name = actualName
        fds = Mutex(opened)
    }

    public func close() {
        fds.withLock { fds in
            fds.forEach(closeDescriptor)
            fds = []
        }
    }

    deinit { close() }
}

extension NetworkNamespace {
    /// `TapDevice.create` inside this namespace; returns the device's name.
    @discardableResult
    public func createTap(_ name: String, queues: Int = 1, multiQueue: Bool? = nil, vnetHeader: Bool = false) async throws -> String {
        try await run { try TapDevice.create(name: name, queues: queues, multiQueue: multiQueue, vnetHeader: vnetHeader) }
    }
}
