import Glibc
import Synchronization

/// `-netdev vhost-user,id=ID,chardev=CHARDEV,queues=N`: a connection to a vhost-user
/// backend (e.g. the bundled `vhost-user-net`), set up as QEMU does at connect:
/// GET_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, LOG_SHMFD), GET_QUEUE_NUM,
/// SET_OWNER. The rings then run in the backend; the VMM only relays kicks and watches
/// calls. With `incoming-fds=on` (no chardev) the connection comes from a local
/// migration's source instead.
public final class VhostUserNetdev: NetBackend, @unchecked Sendable {
    public let id: String
    public let ifname: String
    public let queueCount: Int
    public var queueFDs: [FileDescriptor] { [] }
    public var vnetHeader: Bool { true }
    public func attachQueues(count: Int) {}

    /// What the connection negotiated (QEMU's connect-time exchange).
    struct Negotiated: Sendable {
        var backendFeatures: UInt64
        var replyAck: Bool
        /// LOG_SHMFD negotiated and LOG_ALL offered: the backend can log its writes for pre-copy.
        var logs: Bool
    }
    /// The connection and what was negotiated on it. Both nil while an `incoming-fds=on`
    /// netdev waits for a local migration's connection; `negotiated` stays nil after the
    /// handover until the first exchange (see `adoptIncoming`).
    private struct Link {
        var connection: VhostUserConnection?
        var negotiated: Negotiated?
    }
    /// One request and its reply at a time (vCPU thread at DRIVER_OK, QMP's thread for a reset).
    private let link: Mutex<Link>
    let replyTimeout: Duration

    /// `replyTimeout`: how long any answer may take. A backend that serves one front-end
    /// at a time leaves a second one's connection in its listen queue, unanswered: that
    /// is an error at startup, not a hang.
    public init(id: String, socketPath: String, queues: Int, replyTimeout: Duration = .seconds(5)) throws {
        self.id = id
        ifname = "vhost-user:\(socketPath)"
        queueCount = queues
        self.replyTimeout = replyTimeout
        let socket: Int32
        do { socket = try UnixSocket.connect(path: socketPath) } catch {
            throw VhostUserError("netdev \(id): cannot connect to the vhost-user backend: \(error)")
        }
        let connection = Self.connection(FileDescriptor(adopting: socket, label: "netdev \(id) vhost-user socket"), replyTimeout: replyTimeout)
        let negotiated = try Self.negotiate(connection, id: id, queues: queues, backend: "at \(socketPath)", replyTimeout: replyTimeout, takeOwnership: true)
        link = Mutex(Link(connection: connection, negotiated: negotiated))
    }

    /// `-netdev vhost-user,id=ID,queues=N,incoming-fds=on`: no connection of its own; a local
    /// migration hands the source's over (`adoptIncoming`).
    public init(id: String, incomingQueues queues: Int, replyTimeout: Duration = .seconds(5)) {
        self.id = id
        ifname = "vhost-user:(from the migration source)"
        queueCount = queues
        self.replyTimeout = replyTimeout
        link = Mutex(Link())
    }

