import CLinux
import Glibc
import Logging
import Synchronization

/// `-netdev vhost-user,id=ID,chardev=CHARDEV,queues=N`: the VMM's end of a vhost-user
/// backend (e.g. the bundled `vhost-user-net`), and the one owner of "the connection":
/// `connect` (socket and QEMU's handshake: GET_FEATURES, GET/SET_PROTOCOL_FEATURES with
/// MQ and REPLY_ACK, GET_QUEUE_NUM, SET_OWNER), `sendRunning` (what the rings need:
/// SET_FEATURES, the memory table, each ring), `linkLost` (the backend closed, timed out
/// or garbled a reply: link down, rings stopped where guest RAM's used index says) and
/// `reconnect` (chardev `reconnect=N`: every N s on the loop, then `sendRunning` again).
/// The rings run in the backend; the VMM only relays kicks and watches calls.
public final class VhostUserNetdev: NetBackend, @unchecked Sendable {
    public let id: String
    public let chardev: SocketChardev
    public var ifname: String { "vhost-user:\(chardev.path)" }
    public let queueCount: Int
    public var queueFDs: [FileDescriptor] { [] }
    public var vnetHeader: Bool { true }
    public func attachQueues(count: Int) {}

    /// How long any answer may take. A backend that never answers (stopped, or one that
    /// leaves a second front-end in its listen queue) is a lost link, not a hang.
    let replyTimeout: Duration
    let loop: EventLoop
    let logger: Logger

    /// One connection after its handshake; `number` tells a stale one from its successor.
    struct Link: @unchecked Sendable {
        let connection: VhostUserConnection
        let backendFeatures: UInt64
        let replyAck: Bool
        let number: Int
    }

    /// What the backend must hold while the device runs, sent again after a reconnect.
    struct Running {
        var rings: [Int: RingHandoff]
        var memory: GuestMemory
        var activePairs: Int
        var context: DatapathContext
        /// The backend refused part of it: the device needs a reset, no replay.
        var refused = false
    }

    struct Session {
        var link: Link?
        var running: Running?
        var connections = 0
        var closed = false
        var reconnectScheduled = false
        /// The last reconnect failure logged, so a backend that stays away logs once.
        var lastFailure: String?
    }

    /// One request and its reply at a time, from any thread (the vCPU at DRIVER_OK, the
    /// loop for reconnects and pauses); every change of the link happens under it.
    private let session = Mutex(Session())
    /// Read by the guest's config-space reads (vCPU) without waiting for a request.
    private let up = Atomic<Bool>(false)

    /// Connects at once; a backend that cannot be reached (or refuses) is an error, unless
    /// the chardev has `reconnect=`: then the link starts down and the loop retries.
    public init(id: String, chardev: SocketChardev, queues: Int, loop: EventLoop, logger: Logger,
                replyTimeout: Duration = .seconds(5)) throws {
        self.id = id
        self.chardev = chardev
        queueCount = queues
        self.loop = loop
        self.logger = logger
        self.replyTimeout = replyTimeout
        do {
            let link = try connect(number: 1)
            session.withLock { s in
                s.link = link
                s.connections = 1
            }
            up.store(true, ordering: .relaxed)
            watch(link)
        } catch let failure as LinkFailure where chardev.reconnect > 0 {
            // Not there (yet), or busy: what reconnect= is for. A backend that answers
            // but does not fit (queues, features) stays a start-up error.
            logger.warning("\(failure); link down, retrying every \(chardev.reconnect) s (reconnect=\(chardev.reconnect))")
            session.withLock { $0.lastFailure = "\(failure)" }
            scheduleReconnect()
        }
    }

    public var linkUp: Bool { up.load(ordering: .relaxed) }

    /// `netdev n0: chardev 'c' (unix:/run/vu.sock): ...`.
    func described(_ message: String) -> String { "netdev \(id): \(chardev.described): \(message)" }

