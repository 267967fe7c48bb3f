/// vhost-user requests (qemu docs/interop/vhost-user.rst, "Front-end message types"):
/// the subset a virtio-net front-end and our backend speak.
public enum VhostUserRequest: UInt32, Sendable, CaseIterable {
    case getFeatures = 1, setFeatures, setOwner, resetOwner, setMemTable, setLogBase, setLogFD,
         setVringNum, setVringAddr, setVringBase, getVringBase, setVringKick, setVringCall, setVringErr,
         getProtocolFeatures, setProtocolFeatures, getQueueNum, setVringEnable
    case resetDevice = 34

    /// The spec's name without the VHOST_USER_ prefix, for messages.
    public var name: String {
        switch self {
        case .getFeatures: "GET_FEATURES"
        case .setFeatures: "SET_FEATURES"
        case .setOwner: "SET_OWNER"
        case .resetOwner: "RESET_OWNER"
        case .setMemTable: "SET_MEM_TABLE"
        case .setLogBase: "SET_LOG_BASE"
        case .setLogFD: "SET_LOG_FD"
        case .setVringNum: "SET_VRING_NUM"
        case .setVringAddr: "SET_VRING_ADDR"
        case .setVringBase: "SET_VRING_BASE"
        case .getVringBase: "GET_VRING_BASE"
        case .setVringKick: "SET_VRING_KICK"
        case .setVringCall: "SET_VRING_CALL"
        case .setVringErr: "SET_VRING_ERR"
        case .getProtocolFeatures: "GET_PROTOCOL_FEATURES"
        case .setProtocolFeatures: "SET_PROTOCOL_FEATURES"
        case .getQueueNum: "GET_QUEUE_NUM"
        case .setVringEnable: "SET_VRING_ENABLE"
        case .resetDevice: "RESET_DEVICE"
        }
    }
}

/// Header flags: bits 0-1 the version (always 1), REPLY on replies, NEED_REPLY when the
/// front-end wants an ack (REPLY_ACK negotiated).
public struct VhostUserFlags: OptionSet, Sendable, Equatable {
    public let rawValue: UInt32
    public init(rawValue: UInt32) { self.rawValue = rawValue }
    public static let version1 = VhostUserFlags(rawValue: 1)
    public static let reply = VhostUserFlags(rawValue: 1 << 2)
    public static let needReply = VhostUserFlags(rawValue: 1 << 3)
    static let versionMask: UInt32 = 3
}

/// Feature bits the protocol itself defines (in GET/SET_FEATURES beside the device's).
public enum VhostUserFeature {
    public static let protocolFeatures: UInt64 = 1 << 30
    public static let logAll: UInt64 = 1 << 26
}

/// VHOST_USER_PROTOCOL_F_* bits (GET/SET_PROTOCOL_FEATURES).
public enum VhostUserProtocolFeature {
    public static let mq: UInt64 = 1 << 0
    public static let logSHMFD: UInt64 = 1 << 1
    public static let replyAck: UInt64 = 1 << 3
    public static let resetDevice: UInt64 = 1 << 13
}

/// One SET_MEM_TABLE region: guest physical range, the front-end's virtual address of it
/// (ring addresses come in that space), and where it starts in the fd sent with it.
public struct VhostUserMemoryRegion: Sendable, Equatable {
    public var guestAddress: UInt64
    public var size: UInt64
    public var userAddress: UInt64
    public var mmapOffset: UInt64
    public init(guestAddress: UInt64, size: UInt64, userAddress: UInt64, mmapOffset: UInt64) {
        (self.guestAddress, self.size, self.userAddress, self.mmapOffset) = (guestAddress, size, userAddress, mmapOffset)
    }
}

/// `struct vhost_vring_state`: ring index and a number (size, base, enable).
public struct VhostUserVringState: Sendable, Equatable {
    public var index: UInt32
    public var num: UInt32
    public init(index: UInt32, num: UInt32) { (self.index, self.num) = (index, num) }
}

/// `struct vhost_vring_addr`: the rings in the front-end's address space.
public struct VhostUserVringAddress: Sendable, Equatable {
    /// flags bit 0: log writes to the used ring at `log` (a guest physical address).
    public static let logUsed: UInt32 = 1
    public var index: UInt32
    public var flags: UInt32
    public var descriptor: UInt64
    public var used: UInt64
    public var available: UInt64
    public var log: UInt64
    public init(index: UInt32, flags: UInt32 = 0, descriptor: UInt64, used: UInt64, available: UInt64, log: UInt64 = 0) {
        (self.index, self.flags, self.descriptor, self.used, self.available, self.log) = (index, flags, descriptor, used, available, log)
    }
}

/// SET_VRING_KICK/CALL/ERR's u64: bits 0-7 the ring, bit 8 "no fd" (polling / no notification).
public struct VhostUserVringFile: Sendable, Equatable {
    public static let noFDBit: UInt64 = 1 << 8
    public var index: UInt8
    public var hasFD: Bool
    public init(index: UInt8, hasFD: Bool) { (self.index, self.hasFD) = (index, hasFD) }
}

/// A message's typed payload. fds travel beside it (`VhostUserReceived.fds`, or the
/// sender's list), in the order the payload names them.
public enum VhostUserMessage: Sendable, Equatable {
    case getFeatures
    case setFeatures(UInt64)
    case setOwner
    case resetOwner
    case setMemTable([VhostUserMemoryRegion])
    case setLogBase(size: UInt64, offset: UInt64)
    case setLogFD
    case setVringNum(VhostUserVringState)
    case setVringAddr(VhostUserVringAddress)
    case setVringBase(VhostUserVringState)
    case getVringBase(VhostUserVringState)
    case setVringKick(VhostUserVringFile)
    case setVringCall(VhostUserVringFile)
    case setVringErr(VhostUserVringFile)
    case getProtocolFeatures
    case setProtocolFeatures(UInt64)
    case getQueueNum
    case setVringEnable(VhostUserVringState)
    case resetDevice
    /// A reply carrying a u64: GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, SET_LOG_BASE,
    /// and the REPLY_ACK ack of any other request (0 = success).
    case reply(VhostUserRequest, UInt64)
    /// GET_VRING_BASE's reply: the ring and its next available index.
    case vringBaseReply(VhostUserVringState)

    public var request: VhostUserRequest {
        switch self {
        case .getFeatures: .getFeatures
        case .setFeatures: .setFeatures
        case .setOwner: .setOwner
        case .resetOwner: .resetOwner
        case .setMemTable: .setMemTable
        case .setLogBase: .setLogBase
        case .setLogFD: .setLogFD
        case .setVringNum: .setVringNum
        case .setVringAddr: .setVringAddr
        case .setVringBase: .setVringBase
        case .getVringBase, .vringBaseReply: .getVringBase
        case .setVringKick: .setVringKick
        case .setVringCall: .setVringCall
        case .setVringErr: .setVringErr
        case .getProtocolFeatures: .getProtocolFeatures
        case .setProtocolFeatures: .setProtocolFeatures
        case .getQueueNum: .getQueueNum
        case .setVringEnable: .setVringEnable
        case .resetDevice: .resetDevice
        case .reply(let r, _): r
        }
    }

    public var isReply: Bool {
        switch self {
        case .reply, .vringBaseReply: true
        default: false
        }
    }

    /// fds that must accompany the message.
    public var fdCount: Int {
        switch self {
        case .setMemTable(let regions): regions.count
        case .setLogBase, .setLogFD: 1
        case .setVringKick(let f), .setVringCall(let f), .setVringErr(let f): f.hasFD ? 1 : 0
        default: 0
        }
    }
}