    /// Answers must come within `replyTimeout` (SO_RCVTIMEO).
    private static func connection(_ socket: FileDescriptor, replyTimeout: Duration) -> VhostUserConnection {
        let connection = VhostUserConnection(socket: socket)
        let (seconds, attoseconds) = replyTimeout.components
        var timeout = timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
        _ = connection.socket.withRaw { setsockopt($0, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size)) }
        return connection
    }

    /// QEMU's connect-time exchange: GET_FEATURES (PROTOCOL_FEATURES required),
    /// GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK, LOG_SHMFD when offered), GET_QUEUE_NUM
    /// for several queues, and SET_OWNER unless the connection is owned already (handed
    /// over by a migration source).
    private static func negotiate(_ connection: VhostUserConnection, id: String, queues: Int, backend: String,
                                  replyTimeout: Duration, takeOwnership: Bool) throws -> Negotiated {
        func get(_ m: VhostUserMessage) throws -> UInt64 {
            try connection.send(m)
            let reply: VhostUserMessage?
            do {
                reply = try connection.receive()?.message
            } catch let error as SystemError where error.errno == EAGAIN {
                throw VhostUserError("netdev \(id): the vhost-user backend \(backend) did not answer \(m.request.name) within \(replyTimeout) (is it serving another front-end?)")
            }
            guard case .reply(m.request, let value)? = reply else {
                throw VhostUserError("netdev \(id): the vhost-user backend did not answer \(m.request.name)")
            }
            return value
        }
        let backendFeatures = try get(.getFeatures)
        guard backendFeatures & VhostUserFeature.protocolFeatures != 0 else {
            throw VhostUserError("netdev \(id): the vhost-user backend lacks PROTOCOL_FEATURES (features \(hex(backendFeatures)))")
        }
        let protocolFeatures = try get(.getProtocolFeatures)
        let wanted = protocolFeatures & (VhostUserProtocolFeature.mq | VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.logSHMFD)
        try connection.send(.setProtocolFeatures(wanted))
        let negotiated = Negotiated(
            backendFeatures: backendFeatures, replyAck: wanted & VhostUserProtocolFeature.replyAck != 0,
            logs: wanted & VhostUserProtocolFeature.logSHMFD != 0 && backendFeatures & VhostUserFeature.logAll != 0)
        if queues > 1 {
            guard wanted & VhostUserProtocolFeature.mq != 0 else {
                throw VhostUserError("netdev \(id): queues=\(queues) but the vhost-user backend lacks the MQ protocol feature")
            }
            let served = try get(.getQueueNum)
            guard served >= UInt64(queues) else {
                throw VhostUserError("netdev \(id): queues=\(queues) but the vhost-user backend serves \(served) queue pair\(served == 1 ? "" : "s")")
            }
        }
        if takeOwnership { try send(.setOwner, on: connection, id: id, replyAck: negotiated.replyAck) }
        return negotiated
    }

    /// Sends a request without a reply of its own; with REPLY_ACK waits for its ack and
    /// throws when the backend refused it.
    private static func send(_ message: VhostUserMessage, on connection: VhostUserConnection, id: String, replyAck: Bool,
                             fds: [FileDescriptor] = []) throws {
        try connection.send(message, flags: replyAck ? .needReply : [], fds: fds)
        guard replyAck else { return }
        guard case .reply(message.request, let status)? = try connection.receive()?.message else {
            throw VhostUserError("netdev \(id): no ack from the vhost-user backend for \(message.request.name)")
        }
        guard status == 0 else { throw VhostUserError("netdev \(id): the vhost-user backend refused \(message.request.name)") }
    }

    /// Runs one exchange with the backend. An adopted connection is negotiated first, here:
    /// the target speaks to the backend only once it runs, after the source stopped for good.
    private func exchange<R>(_ body: (VhostUserConnection, Negotiated) throws -> R) throws -> R {
        try link.withLock { link in
            guard let connection = link.connection else {
                throw VhostUserError("netdev \(id): no vhost-user connection (incoming-fds=on, and no migration handed one over)")
            }
            if link.negotiated == nil {
                link.negotiated = try Self.negotiate(connection, id: id, queues: queueCount, backend: "handed over by the migration source",
                                                     replyTimeout: replyTimeout, takeOwnership: false)
            }
            return try body(connection, link.negotiated!)
        }
    }

    /// What the connection negotiated (negotiating an adopted one first).
    var negotiated: Negotiated { get throws { try exchange { $1 } } }

    /// The connection's socket (tests close it to end the backend's session).
    var connection: VhostUserConnection? { link.withLock { $0.connection } }

    func request(_ message: VhostUserMessage, fds: [FileDescriptor] = []) throws {
        try exchange { connection, negotiated in
            try Self.send(message, on: connection, id: id, replyAck: negotiated.replyAck, fds: fds)
        }
    }

    /// SET_LOG_BASE with the log's memfd (LOG_SHMFD); the backend always answers it.
    func setLogBase(_ log: VhostDirtyLog) throws {
        try exchange { connection, _ in
            try connection.send(.setLogBase(size: log.size, offset: 0), fds: log.fd.map { [$0] } ?? [])
            guard case .reply(.setLogBase, _)? = try connection.receive()?.message else {
                throw VhostUserError("netdev \(id): no SET_LOG_BASE reply from the vhost-user backend")
            }
        }
    }

    /// GET_VRING_BASE for each ring: stops them in the backend; their next available
    /// indices. All requests go out before the first reply is read (the backend answers
    /// in order), so a pause costs about one round trip, not one per ring: it is part of
    /// a migration's downtime.
    func stopRings(_ indices: [Int]) throws -> [Int: UInt16] {
        try exchange { connection, _ in
            for index in indices { try connection.send(.getVringBase(VhostUserVringState(index: UInt32(index), num: 0))) }
            var bases: [Int: UInt16] = [:]
            for index in indices {
                guard case .vringBaseReply(let state)? = try connection.receive()?.message, state.index == UInt32(index) else {
                    throw VhostUserError("netdev \(id): no GET_VRING_BASE reply for ring \(index)")
                }
                bases[index] = UInt16(truncatingIfNeeded: state.num)
            }
            return bases
        }
    }

    // MARK: local migration (the connection travels as fd `netdev/<id>/vhost-user`)

    /// The connection a local migration hands over; the source keeps its reference, and
    /// with it the connection if the migration fails. Only after the source stopped its
    /// rings (`pause`) does the target get it, and it stays silent until it runs.
    var handedOverConnection: FileDescriptor? { link.withLock { $0.connection?.socket } }

    public var awaitsIncomingQueues: Bool { link.withLock { $0.connection == nil } }

    /// Takes the connection a local migration passed in. Nothing is sent now: the source's
    /// migration may still fail and resume on it; the first exchange (at `cont`) negotiates.
    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws {
        guard fds.count == 1 else {
            throw StreamError("netdev '\(id)' (vhost-user) takes one connection from a migration, not \(fds.count) fds")
        }
        let connection = Self.connection(fds[0].take(label: "netdev \(id) vhost-user socket (handed over)"), replyTimeout: replyTimeout)
        try link.withLock { link in
            guard link.connection == nil else { throw StreamError("netdev '\(id)' (vhost-user) already has its connection") }
            link = Link(connection: connection, negotiated: nil)
        }
    }

    public func makeDatapath(pairs: Int, memory: GuestMemory, memoryBackend: String?) throws -> NetDatapath {
        guard memory.shared else {
            throw VhostUserError("netdev \(id): vhost-user needs shared guest RAM, but memory backend '\(memoryBackend ?? "(default)")' has share=off (use memory-backend-memfd or share=on)")
        }
        return VhostUserDatapath(netdev: self, pairs: pairs, memory: memory)
    }
}

