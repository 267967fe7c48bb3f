import CLinux
import Glibc

/// The in-kernel vhost-net interface (`linux/vhost.h`, `linux/vhost_types.h`): ioctl
/// numbers, the argument structs as the kernel reads them, and the seam the datapath
/// drives them through (`VhostKernelIO`: `/dev/vhost-net` here, a recording fake in tests).
public enum VhostKernel {
    // MARK: ioctl numbers

    /// `_IOC(dir, type, nr, size)` from `asm-generic/ioctl.h`: nr bits 0-7, type 8-15,
    /// size 16-29, direction 30-31 (`_IOC_WRITE` 1, `_IOC_READ` 2).
    static func ioc(_ direction: UInt, _ nr: UInt, size: Int) -> UInt {
        direction << 30 | UInt(size) << 16 | virtio << 8 | nr
    }
    static let write: UInt = 1
    static let read: UInt = 2

    /// `#define VHOST_VIRTIO 0xAF`
    static let virtio: UInt = 0xAF

    /// `#define VHOST_GET_FEATURES _IOR(VHOST_VIRTIO, 0x00, __u64)`
    public static let getFeatures = ioc(read, 0x00, size: 8)
    /// `#define VHOST_SET_FEATURES _IOW(VHOST_VIRTIO, 0x00, __u64)`
    public static let setFeatures = ioc(write, 0x00, size: 8)
    /// `#define VHOST_SET_OWNER _IO(VHOST_VIRTIO, 0x01)`
    public static let setOwner = ioc(0, 0x01, size: 0)
    /// `#define VHOST_RESET_OWNER _IO(VHOST_VIRTIO, 0x02)`
    public static let resetOwner = ioc(0, 0x02, size: 0)
    /// `#define VHOST_SET_MEM_TABLE _IOW(VHOST_VIRTIO, 0x03, struct vhost_memory)`; the size
    /// is the header's (8): the regions follow it as a flexible array.
    public static let setMemTable = ioc(write, 0x03, size: VhostMemoryTable.headerSize)
    /// `#define VHOST_SET_LOG_BASE _IOW(VHOST_VIRTIO, 0x04, __u64)`
    public static let setLogBase = ioc(write, 0x04, size: 8)
    /// `#define VHOST_SET_VRING_NUM _IOW(VHOST_VIRTIO, 0x10, struct vhost_vring_state)`
    public static let setVringNum = ioc(write, 0x10, size: VhostVringState.size)
    /// `#define VHOST_SET_VRING_ADDR _IOW(VHOST_VIRTIO, 0x11, struct vhost_vring_addr)`
    public static let setVringAddr = ioc(write, 0x11, size: VhostVringAddress.size)
    /// `#define VHOST_SET_VRING_BASE _IOW(VHOST_VIRTIO, 0x12, struct vhost_vring_state)`
    public static let setVringBase = ioc(write, 0x12, size: VhostVringState.size)
    /// `#define VHOST_GET_VRING_BASE _IOWR(VHOST_VIRTIO, 0x12, struct vhost_vring_state)`
    public static let getVringBase = ioc(read | write, 0x12, size: VhostVringState.size)
    /// `#define VHOST_SET_VRING_KICK _IOW(VHOST_VIRTIO, 0x20, struct vhost_vring_file)`
    public static let setVringKick = ioc(write, 0x20, size: VhostVringFile.size)
    /// `#define VHOST_SET_VRING_CALL _IOW(VHOST_VIRTIO, 0x21, struct vhost_vring_file)`
    public static let setVringCall = ioc(write, 0x21, size: VhostVringFile.size)
    /// `#define VHOST_SET_VRING_ERR _IOW(VHOST_VIRTIO, 0x22, struct vhost_vring_file)`
    public static let setVringErr = ioc(write, 0x22, size: VhostVringFile.size)
    /// `#define VHOST_NET_SET_BACKEND _IOW(VHOST_VIRTIO, 0x30, struct vhost_vring_file)`
    public static let netSetBackend = ioc(write, 0x30, size: VhostVringFile.size)

    // MARK: feature bits