    // MARK: the connection

    /// The connection is unusable (closed, timed out, garbled): lose the link.
    struct LinkFailure: Error, CustomStringConvertible { let description: String }

    /// A new connection with QEMU's handshake done. Throws, naming the netdev, the
    /// chardev and what failed, `LinkFailure` when the backend is not there, busy or
    /// silent, `VhostUserError` when it answers but does not fit.
    func connect(number: Int) throws -> Link {
        let socket: Int32
        do { socket = try UnixSocket.connect(path: chardev.path) } catch {
            throw LinkFailure(description: described("cannot connect to the vhost-user backend: \(error)"))
        }
        return try handshake(VhostUserConnection(socket: FileDescriptor(adopting: socket, label: "netdev \(id) vhost-user socket")),
                             number: number)
    }

    /// QEMU's handshake on a connected socket (also one that came from elsewhere), with
    /// every answer bounded by `replyTimeout`.
    func handshake(_ connection: VhostUserConnection, number: Int) throws -> Link {
        let (seconds, attoseconds) = replyTimeout.components
        var timeout = timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
        for option in [SO_RCVTIMEO, SO_SNDTIMEO] {
            _ = connection.socket.withRaw { setsockopt($0, SOL_SOCKET, option, &timeout, socklen_t(MemoryLayout<timeval>.size)) }
        }
        do {
            func get(_ m: VhostUserMessage) throws -> UInt64 {
                guard case .reply(m.request, let value)? = try exchange(connection, m, expectingReply: true) else {
                    throw LinkFailure(description: "the vhost-user backend answered \(m.request.name) with another message")
                }
                return value
            }
            let backendFeatures = try get(.getFeatures)
            guard backendFeatures & VhostUserFeature.protocolFeatures != 0 else {
                throw VhostUserError(described("the vhost-user backend lacks PROTOCOL_FEATURES (features \(hex(backendFeatures)))"))
            }
            let protocolFeatures = try get(.getProtocolFeatures)
            let wanted = protocolFeatures & (VhostUserProtocolFeature.mq | VhostUserProtocolFeature.replyAck)
            _ = try exchange(connection, .setProtocolFeatures(wanted), expectingReply: false)
            if queueCount > 1 {
                guard wanted & VhostUserProtocolFeature.mq != 0 else {
                    throw VhostUserError(described("queues=\(queueCount) but the vhost-user backend lacks the MQ protocol feature"))
                }
                let served = try get(.getQueueNum)
                guard served >= UInt64(queueCount) else {
                    throw VhostUserError(described("queues=\(queueCount) but the vhost-user backend serves \(served) queue pair\(served == 1 ? "" : "s")"))
                }
            }
            let link = Link(connection: connection, backendFeatures: backendFeatures,
                            replyAck: wanted & VhostUserProtocolFeature.replyAck != 0, number: number)
            try request(.setOwner, on: link)
            return link
        } catch let failure as LinkFailure {
            throw LinkFailure(description: described(failure.description))
        }
    }

    /// Sends one message and, with `expectingReply`, reads the next one. Anything that
    /// leaves the connection unusable is a `LinkFailure` saying what happened.
    private func exchange(_ connection: VhostUserConnection, _ message: VhostUserMessage, flags: VhostUserFlags = [],
                          fds: [FileDescriptor] = [], expectingReply: Bool) throws -> VhostUserMessage? {
        let name = message.request.name
        do {
            try connection.send(message, flags: flags, fds: fds)
        } catch {
            throw LinkFailure(description: "cannot send \(name) to the vhost-user backend: \(error)")
        }
        guard expectingReply else { return nil }
        let closed = LinkFailure(description: "the vhost-user backend closed the connection before answering \(name) (a backend serving another front-end refuses the next)")
        do {
            guard let reply = try connection.receive() else { throw closed }
            return reply.message
        } catch let error as SystemError where error.errno == ECONNRESET {
            // Closed with our request unread: the kernel resets instead of ending the stream.
            throw closed
        } catch let error as SystemError where error.errno == EAGAIN || error.errno == EWOULDBLOCK {
            throw LinkFailure(description: "the vhost-user backend did not answer \(name) within \(replyTimeout) (is it serving another front-end?)")
        } catch let failure as LinkFailure {
            throw failure
        } catch {
            throw LinkFailure(description: "bad answer to \(name) from the vhost-user backend: \(error)")
        }
    }