/// The rings of a vhost-user netdev, run by the backend: `start` sends the memory table
/// and each ring (NUM, BASE, ADDR in this process's addresses, KICK, CALL, ENABLE);
/// `stop` takes them back with GET_VRING_BASE and the used index from guest RAM.
public final class VhostUserDatapath: NetDatapath, @unchecked Sendable {
    let netdev: VhostUserNetdev
    public let queuePairs: Int
    let memory: GuestMemory
    /// The running rings (empty while stopped) and the dirty log while pre-copy runs. Held
    /// across each whole exchange with the backend (start, stop, log on/off), which the
    /// vCPU (DRIVER_OK), the control thread and the migration thread may each begin.
    private struct Session {
        var rings: [Int: Virtqueue] = [:]
        var log: VhostDirtyLog?
    }
    private let session = Mutex(Session())

    init(netdev: VhostUserNetdev, pairs: Int, memory: GuestMemory) {
        self.netdev = netdev
        queuePairs = pairs
        self.memory = memory
    }

    public var netdevID: String { netdev.id }
    public var ifname: String { netdev.ifname }
    public var kind: DatapathKind { .vhostUser }
    public var notification: DatapathNotification { .eventFDs }
    public var vnetHeader: Bool { true }
    public var awaitsIncomingFDs: Bool { netdev.awaitsIncomingQueues }
    public var statistics: (rx: [UInt64], tx: [UInt64]) { (Array(repeating: 0, count: queuePairs), Array(repeating: 0, count: queuePairs)) }
    public func attach(to host: DeviceHost) {}
    public func detach() {}
    public func notified(_ index: Int) {}
    /// Local migration: the backend connection, as `netdev/<id>/vhost-user`.
    public func handedOverFDs() -> [NamedFD] {
        netdev.handedOverConnection.map { [NamedFD(name: VirtioNet.DatapathDescriptor.vhostUserFDName(netdev: netdev.id), fd: $0)] } ?? []
    }
    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws { try netdev.adoptIncoming(fds, vnetHeader: vnetHeader) }

    public func start(_ rings: [Int: RingHandoff], activePairs: Int, context: DatapathContext) {
        session.withLock { s in
            do {
                try sendFeatures(logging: s.log != nil)
                try sendMemoryTable()
                if let log = s.log { try netdev.setLogBase(log) }
                for (index, ring) in rings.sorted(by: { $0.key < $1.key }) {
                    try sendRing(index, ring, enabled: index / 2 < activePairs, logging: s.log != nil)
                }
                s.rings = rings.mapValues(\.queue)
            } catch {
                context.ringFailed(rings.keys.min() ?? 0, "\(error)")
            }
        }
    }

    public func stop() -> [Int: Virtqueue] {
        session.withLock { s in
            defer { s.rings = [:] }
            return stopRings(s.rings)
        }
    }

    public func setActivePairs(_ pairs: Int) {
        session.withLock { s in
            for index in s.rings.keys {
                try? netdev.request(.setVringEnable(VhostUserVringState(index: UInt32(index), num: index / 2 < pairs ? 1 : 0)))
            }
        }
    }

    // MARK: messages to the backend (each exchange runs under `session`)

    /// SET_FEATURES: virtio 1, MQ for several pairs, and LOG_ALL while pre-copy logs.
    private func sendFeatures(logging: Bool) throws {
        var features = VhostUserNetBackend.versionOne | VhostUserFeature.protocolFeatures
        if queuePairs > 1 { features |= VhostUserNetBackend.netMultiQueue }
        if logging { features |= VhostUserFeature.logAll }
        try netdev.request(.setFeatures(features & netdev.negotiated.backendFeatures))
    }

