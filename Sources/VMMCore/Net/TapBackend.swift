import CLinux
import Glibc
import Synchronization

/// A TAP device's queues for one `-netdev tap`: opened here (`ifname=`, `queues=`) or
/// taken over from fds passed in (`fd=`, `fds=`). Owns and closes every queue fd.
public final class TapBackend: @unchecked Sendable {
    /// virtio 1.x net header (with num_buffers), passed through when the TAP has IFF_VNET_HDR.
    public static let vnetHeaderSize = 12

    public let id: String
    public let queueCount: Int
    /// `cpr=on`: set once, when the netdev is created (loop thread).
    public internal(set) var cpr = false

    struct Queues {
        var fds: [FileDescriptor]
        var vnetHeader: Bool
        var ifname: String
    }
    /// Fixed once opened; an `incoming-fds=on` TAP gets its queues later, from the stream.
    private let queues: Mutex<Queues>

    public var queueFDs: [FileDescriptor] { queues.withLock { $0.fds } }
    public var vnetHeader: Bool { queues.withLock { $0.vnetHeader } }
    public var ifname: String { queues.withLock { $0.ifname } }

    public struct Error: Swift.Error, CustomStringConvertible, Sendable {
        public let description: String
    }

    public init(id: String, ifname: String?, queues: Int, vnetHeader: Bool?) throws {
        guard queues >= 1 && queues <= 256 else { throw Error(description: "netdev \(id): queues=\(queues) must be 1..256") }
        var features: Int32 = 0
        let supportsVnet = cl_tap_features(&features) == 0 && features & CL_TAP_IFF_VNET_HDR != 0
        if vnetHeader == true && !supportsVnet {
            throw Error(description: "netdev \(id): vnet_hdr=on but this kernel's TAP lacks IFF_VNET_HDR")
        }
        let useVnet = vnetHeader ?? supportsVnet
        var flags = useVnet ? CL_TAP_IFF_VNET_HDR : 0
        if queues > 1 { flags |= CL_TAP_IFF_MULTI_QUEUE }
        var fds: [FileDescriptor] = []
        var name = ifname ?? ""
        for index in 0..<queues {
            var fd = Self.open(name: name, flags: flags, actualName: &name)
            if fd == -EINVAL && queues == 1 && flags & CL_TAP_IFF_MULTI_QUEUE == 0 {
                // An existing multi-queue TAP only accepts multi-queue opens.
                flags |= CL_TAP_IFF_MULTI_QUEUE
                fd = Self.open(name: name, flags: flags, actualName: &name)
            }
            guard fd >= 0 else {
                let reason = String(cString: strerror(-fd))
                var hint = ""
                if fd == -EINVAL { hint = queues > 1 ? " (does TAP '\(name)' exist without multi_queue?)" : " (flags differ from the existing TAP)" }
                if fd == -EBUSY { hint = " (ifname '\(name)' is in use by another process without multi_queue)" }
                if fd == -EPERM { hint = " (needs CAP_NET_ADMIN or a TAP owned by this user)" }
                throw Error(description: "netdev \(id): cannot open queue \(index + 1) of \(queues) of TAP '\(name.isEmpty ? "(new)" : name)': \(reason)\(hint)")
            }
            fds.append(FileDescriptor(adopting: fd, label: Self.queueLabel(id, index)))
        }
        try Self.configure(fds, vnetHeader: useVnet, id: id)
        self.id = id
        queueCount = fds.count
        self.queues = Mutex(Queues(fds: fds, vnetHeader: useVnet, ifname: name))
    }

    /// `incoming-fds=on`: a TAP client with `queues` queues and nothing open yet; the
    /// queues arrive with the migration stream (`adopt`).
    public init(id: String, incomingQueues queues: Int) {
        self.id = id
        queueCount = queues
        self.queues = Mutex(Queues(fds: [], vnetHeader: false, ifname: ""))
    }

    static func queueLabel(_ id: String, _ index: Int) -> String { "netdev \(id) TAP queue \(index)" }

    /// Takes over the queue fds a local migration passed in (closed on failure).
    public func adopt(_ fds: [FileDescriptor], vnetHeader expected: Bool) throws {
        guard fds.count == queueCount else {
            throw Error(description: "netdev \(id): the stream passed \(fds.count) TAP queue(s), queues=\(queueCount) expects \(queueCount)")
        }
        let state = try TapBackend(id: id, adopting: fds, vnetHeader: expected).queues.withLock { $0 }
        guard state.vnetHeader == expected else {
            throw Error(description: "netdev \(id): the passed TAP queues have vnet_hdr \(state.vnetHeader ? "on" : "off"), the source used \(expected ? "on" : "off")")
        }
        try queues.withLock { q in
            guard q.fds.isEmpty else { throw Error(description: "netdev \(id) already has its TAP queues") }
            q = state
        }
    }

    /// Takes ownership of already-open TAP fds (`fd=`/`fds=`, or a local migration's);
    /// on failure they are closed with it.
    public init(id: String, adopting given: [FileDescriptor], vnetHeader: Bool?) throws {
        let fds = given.enumerated().map { index, fd in fd.take(label: Self.queueLabel(id, index)) }
        var name = [CChar](repeating: 0, count: 16)
        var vnet = false
        for fd in fds {
            try fd.withRaw { fd in
                let flags = cl_tap_get_flags(fd, &name)
                guard flags >= 0 else {
                    throw Error(description: "netdev \(id): fd \(fd) is not a TAP queue: \(String(cString: strerror(-flags)))")
                }
                vnet = flags & CL_TAP_IFF_VNET_HDR != 0
                _ = cl_fcntl_int(fd, F_SETFL, cl_fcntl_int(fd, F_GETFL, 0) | O_NONBLOCK)
                _ = cl_fcntl_int(fd, F_SETFD, FD_CLOEXEC)
            }
        }
        if vnetHeader == true && !vnet { throw Error(description: "netdev \(id): vnet_hdr=on but the passed TAP fds lack IFF_VNET_HDR") }
        try Self.configure(fds, vnetHeader: vnet, id: id)
        self.id = id
        queueCount = fds.count
        queues = Mutex(Queues(fds: fds, vnetHeader: vnet, ifname: String(decoding: name.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)))
    }

    private static func open(name: String, flags: Int32, actualName: inout String) -> Int32 {
        var out = [CChar](repeating: 0, count: 16)
        let fd = name.isEmpty ? cl_tap_open_queue(nil, flags, &out) : cl_tap_open_queue(name, flags, &out)
        if fd >= 0 { actualName = String(decoding: out.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self) }
        return fd
    }

    private static func configure(_ fds: [FileDescriptor], vnetHeader: Bool, id: String) throws {
        for fd in fds { try fd.withRaw { fd in
            if vnetHeader {
                let rc = cl_tap_set_vnet_header_size(fd, Int32(vnetHeaderSize))
                guard rc == 0 else { throw Error(description: "netdev \(id): TUNSETVNETHDRSZ: \(String(cString: strerror(-rc)))") }
            }
            // No checksum or segmentation offloads: the guest negotiates none.
            _ = cl_tap_set_offload(fd, 0)
        } }
    }

    /// Lets the kernel steer packets only to the first `count` queues.
    public func attachQueues(count: Int) {
        let fds = queueFDs
        guard fds.count > 1 else { return }
        for (index, fd) in fds.enumerated() { _ = fd.withRaw { cl_tap_set_queue_attached($0, index < count ? 1 : 0) } }
    }
}