    /// A request without a reply of its own; with REPLY_ACK waits for its ack. A refusal
    /// throws `VhostUserError`, a broken connection `LinkFailure`.
    private func request(_ message: VhostUserMessage, on link: Link, fds: [FileDescriptor] = []) throws {
        let reply = try exchange(link.connection, message, flags: link.replyAck ? .needReply : [], fds: fds, expectingReply: link.replyAck)
        guard link.replyAck else { return }
        guard case .reply(message.request, let status)? = reply else {
            throw LinkFailure(description: "no ack from the vhost-user backend for \(message.request.name)")
        }
        guard status == 0 else { throw VhostUserError(described("the vhost-user backend refused \(message.request.name)")) }
    }

    /// GET_VRING_BASE: stops ring `index` in the backend; its next available index.
    private func stopRing(_ index: Int, on link: Link) throws -> UInt16 {
        let reply = try exchange(link.connection, .getVringBase(VhostUserVringState(index: UInt32(index), num: 0)), expectingReply: true)
        guard case .vringBaseReply(let state)? = reply, state.index == UInt32(index) else {
            throw LinkFailure(description: "no GET_VRING_BASE reply for ring \(index)")
        }
        return UInt16(truncatingIfNeeded: state.num)
    }

    /// Everything the rings need, in QEMU's vhost_dev_start order: SET_FEATURES, the
    /// memory table (the RAM memfd per region, user addresses in this process), then per
    /// ring NUM, BASE, ADDR, KICK, CALL, ENABLE.
    private func sendRunning(_ running: Running, on link: Link) throws {
        var features = VhostUserNetBackend.versionOne | VhostUserFeature.protocolFeatures
        if queueCount > 1 { features |= VhostUserNetBackend.netMultiQueue }
        try request(.setFeatures(features & link.backendFeatures), on: link)
        let memory = running.memory
        let regions = memory.regions.map { r in
            VhostUserMemoryRegion(guestAddress: r.guestAddress, size: r.size,
                                  userAddress: UInt64(UInt(bitPattern: memory.hostAddress(of: r))), mmapOffset: r.hostOffset)
        }
        try request(.setMemTable(regions), on: link, fds: regions.map { _ in memory.fd })
        func user(_ gpa: UInt64) throws -> UInt64 { UInt64(UInt(bitPattern: try memory.slice(at: gpa, count: 1).baseAddress!)) }
        for (index, ring) in running.rings.sorted(by: { $0.key < $1.key }) {
            let q = ring.queue
            let i = UInt32(index)
            try request(.setVringNum(VhostUserVringState(index: i, num: UInt32(q.size))), on: link)
            try request(.setVringBase(VhostUserVringState(index: i, num: UInt32(q.lastAvailable))), on: link)
            try request(.setVringAddr(VhostUserVringAddress(index: i, descriptor: user(q.descriptorTable),
                                                            used: user(q.deviceArea), available: user(q.driverArea))), on: link)
            guard let kick = ring.kick, let call = ring.call else { throw VhostUserError(described("ring \(index) has no kick/call eventfd")) }
            try request(.setVringKick(VhostUserVringFile(index: UInt8(index), hasFD: true)), on: link, fds: [kick.fd])
            try request(.setVringCall(VhostUserVringFile(index: UInt8(index), hasFD: true)), on: link, fds: [call.fd])
            try request(.setVringEnable(VhostUserVringState(index: i, num: index / 2 < running.activePairs ? 1 : 0)), on: link)
        }
    }