    /// SET_MEM_TABLE: each RAM region with the RAM memfd and its user address here.
    private func sendMemoryTable() throws {
        let regions = memory.regions.map { r in
            VhostUserMemoryRegion(guestAddress: r.guestAddress, size: r.size,
                                  userAddress: UInt64(UInt(bitPattern: memory.hostAddress(of: r))), mmapOffset: r.hostOffset)
        }
        try netdev.request(.setMemTable(regions), fds: regions.map { _ in memory.fd })
    }

    private func userAddress(_ gpa: UInt64) throws -> UInt64 {
        UInt64(UInt(bitPattern: try memory.slice(at: gpa, count: 1).baseAddress!))
    }

    /// SET_VRING_ADDR: with `logging`, VHOST_VRING_F_LOG and the used ring's guest address.
    private func sendRingAddress(_ index: Int, _ q: Virtqueue, logging: Bool) throws {
        try netdev.request(.setVringAddr(VhostUserVringAddress(
            index: UInt32(index), flags: logging ? VhostUserVringAddress.logUsed : 0, descriptor: userAddress(q.descriptorTable),
            used: userAddress(q.deviceArea), available: userAddress(q.driverArea), log: logging ? q.deviceArea : 0)))
    }

    /// One ring: NUM, BASE, ADDR, KICK, CALL, ENABLE.
    private func sendRing(_ index: Int, _ ring: RingHandoff, enabled: Bool, logging: Bool) throws {
        let q = ring.queue
        let i = UInt32(index)
        try netdev.request(.setVringNum(VhostUserVringState(index: i, num: UInt32(q.size))))
        try netdev.request(.setVringBase(VhostUserVringState(index: i, num: UInt32(q.lastAvailable))))
        try sendRingAddress(index, q, logging: logging)
        guard let kick = ring.kick, let call = ring.call else { throw VhostUserError("netdev \(netdev.id): ring \(index) has no kick/call eventfd") }
        try netdev.request(.setVringKick(VhostUserVringFile(index: UInt8(index), hasFD: true)), fds: [kick.fd])
        try netdev.request(.setVringCall(VhostUserVringFile(index: UInt8(index), hasFD: true)), fds: [call.fd])
        try netdev.request(.setVringEnable(VhostUserVringState(index: i, num: enabled ? 1 : 0)))
    }

    /// GET_VRING_BASE, then each used index from guest RAM (the backend's last write).
    private func stopRings(_ rings: [Int: Virtqueue]) -> [Int: Virtqueue] {
        guard let bases = try? netdev.stopRings(rings.keys.sorted()) else {
            return rings  // The backend is gone: the rings resume where the device last knew them.
        }
        return rings.reduce(into: [:]) { returned, ring in
            var queue = ring.value
            queue.lastAvailable = bases[ring.key] ?? queue.lastAvailable
            if let used = try? memory.load(UInt16.self, at: queue.deviceArea + 2) { queue.usedIndex = used }
            returned[ring.key] = queue
        }
    }

    // MARK: dirty log (pre-copy)

    /// As QEMU's vhost_migration_log: the log first (SET_LOG_BASE), then LOG_ALL and each
    /// running ring's used-ring logging. Rings that start later get them in `start`.
    public func startDirtyLog() throws {
        let negotiated = try netdev.negotiated
        guard negotiated.logs else {
            throw VhostUserError("netdev \(netdev.id): the vhost-user backend cannot log its writes to guest RAM (it lacks \(negotiated.backendFeatures & VhostUserFeature.logAll == 0 ? "the LOG_ALL feature" : "the LOG_SHMFD protocol feature")); migrate with x-ignore-shared and local on, or with the guest paused")
        }
        try session.withLock { s in
            guard s.log == nil else { return }
            let log = try VhostDirtyLog(covering: memory)
            if !s.rings.isEmpty {
                try netdev.setLogBase(log)
                try sendFeatures(logging: true)
                for (index, queue) in s.rings.sorted(by: { $0.key < $1.key }) { try sendRingAddress(index, queue, logging: true) }
            }
            s.log = log
        }
    }

    public func collectDirty(into bitmap: inout [UInt64]) {
        session.withLock { $0.log }?.collect(into: &bitmap)
    }

    /// LOG_ALL off and the rings' logging off; the backend keeps the mapping until the
    /// next SET_LOG_BASE or reset, as with QEMU.
    public func stopDirtyLog() {
        session.withLock { s in
            guard s.log != nil else { return }
            s.log = nil
            guard !s.rings.isEmpty else { return }
            try? sendFeatures(logging: false)
            for (index, queue) in s.rings.sorted(by: { $0.key < $1.key }) { try? sendRingAddress(index, queue, logging: false) }
        }
    }
}
