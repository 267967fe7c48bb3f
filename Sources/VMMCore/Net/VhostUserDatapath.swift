import Glibc
import Synchronization

/// `-netdev vhost-user,id=ID,chardev=CHARDEV,queues=N`: a connection to a vhost-user
/// backend (e.g. the bundled `vhost-user-net`), set up as QEMU does at connect:
/// GET_FEATURES, GET/SET_PROTOCOL_FEATURES (MQ, REPLY_ACK), GET_QUEUE_NUM, SET_OWNER.
/// The rings then run in the backend; the VMM only relays kicks and watches calls.
public final class VhostUserNetdev: NetBackend, @unchecked Sendable {
    public let id: String
    public let ifname: String
    public let queueCount: Int
    public var queueFDs: [FileDescriptor] { [] }
    public var vnetHeader: Bool { true }
    public func attachQueues(count: Int) {}

    let connection: VhostUserConnection
    let backendFeatures: UInt64
    let replyAck: Bool
    /// One request and its reply at a time (vCPU thread at DRIVER_OK, QMP's thread for a reset).
    private let lock = Mutex(())

    /// `replyTimeout`: how long any answer may take. A backend that serves one front-end
    /// at a time leaves a second one's connection in its listen queue, unanswered: that
    /// is an error at startup, not a hang.
    public init(id: String, socketPath: String, queues: Int, replyTimeout: Duration = .seconds(5)) throws {
        self.id = id
        ifname = "vhost-user:\(socketPath)"
        queueCount = queues
        let socket: Int32
        do { socket = try UnixSocket.connect(path: socketPath) } catch {
            throw VhostUserError("netdev \(id): cannot connect to the vhost-user backend: \(error)")
        }
        let connection = VhostUserConnection(socket: FileDescriptor(adopting: socket, label: "netdev \(id) vhost-user socket"))
        self.connection = connection
        let (seconds, attoseconds) = replyTimeout.components
        var timeout = timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
        _ = connection.socket.withRaw { setsockopt($0, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size)) }
        func get(_ m: VhostUserMessage) throws -> UInt64 {
            try connection.send(m)
            let reply: VhostUserMessage?
            do {
                reply = try connection.receive()?.message
            } catch let error as SystemError where error.errno == EAGAIN {
                throw VhostUserError("netdev \(id): the vhost-user backend at \(socketPath) did not answer \(m.request.name) within \(replyTimeout) (is it serving another front-end?)")
            }
            guard case .reply(m.request, let value)? = reply else {
                throw VhostUserError("netdev \(id): the vhost-user backend did not answer \(m.request.name)")
            }
            return value
        }
        let backendFeatures = try get(.getFeatures)
        self.backendFeatures = backendFeatures
        guard backendFeatures & VhostUserFeature.protocolFeatures != 0 else {
            throw VhostUserError("netdev \(id): the vhost-user backend lacks PROTOCOL_FEATURES (features \(hex(backendFeatures)))")
        }
        let protocolFeatures = try get(.getProtocolFeatures)
        let wanted = protocolFeatures & (VhostUserProtocolFeature.mq | VhostUserProtocolFeature.replyAck)
        try connection.send(.setProtocolFeatures(wanted))
        replyAck = wanted & VhostUserProtocolFeature.replyAck != 0
        if queues > 1 {
            guard wanted & VhostUserProtocolFeature.mq != 0 else {
                throw VhostUserError("netdev \(id): queues=\(queues) but the vhost-user backend lacks the MQ protocol feature")
            }
            let served = try get(.getQueueNum)
            guard served >= UInt64(queues) else {
                throw VhostUserError("netdev \(id): queues=\(queues) but the vhost-user backend serves \(served) queue pair\(served == 1 ? "" : "s")")
            }
        }
        try request(.setOwner)
    }

    /// Sends a request without a reply of its own; with REPLY_ACK waits for its ack and
    /// throws when the backend refused it.
    func request(_ message: VhostUserMessage, fds: [FileDescriptor] = []) throws {
        try lock.withLock { _ in
            try connection.send(message, flags: replyAck ? .needReply : [], fds: fds)
            guard replyAck else { return }
            guard case .reply(message.request, let status)? = try connection.receive()?.message else {
                throw VhostUserError("netdev \(id): no ack from the vhost-user backend for \(message.request.name)")
            }
            guard status == 0 else { throw VhostUserError("netdev \(id): the vhost-user backend refused \(message.request.name)") }
        }
    }

    /// GET_VRING_BASE: stops ring `index` in the backend; its next available index.
    func stopRing(_ index: Int) throws -> UInt16 {
        try lock.withLock { _ in
            try connection.send(.getVringBase(VhostUserVringState(index: UInt32(index), num: 0)))
            guard case .vringBaseReply(let state)? = try connection.receive()?.message, state.index == UInt32(index) else {
                throw VhostUserError("netdev \(id): no GET_VRING_BASE reply for ring \(index)")
            }
            return UInt16(truncatingIfNeeded: state.num)
        }
    }

    public func makeDatapath(pairs: Int, memory: GuestMemory, memoryBackend: String?) throws -> NetDatapath {
        guard memory.shared else {
            throw VhostUserError("netdev \(id): vhost-user needs shared guest RAM, but memory backend '\(memoryBackend ?? "(default)")' has share=off (use memory-backend-memfd or share=on)")
        }
        return VhostUserDatapath(netdev: self, pairs: pairs)
    }
}