    /// The link is gone (any thread, under the session lock): the rings count as stopped
    /// where guest RAM's used index says (QEMU's virtio_queue_restore_last_avail_idx: what
    /// the backend took but never used is offered again), the link is down, and the loop
    /// forgets the socket and, with `reconnect=`, tries again later.
    private func linkLost(_ s: inout Session, _ link: Link, _ reason: String) {
        guard s.link?.number == link.number else { return }
        s.link = nil
        up.store(false, ordering: .relaxed)
        // The backend sees the end now; the fd number stays taken until the loop unwatched it.
        _ = link.connection.socket.withRaw { Glibc.shutdown($0, Int32(SHUT_RDWR)) }
        if var running = s.running {
            for (index, ring) in running.rings {
                running.rings[index]!.queue = Self.stoppedAtUsedIndex(ring.queue, memory: running.memory)
            }
            s.running = running
        }
        let rings = s.running?.rings.count ?? 0
        loop.post { [self] in
            loop.unwatch(link.connection.socket.withRaw { $0 })
            link.connection.socket.close()
            let message = described("\(reason); link down" + (rings > 0 ? " (\(rings) rings stopped at the used index in guest RAM)" : ""))
            if chardev.reconnect > 0 {
                logger.warning("\(message); reconnecting every \(chardev.reconnect) s (reconnect=\(chardev.reconnect))")
                scheduleReconnect()
            } else {
                logger.error("\(message); it stays down: the chardev has no reconnect= (-chardev socket,...,reconnect=SECONDS)")
            }
        }
    }

    /// A ring's progress when its backend can no longer say: the used index, read from
    /// guest RAM, for both the next available and the used index.
    static func stoppedAtUsedIndex(_ queue: Virtqueue, memory: GuestMemory) -> Virtqueue {
        var queue = queue
        if let used = try? memory.load(UInt16.self, at: queue.deviceArea + 2) {
            queue.usedIndex = used
            queue.lastAvailable = used
        }
        return queue
    }

    /// Notices the backend closing its end (loop thread). Only hang-ups are watched: the
    /// replies are read by whoever sent the request.
    private func watch(_ link: Link) {
        let fd = link.connection.socket.withRaw { $0 }
        loop.watch(fd, interest: { Int16(0x2000) /* POLLRDHUP */ }) { [weak self] _ in
            guard let self else { return }
            session.withLock { self.linkLost(&$0, link, "the vhost-user backend closed the connection") }
        }
    }

    /// Loop thread: one attempt `reconnect` seconds from now.
    private func scheduleReconnect() {
        let due = session.withLock { s -> Bool in
            guard !s.closed, s.link == nil, !s.reconnectScheduled else { return false }
            s.reconnectScheduled = true
            return true
        }
        guard due else { return }
        loop.after(nanoseconds: Int64(chardev.reconnect) * 1_000_000_000) { [weak self] in self?.reconnect() }
    }

    /// Loop thread: connects and sends the running rings again (bases from the used
    /// index), then the link is up; a failure waits for the next attempt. The wait for
    /// each answer is bounded by `replyTimeout`.
    func reconnect() {
        guard session.withLock({ s in s.reconnectScheduled = false; return !s.closed && s.link == nil }) else { return }
        let number = session.withLock { s in s.connections += 1; return s.connections }
        do {
            let link = try connect(number: number)
            let restored = try session.withLock { s -> Int? in
                guard !s.closed else { return nil }
                if let running = s.running, !running.refused { try sendRunning(running, on: link) }
                s.link = link
                s.lastFailure = nil
                up.store(true, ordering: .relaxed)
                return s.running?.refused == false ? s.running!.rings.count : 0
            }
            guard let restored else {
                link.connection.socket.close()
                return
            }
            watch(link)
            logger.info("\(described("reconnected to the vhost-user backend; link up"))\(restored > 0 ? " (\(restored) rings restored)" : "")")
        } catch {
            let message = "\(error)"
            let first = session.withLock { s in defer { s.lastFailure = message }; return s.lastFailure != message }
            if first { logger.warning("\(message); retrying every \(chardev.reconnect) s") }
            scheduleReconnect()
        }
    }