    /// `VHOST_F_LOG_ALL` (26): log every write to guest memory in the SET_LOG_BASE bitmap.
    public static let featureLogAll: UInt64 = 1 << 26
    /// `VHOST_NET_F_VIRTIO_NET_HDR` (27): vhost adds and strips the virtio-net header
    /// itself, for a TAP without IFF_VNET_HDR.
    public static let featureVirtioNetHeader: UInt64 = 1 << 27
    /// `VIRTIO_F_VERSION_1` (32): the only ring layout this VMM drives.
    public static let featureVersion1: UInt64 = 1 << 32
    /// The guest features the kernel worker acts on (QEMU's `kernel_feature_bits`, the
    /// ones a virtio-net guest can ack): NOTIFY_ON_EMPTY 24, INDIRECT_DESC 28, EVENT_IDX 29,
    /// MRG_RXBUF 15, VERSION_1 32. Everything else the device handles itself.
    public static let guestFeatureMask: UInt64 = 1 << 24 | 1 << 28 | 1 << 29 | 1 << 15 | featureVersion1
    /// `VHOST_VRING_F_LOG` (bit 0 of `vhost_vring_addr.flags`): log used-ring writes at `log_guest_addr`.
    public static let vringFlagLog: UInt32 = 1 << 0
    /// `VHOST_FILE_UNBIND`: NET_SET_BACKEND's fd that detaches the ring from its TAP.
    public static let fileUnbind: Int32 = -1
    /// The device node QEMU opens (`tap_parse_vhost_fds`).
    public static let devicePath = "/dev/vhost-net"
}

/// Little-endian field writer for the structs below (x86-64 and arm64 are little-endian,
/// which is what the kernel reads there).
private struct FieldWriter {
    var bytes: [UInt8] = []
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func i32(_ v: Int32) { u32(UInt32(bitPattern: v)) }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
}

/// `struct vhost_vring_state { unsigned int index; unsigned int num; }` (8 bytes).
public struct VhostVringState: Sendable, Equatable {
    static let size = 8
    public var index: UInt32
    public var num: UInt32
    public init(index: UInt32, num: UInt32) {
        self.index = index
        self.num = num
    }
    public var bytes: [UInt8] {
        var w = FieldWriter()
        w.u32(index)
        w.u32(num)
        return w.bytes
    }
}

/// `struct vhost_vring_file { unsigned int index; int fd; }` (8 bytes; fd -1 unbinds).
public struct VhostVringFile: Sendable, Equatable {
    static let size = 8
    public var index: UInt32
    public var fd: Int32
    public init(index: UInt32, fd: Int32) {
        self.index = index
        self.fd = fd
    }
    public var bytes: [UInt8] {
        var w = FieldWriter()
        w.u32(index)
        w.i32(fd)
        return w.bytes
    }
}

/// `struct vhost_vring_addr { unsigned int index, flags; __u64 desc_user_addr,
/// used_user_addr, avail_user_addr, log_guest_addr; }` (40 bytes). The three ring
/// addresses are in this process (the kernel reads the rings through its mm), in the
/// header's order desc, used, avail; `log_guest_addr` is the used ring's guest-physical
/// address, where the kernel logs its used-ring writes when `flags` has VHOST_VRING_F_LOG.
public struct VhostVringAddress: Sendable, Equatable {
    static let size = 40
    public var index: UInt32
    public var flags: UInt32
    public var descriptor: UInt64
    public var used: UInt64
    public var available: UInt64
    public var log: UInt64
    public init(index: UInt32, flags: UInt32, descriptor: UInt64, used: UInt64, available: UInt64, log: UInt64) {
        self.index = index
        self.flags = flags
        self.descriptor = descriptor
        self.used = used
        self.available = available
        self.log = log
    }
    public var bytes: [UInt8] {
        var w = FieldWriter()
        w.u32(index)
        w.u32(flags)
        w.u64(descriptor)
        w.u64(used)
        w.u64(available)
        w.u64(log)
        return w.bytes
    }
}

/// `struct vhost_memory_region { __u64 guest_phys_addr, memory_size, userspace_addr,
/// flags_padding; }` (32 bytes; no flags are defined, so padding is 0).
public struct VhostMemoryRegion: Sendable, Equatable {
    static let size = 32
    public var guestAddress: UInt64
    public var size: UInt64
    public var userAddress: UInt64
    public init(guestAddress: UInt64, size: UInt64, userAddress: UInt64) {
        self.guestAddress = guestAddress
        self.size = size
        self.userAddress = userAddress
    }
}

/// `struct vhost_memory { __u32 nregions; __u32 padding; struct vhost_memory_region regions[]; }`:
/// the 8-byte header, then the regions in the same buffer.
public enum VhostMemoryTable {
    static let headerSize = 8
    public static func bytes(_ regions: [VhostMemoryRegion]) -> [UInt8] {
        var w = FieldWriter()
        w.u32(UInt32(regions.count))
        w.u32(0)
        for r in regions {
            w.u64(r.guestAddress)
            w.u64(r.size)
            w.u64(r.userAddress)
            w.u64(0)
        }
        return w.bytes
    }
}

