/// cpr-transfer's state, the one section (kind 7) on the cpr channel: what the target
/// needs before it builds its devices. The fds travel with the section under their
/// stream-wide names: `machine/ram` (the RAM memfd or `share=on` file), and per `cpr=on`
/// netdev `netdev/<id>/tap.<i>` (plus what a datapath's `prepareForHandover` adds, e.g.
/// `netdev/<id>/vhost.<i>`). Versioned like a device state, so a newer target reads the
/// state an older source sends.
public struct CPRState: VersionedState {
    public static let version: UInt16 = 1

    public enum RAMKind: UInt8, Sendable {
        case memfd = 1
        case file = 2
    }

    /// A netdev whose host fds the cpr state carries (`cpr=on` at the source).
    public struct Netdev: Sendable, Equatable {
        /// What the target's netdev of the same id is built from: TAP queues (vhost kind
        /// none or kernel), or a vhost-user backend connection (vhost kind user; `queues`
        /// counts queue pairs, no TAP fds).
        public static let kindTap: UInt8 = 1
        public static let kindVhostUser: UInt8 = 2
        public var id: String
        public var kind: UInt8
        public var queues: UInt16
        public var vnetHeader: Bool
        /// The source's TAP name, to check the target's `ifname=` against.
        public var ifname: String
        /// Which vhost devices travel beside the TAP queues.
        public var vhostKind: VhostKind

        public init(id: String, kind: UInt8 = kindTap, queues: UInt16, vnetHeader: Bool, ifname: String, vhostKind: VhostKind = .none) {
            self.id = id
            self.kind = kind
            self.queues = queues
            self.vnetHeader = vnetHeader
            self.ifname = ifname
            self.vhostKind = vhostKind
        }

        public func tapFDName(queue: Int) -> String { NamedFD.tapQueueName(netdev: id, queue: queue) }
        /// Kernel vhost: pair `pair`'s `/dev/vhost-net` fd, released (RESET_OWNER) by the source.
        public func vhostFDName(pair: Int) -> String { NamedFD.vhostDeviceName(netdev: id, pair: pair) }

        /// Source side: the entry for `cpr=on` netdev `backend` and its TAP queues under their
        /// names (the datapath's `prepareForHandover` adds what else travels, e.g. the vhost
        /// fds); nil when the netdev does not take part.
        static func handover(of backend: any NetBackend) -> (Netdev, [NamedFD])? {
            guard backend.cpr else { return nil }
            if backend.cprVhostKind == .user {
                return (Netdev(id: backend.id, kind: kindVhostUser, queues: UInt16(backend.queueCount), vnetHeader: true,
                               ifname: backend.ifname, vhostKind: .user), [])
            }
            guard !backend.queueFDs.isEmpty else { return nil }
            let entry = Netdev(id: backend.id, queues: UInt16(backend.queueFDs.count), vnetHeader: backend.vnetHeader,
                               ifname: backend.ifname, vhostKind: backend.cprVhostKind)
            return (entry, backend.queueFDs.enumerated().map { NamedFD(name: entry.tapFDName(queue: $0), fd: $1) })
        }
    }

    /// What runs a `cpr=on` TAP's rings, so the target's netdev can check it agrees (its fds
    /// are named for it). The format's byte.
    public enum VhostKind: UInt8, Sendable {
        /// The userspace datapath: the TAP queues are all there is.
        case none = 0
        /// `vhost=on`: one `/dev/vhost-net` fd per queue pair, `netdev/<id>/vhost.<pair>`.
        case kernel = 1
        /// `-netdev vhost-user` (netdev kind 2): the backend connection, `netdev/<id>/vhost-user`.
        case user = 2
    }

    public var ramKind: RAMKind
    public var ramSize: UInt64
    public var netdevs: [Netdev]

    public init(ramKind: RAMKind, ramSize: UInt64, netdevs: [Netdev]) {
        self.ramKind = ramKind
        self.ramSize = ramSize
        self.netdevs = netdevs
    }