/// The rings of a vhost-user netdev, run by the backend: `start` sends the memory table
/// and each ring (NUM, BASE, ADDR in this process's addresses, KICK, CALL, ENABLE);
/// `stop` takes them back with GET_VRING_BASE and the used index from guest RAM.
public final class VhostUserDatapath: NetDatapath, @unchecked Sendable {
    let netdev: VhostUserNetdev
    public let queuePairs: Int
    private let running = Mutex<(rings: [Int: Virtqueue], memory: GuestMemory?)>(([:], nil))

    init(netdev: VhostUserNetdev, pairs: Int) {
        self.netdev = netdev
        queuePairs = pairs
    }

    public var netdevID: String { netdev.id }
    public var ifname: String { netdev.ifname }
    public var kind: DatapathKind { .vhostUser }
    /// The backend writes guest RAM behind the VMM's back (no LOG_SHMFD dirty log yet) and
    /// its connection is not handed to a target yet: a migration would lose RX frames.
    public var migrationBlocker: String? {
        "vhost-user netdev '\(netdev.id)' cannot migrate yet: the backend's writes to guest RAM are not logged and its connection is not handed over"
    }
    public var notification: DatapathNotification { .eventFDs }
    public var vnetHeader: Bool { true }
    public var awaitsIncomingFDs: Bool { false }
    public var statistics: (rx: [UInt64], tx: [UInt64]) { (Array(repeating: 0, count: queuePairs), Array(repeating: 0, count: queuePairs)) }
    public func attach(to host: DeviceHost) {}
    public func detach() {}
    public func notified(_ index: Int) {}
    public func handedOverFDs() -> [NamedFD] { [] }
    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws {
        throw StreamError("netdev '\(netdev.id)' (vhost-user) cannot take fds from a migration")
    }

    public func start(_ rings: [Int: RingHandoff], activePairs: Int, context: DatapathContext) {
        let memory = context.memory
        do {
            var features = VhostUserNetBackend.versionOne | VhostUserFeature.protocolFeatures
            if queuePairs > 1 { features |= VhostUserNetBackend.netMultiQueue }
            try netdev.request(.setFeatures(features & netdev.backendFeatures))
            let regions = memory.regions.map { r in
                VhostUserMemoryRegion(guestAddress: r.guestAddress, size: r.size,
                                      userAddress: UInt64(UInt(bitPattern: memory.hostAddress(of: r))), mmapOffset: r.hostOffset)
            }
            try netdev.request(.setMemTable(regions), fds: regions.map { _ in memory.fd })
            func user(_ gpa: UInt64) throws -> UInt64 { UInt64(UInt(bitPattern: try memory.slice(at: gpa, count: 1).baseAddress!)) }
            for (index, ring) in rings.sorted(by: { $0.key < $1.key }) {
                let q = ring.queue
                let i = UInt32(index)
                try netdev.request(.setVringNum(VhostUserVringState(index: i, num: UInt32(q.size))))
                try netdev.request(.setVringBase(VhostUserVringState(index: i, num: UInt32(q.lastAvailable))))
                try netdev.request(.setVringAddr(VhostUserVringAddress(index: i, descriptor: user(q.descriptorTable),
                                                                       used: user(q.deviceArea), available: user(q.driverArea))))
                guard let kick = ring.kick, let call = ring.call else { throw VhostUserError("netdev \(netdev.id): ring \(index) has no kick/call eventfd") }
                try netdev.request(.setVringKick(VhostUserVringFile(index: UInt8(index), hasFD: true)), fds: [kick.fd])
                try netdev.request(.setVringCall(VhostUserVringFile(index: UInt8(index), hasFD: true)), fds: [call.fd])
                try netdev.request(.setVringEnable(VhostUserVringState(index: i, num: index / 2 < activePairs ? 1 : 0)))
            }
            running.withLock { $0 = (rings.mapValues(\.queue), memory) }
        } catch {
            context.ringFailed(rings.keys.min() ?? 0, "\(error)")
        }
    }

    public func stop() -> [Int: Virtqueue] {
        let (rings, memory) = running.withLock { r in defer { r = ([:], nil) }; return r }
        var returned: [Int: Virtqueue] = [:]
        for (index, var queue) in rings {
            do {
                queue.lastAvailable = try netdev.stopRing(index)
                if let memory { queue.usedIndex = try memory.load(UInt16.self, at: queue.deviceArea + 2) }
            } catch {
                // The backend is gone: the ring resumes where the device last knew it.
            }
            returned[index] = queue
        }
        return returned
    }

    public func setActivePairs(_ pairs: Int) {
        let indices = running.withLock { Array($0.rings.keys) }
        for index in indices {
            try? netdev.request(.setVringEnable(VhostUserVringState(index: UInt32(index), num: index / 2 < pairs ? 1 : 0)))
        }
    }
}