/// One vhost ioctl and its argument. fds are lent only for the ioctl itself.
public enum VhostKernelRequest: Sendable {
    case getFeatures
    case setFeatures(UInt64)
    case setOwner
    case resetOwner
    case setMemTable([VhostMemoryRegion])
    /// The dirty log's address in this process (0 detaches it).
    case setLogBase(UInt64)
    case setVringNum(VhostVringState)
    case setVringAddr(VhostVringAddress)
    case setVringBase(VhostVringState)
    /// Stops ring `index` (once its backend is unbound) and returns its next available index.
    case getVringBase(index: UInt32)
    case setVringKick(index: UInt32, FileDescriptor)
    case setVringCall(index: UInt32, FileDescriptor)
    case setVringErr(index: UInt32, FileDescriptor)
    /// nil: VHOST_FILE_UNBIND (the worker stops using the TAP; frames stay in it).
    case netSetBackend(index: UInt32, FileDescriptor?)

    /// The header's name, for messages.
    public var name: String {
        switch self {
        case .getFeatures: "VHOST_GET_FEATURES"
        case .setFeatures: "VHOST_SET_FEATURES"
        case .setOwner: "VHOST_SET_OWNER"
        case .resetOwner: "VHOST_RESET_OWNER"
        case .setMemTable: "VHOST_SET_MEM_TABLE"
        case .setLogBase: "VHOST_SET_LOG_BASE"
        case .setVringNum: "VHOST_SET_VRING_NUM"
        case .setVringAddr: "VHOST_SET_VRING_ADDR"
        case .setVringBase: "VHOST_SET_VRING_BASE"
        case .getVringBase: "VHOST_GET_VRING_BASE"
        case .setVringKick: "VHOST_SET_VRING_KICK"
        case .setVringCall: "VHOST_SET_VRING_CALL"
        case .setVringErr: "VHOST_SET_VRING_ERR"
        case .netSetBackend: "VHOST_NET_SET_BACKEND"
        }
    }

    public var number: UInt {
        switch self {
        case .getFeatures: VhostKernel.getFeatures
        case .setFeatures: VhostKernel.setFeatures
        case .setOwner: VhostKernel.setOwner
        case .resetOwner: VhostKernel.resetOwner
        case .setMemTable: VhostKernel.setMemTable
        case .setLogBase: VhostKernel.setLogBase
        case .setVringNum: VhostKernel.setVringNum
        case .setVringAddr: VhostKernel.setVringAddr
        case .setVringBase: VhostKernel.setVringBase
        case .getVringBase: VhostKernel.getVringBase
        case .setVringKick: VhostKernel.setVringKick
        case .setVringCall: VhostKernel.setVringCall
        case .setVringErr: VhostKernel.setVringErr
        case .netSetBackend: VhostKernel.netSetBackend
        }
    }