    /// The stream-wide name of the RAM fd (the same as local migration's memfd).
    public static let ramFDName = "machine/ram"

    public func encode(into w: inout StreamWriter) {
        w.u8(ramKind.rawValue)
        w.u64(ramSize)
        w.u16(UInt16(netdevs.count))
        for netdev in netdevs {
            w.string(netdev.id)
            w.u8(netdev.kind)
            w.u16(netdev.queues)
            w.bool(netdev.vnetHeader)
            w.string(netdev.ifname)
            w.u8(netdev.vhostKind.rawValue)
        }
    }

    public init(decoding r: inout StreamReader, version: UInt16) throws {
        let kind = try r.u8("RAM kind")
        guard let ramKind = RAMKind(rawValue: kind) else { throw StreamError("cpr state: RAM kind \(kind) is not known to this build") }
        self.ramKind = ramKind
        ramSize = try r.u64("RAM size")
        let count = Int(try r.u16("netdev count"))
        var netdevs: [Netdev] = []
        for _ in 0..<count {
            let id = try r.string("netdev id")
            let kind = try r.u8("netdev '\(id)' kind")
            guard kind == Netdev.kindTap || kind == Netdev.kindVhostUser else {
                throw StreamError("cpr state: netdev '\(id)' is of kind \(kind), unknown to this build")
            }
            let queues = try r.u16("netdev '\(id)' queues")
            guard (1...256).contains(queues) else { throw StreamError("cpr state: netdev '\(id)' has \(queues) queues, outside 1...256") }
            guard !netdevs.contains(where: { $0.id == id }) else { throw StreamError("cpr state: netdev '\(id)' listed twice") }
            let vnetHeader = try r.bool("netdev '\(id)' vnet header")
            let ifname = try r.string("netdev '\(id)' ifname")
            let vhost = try r.u8("netdev '\(id)' vhost kind")
            guard let vhostKind = VhostKind(rawValue: vhost) else {
                throw StreamError("cpr state: netdev '\(id)' has vhost kind \(vhost), unknown to this build")
            }
            guard (kind == Netdev.kindVhostUser) == (vhostKind == .user) else {
                throw StreamError("cpr state: netdev '\(id)' of kind \(kind) cannot have vhost kind \(vhost)")
            }
            netdevs.append(Netdev(id: id, kind: kind, queues: queues, vnetHeader: vnetHeader, ifname: ifname, vhostKind: vhostKind))
        }
        self.netdevs = netdevs
    }

    public func netdev(_ id: String) -> Netdev? { netdevs.first { $0.id == id } }

    /// Target side: the RAM fd replaces this machine's RAM mapping in place (same host
    /// address, so KVM's slots stay), or the error says why it cannot.
    func adoptRAM(into memory: GuestMemory, fds: ReceivedFDs) throws {
        let fd = try fds.claim(Self.ramFDName, by: "the cpr state's RAM")
        guard ramSize == memory.size else {
            throw StreamError("cpr state: the source's RAM is \(ramSize) bytes, this machine's \(memory.size); give the target the same -m or memory backend size")
        }
        let backing: MemoryBacking
        switch ramKind {
        case .memfd: backing = .memfd
        case .file:
            // The source's file, shared: the target now maps that one.
            if case .file = memory.backing { backing = memory.backing } else { backing = .memfd }
        }
        try memory.adopt(sharedFD: fd, backing: backing)
    }
}

extension NamedFD {
    /// A TAP queue's stream-wide name, by the source's netdev id.
    public static func tapQueueName(netdev: String, queue: Int) -> String { "netdev/\(netdev)/tap.\(queue)" }
    /// A kernel vhost device's stream-wide name (cpr-transfer), by netdev id and queue pair.
    public static func vhostDeviceName(netdev: String, pair: Int) -> String { "netdev/\(netdev)/vhost.\(pair)" }
    /// A vhost-user netdev's backend connection (local migration, descriptor kind 2; cpr-transfer).
    public static func vhostUserConnectionName(netdev: String) -> String { "netdev/\(netdev)/vhost-user" }
}