    /// `netdev_del` and machine shutdown (loop thread): no more attempts, socket closed.
    public func shutdown() {
        let link = session.withLock { s -> Link? in
            s.closed = true
            defer { s.link = nil }
            return s.link
        }
        up.store(false, ordering: .relaxed)
        if let link {
            loop.unwatch(link.connection.socket.withRaw { $0 })
            link.connection.socket.close()
        }
    }

    // MARK: the rings (for VhostUserDatapath)

    func startRings(_ running: Running) {
        session.withLock { s in
            s.running = running
            // Without a link the rings wait for the next connection.
            guard let link = s.link else { return }
            do {
                try sendRunning(running, on: link)
            } catch let failure as LinkFailure {
                linkLost(&s, link, failure.description)
            } catch {
                s.running?.refused = true
                running.context.ringFailed(running.rings.keys.min() ?? 0, "\(error)")
            }
        }
    }

    /// GET_VRING_BASE per ring with the used index from guest RAM; rings whose backend
    /// is gone stop at the used index.
    func stopRings() -> [Int: Virtqueue] {
        session.withLock { s in
            guard let running = s.running else { return [:] }
            s.running = nil
            var returned: [Int: Virtqueue] = [:]
            for (index, ring) in running.rings.sorted(by: { $0.key < $1.key }) {
                var queue = ring.queue
                if let link = s.link {
                    do {
                        queue.lastAvailable = try stopRing(index, on: link)
                        if let used = try? running.memory.load(UInt16.self, at: queue.deviceArea + 2) { queue.usedIndex = used }
                        returned[index] = queue
                        continue
                    } catch {
                        linkLost(&s, link, "\(error)")
                    }
                }
                returned[index] = Self.stoppedAtUsedIndex(queue, memory: running.memory)
            }
            return returned
        }
    }

    func setActivePairs(_ pairs: Int) {
        session.withLock { s in
            guard var running = s.running else { return }
            running.activePairs = pairs
            s.running = running
            guard let link = s.link else { return }
            do {
                for index in running.rings.keys.sorted() {
                    try request(.setVringEnable(VhostUserVringState(index: UInt32(index), num: index / 2 < pairs ? 1 : 0)), on: link)
                }
            } catch let failure as LinkFailure {
                linkLost(&s, link, failure.description)
            } catch {
                logger.error("\(error)")
            }
        }
    }

    public func makeDatapath(pairs: Int, memory: GuestMemory, memoryBackend: String?) throws -> NetDatapath {
        guard memory.shared else {
            throw VhostUserError("netdev \(id): vhost-user needs shared guest RAM, but memory backend '\(memoryBackend ?? "(default)")' has share=off (use memory-backend-memfd or share=on)")
        }
        return VhostUserDatapath(netdev: self, pairs: pairs)
    }
}

/// The rings of a vhost-user netdev, run by the backend; the netdev keeps them (to send
/// them again after a reconnect) and talks to the backend.
public final class VhostUserDatapath: NetDatapath, @unchecked Sendable {
    let netdev: VhostUserNetdev
    public let queuePairs: Int

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

    public var linkUp: Bool { netdev.linkUp }

    public func start(_ rings: [Int: RingHandoff], activePairs: Int, context: DatapathContext) {
        netdev.startRings(.init(rings: rings, memory: context.memory, activePairs: activePairs, context: context))
    }

    public func stop() -> [Int: Virtqueue] { netdev.stopRings() }

    public func setActivePairs(_ pairs: Int) { netdev.setActivePairs(pairs) }
}