    /// The argument buffer as the kernel reads (and for GET_* writes) it, with any fd's
    /// number lent for the duration of `body`; nil for `_IO` requests, which take none.
    public func withArgument<R>(_ body: (inout [UInt8]?) throws -> R) rethrows -> R {
        func u64(_ v: UInt64) -> [UInt8]? { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
        func file(_ index: UInt32, _ fd: FileDescriptor?) throws -> R {
            guard let fd else {
                var bytes: [UInt8]? = VhostVringFile(index: index, fd: VhostKernel.fileUnbind).bytes
                return try body(&bytes)
            }
            return try fd.withRaw { raw in
                var bytes: [UInt8]? = VhostVringFile(index: index, fd: raw).bytes
                return try body(&bytes)
            }
        }
        var bytes: [UInt8]?
        switch self {
        case .setOwner, .resetOwner: bytes = nil
        case .getFeatures: bytes = u64(0)
        case .setFeatures(let f): bytes = u64(f)
        case .setLogBase(let address): bytes = u64(address)
        case .setMemTable(let regions): bytes = VhostMemoryTable.bytes(regions)
        case .setVringNum(let s), .setVringBase(let s): bytes = s.bytes
        case .getVringBase(let index): bytes = VhostVringState(index: index, num: 0).bytes
        case .setVringAddr(let a): bytes = a.bytes
        case .setVringKick(let i, let fd), .setVringCall(let i, let fd), .setVringErr(let i, let fd): return try file(i, fd)
        case .netSetBackend(let i, let fd): return try file(i, fd)
        }
        return try body(&bytes)
    }

    /// What a GET_* request returns, read from its argument buffer after the ioctl.
    func result(from bytes: [UInt8]?) -> UInt64 {
        guard let bytes else { return 0 }
        switch self {
        case .getFeatures: return bytes.withUnsafeBytes { UInt64(littleEndian: $0.loadUnaligned(as: UInt64.self)) }
        case .getVringBase: return UInt64(bytes.withUnsafeBytes { UInt32(littleEndian: $0.loadUnaligned(fromByteOffset: 4, as: UInt32.self)) })
        default: return 0
        }
    }

    /// One line per request, fds by their labels: what the tests' recording fake keeps.
    public var summary: String {
        func fd(_ f: FileDescriptor?) -> String { f?.label ?? "-1" }
        switch self {
        case .getFeatures, .setOwner, .resetOwner: return name
        case .setFeatures(let f): return "\(name) \(hex(f))"
        case .setLogBase(let a): return "\(name) \(hex(a))"
        case .setMemTable(let regions):
            return "\(name) " + regions.map { "\(hex($0.guestAddress))+\(hex($0.size))@\(hex($0.userAddress))" }.joined(separator: " ")
        case .setVringNum(let s), .setVringBase(let s): return "\(name) \(s.index) \(s.num)"
        case .getVringBase(let index): return "\(name) \(index)"
        case .setVringAddr(let a):
            return "\(name) \(a.index) flags \(a.flags) desc \(hex(a.descriptor)) used \(hex(a.used)) avail \(hex(a.available)) log \(hex(a.log))"
        case .setVringKick(let i, let f), .setVringCall(let i, let f), .setVringErr(let i, let f): return "\(name) \(i) \(fd(f))"
        case .netSetBackend(let i, let f): return "\(name) \(i) \(fd(f))"
        }
    }
}

/// The failure of one vhost ioctl, naming the netdev, the queue pair, the request and errno.
public struct VhostKernelError: Error, CustomStringConvertible, Sendable {
    public let description: String
    public let errno: Int32?
    public init(_ description: String, errno: Int32? = nil) {
        self.description = description
        self.errno = errno
    }
}

/// One vhost-net device (a queue pair's rings 0 = RX, 1 = TX), as the datapath drives it.
/// Errors are `VhostKernelError`s naming the request and errno.
public protocol VhostKernelIO: AnyObject, Sendable {
    /// For messages: "netdev n1 vhost-net 0".
    var label: String { get }
    /// The device's fd, which a cpr-transfer hands to the next process (after RESET_OWNER).
    var fd: FileDescriptor { get }
    /// Issues `request`; GET_FEATURES returns the features, GET_VRING_BASE the index, others 0.
    @discardableResult
    func perform(_ request: VhostKernelRequest) throws -> UInt64
}

/// A `/dev/vhost-net` fd: opened here or passed in (`vhostfd=`); closed with this object.
public final class VhostNetDevice: VhostKernelIO, @unchecked Sendable {
    public let fd: FileDescriptor
    public var label: String { fd.label }

    public init(fd: FileDescriptor) { self.fd = fd }

    /// Opens the device node as QEMU does (read-write, non-blocking), close-on-exec.
    /// Throws the errno, for the caller to name the netdev.
    public static func open(label: String, path: String = VhostKernel.devicePath) throws -> VhostNetDevice {
        let raw = Glibc.open(path, O_RDWR | O_NONBLOCK | O_CLOEXEC)
        guard raw >= 0 else { throw VhostKernelError(String(cString: strerror(errno)), errno: errno) }
        return VhostNetDevice(fd: FileDescriptor(adopting: raw, label: label))
    }

    @discardableResult
    public func perform(_ request: VhostKernelRequest) throws -> UInt64 {
        try fd.withRaw { fd in
            try request.withArgument { bytes in
                let rc: Int32
                if bytes == nil {
                    rc = cl_ioctl_val(fd, request.number, 0)
                } else {
                    rc = bytes!.withUnsafeMutableBytes { cl_ioctl_ptr(fd, request.number, $0.baseAddress) }
                }
                guard rc >= 0 else {
                    let code = errno
                    throw VhostKernelError("\(request.name): \(String(cString: strerror(code)))", errno: code)
                }
                return request.result(from: bytes)
            }
        }
    }
}
