import CLinux
import Glibc
import Logging
import Synchronization

/// `-netdev vhost-user,id=ID,chardev=CHARDEV,queues=N`: the VMM's end of a vhost-user
/// backend (e.g. the bundled `vhost-user-net`), and the one owner of "the connection":
/// `connect` (socket and QEMU's handshake: GET_FEATURES, GET/SET_PROTOCOL_FEATURES with
/// MQ, REPLY_ACK and LOG_SHMFD, GET_QUEUE_NUM, SET_OWNER), `sendRunning` (what the rings
/// need: SET_FEATURES, the memory table, pre-copy's dirty log, each ring), `linkLost`
/// (the backend closed, timed out or garbled a reply: link down, rings stopped where
/// guest RAM's used index says) and `reconnect` (chardev `reconnect=N`: every N s on the
/// loop, then `sendRunning` again). With `incoming-fds=on` (no chardev) the connection
/// comes from a local migration's source instead (`adoptIncoming`), and goes through the
/// same handshake, without SET_OWNER, at its first use. The rings run in the backend;
/// the VMM only relays kicks and watches calls.
public final class VhostUserNetdev: NetBackend, @unchecked Sendable {
    public let id: String
    /// nil with `incoming-fds=on`: the connection comes from the migration source.
    public let chardev: SocketChardev?
    public var ifname: String { chardev.map { "vhost-user:\($0.path)" } ?? "vhost-user:(from the migration source)" }
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
        /// LOG_SHMFD negotiated and LOG_ALL offered: the backend can log its writes for pre-copy.
        let logs: Bool
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
        /// Pre-copy's dirty log (`startDirtyLog` to `stopDirtyLog`): sent with the running
        /// rings, so a reconnect during pre-copy sends SET_LOG_BASE and LOG_ALL again.
        var log: VhostDirtyLog?
        /// `incoming-fds=on`: no connection has come from a migration yet.
        var awaitsConnection = false
        /// A connection a local migration handed over, not spoken on yet (`adoptIncoming`).
        var adopted: VhostUserConnection?
        /// The link's socket went to a local migration's target, which shares it from now
        /// on: this end only ever closes its copy (a shutdown would end the target's link
        /// too) and does not reconnect (it would race the target for the backend), until
        /// its own rings start again (the migration failed).
        var handedOver = false
        var connections = 0
        var closed = false
        var reconnectScheduled = false
        /// The last reconnect failure logged, so a backend that stays away logs once.
        var lastFailure: String?
        /// The answers to the rings' last start, not read yet (see `startRings`).
        var unanswered: Unanswered?
    }

    /// A start whose batch went out: a refusal among its answers fails `ring` through `context`.
    struct Unanswered {
        var batch: Batch
        var context: DatapathContext
        var ring: Int
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

    /// `-netdev vhost-user,id=ID,queues=N,incoming-fds=on`: no connection of its own; a
    /// local migration hands the source's over (`adoptIncoming`). A cpr-transfer target's
    /// `cpr=on` netdev is made the same way and adopts the connection from the cpr state at
    /// once; it keeps its `chardev` to reconnect through later.
    public init(id: String, incomingQueues queues: Int, chardev: SocketChardev? = nil, loop: EventLoop, logger: Logger,
                replyTimeout: Duration = .seconds(5)) {
        self.id = id
        self.chardev = chardev
        queueCount = queues
        self.loop = loop
        self.logger = logger
        self.replyTimeout = replyTimeout
        session.withLock { $0.awaitsConnection = true }
    }

    public var linkUp: Bool { up.load(ordering: .relaxed) }

    /// `netdev n0: chardev 'c' (unix:/run/vu.sock): ...`.
    func described(_ message: String) -> String {
        "netdev \(id): \(chardev?.described ?? "the connection from the migration source"): \(message)"
    }

    // MARK: the connection

    /// The connection is unusable (closed, timed out, garbled): lose the link.
    struct LinkFailure: Error, CustomStringConvertible { let description: String }

    /// A new connection with QEMU's handshake done. Throws, naming the netdev, the
    /// chardev and what failed, `LinkFailure` when the backend is not there, busy or
    /// silent, `VhostUserError` when it answers but does not fit.
    func connect(number: Int) throws -> Link {
        guard let chardev else { throw LinkFailure(description: described("no chardev to connect through")) }
        let socket: Int32
        do { socket = try UnixSocket.connect(path: chardev.path) } catch {
            throw LinkFailure(description: described("cannot connect to the vhost-user backend: \(error)"))
        }
        return try handshake(VhostUserConnection(socket: FileDescriptor(adopting: socket, label: "netdev \(id) vhost-user socket")),
                             number: number)
    }

    /// QEMU's handshake on a connected socket (also one that came from a migration
    /// source: `owned`, the backend's owner already, so no SET_OWNER), with every answer
    /// bounded by `replyTimeout`.
    func handshake(_ connection: VhostUserConnection, number: Int, owned: Bool = false) throws -> Link {
        let (seconds, attoseconds) = replyTimeout.components
        var timeout = timeval(tv_sec: Int(seconds), tv_usec: Int(attoseconds / 1_000_000_000_000))
        for option in [SO_RCVTIMEO, SO_SNDTIMEO] {
            _ = connection.socket.withRaw { setsockopt($0, SOL_SOCKET, option, &timeout, socklen_t(MemoryLayout<timeval>.size)) }
        }
        do {
            func value(answering request: VhostUserRequest) throws -> UInt64 {
                guard case .reply(request, let value) = try receive(connection, answering: request) else {
                    throw LinkFailure(description: "the vhost-user backend answered \(request.name) with another message")
                }
                return value
            }
            // Both questions at once (one round trip: at a local migration target's `cont`
            // this handshake is downtime). Without PROTOCOL_FEATURES the second one is
            // unanswerable, but then the connection is given up anyway.
            try send(connection, .getFeatures)
            try send(connection, .getProtocolFeatures)
            let backendFeatures = try value(answering: .getFeatures)
            guard backendFeatures & VhostUserFeature.protocolFeatures != 0 else {
                throw VhostUserError(described("the vhost-user backend lacks PROTOCOL_FEATURES (features \(hex(backendFeatures)))"))
            }
            let protocolFeatures = try value(answering: .getProtocolFeatures)
            let wanted = protocolFeatures & (VhostUserProtocolFeature.mq | VhostUserProtocolFeature.replyAck | VhostUserProtocolFeature.logSHMFD)
            if queueCount > 1 && wanted & VhostUserProtocolFeature.mq == 0 {
                throw VhostUserError(described("queues=\(queueCount) but the vhost-user backend lacks the MQ protocol feature"))
            }
            try send(connection, .setProtocolFeatures(wanted))
            if queueCount > 1 {
                try send(connection, .getQueueNum)
                let served = try value(answering: .getQueueNum)
                guard served >= UInt64(queueCount) else {
                    throw VhostUserError(described("queues=\(queueCount) but the vhost-user backend serves \(served) queue pair\(served == 1 ? "" : "s")"))
                }
            }
            let link = Link(connection: connection, backendFeatures: backendFeatures,
                            replyAck: wanted & VhostUserProtocolFeature.replyAck != 0,
                            logs: wanted & VhostUserProtocolFeature.logSHMFD != 0 && backendFeatures & VhostUserFeature.logAll != 0,
                            number: number)
            if !owned { try request(.setOwner, on: link) }
            return link
        } catch let failure as LinkFailure {
            throw LinkFailure(description: described(failure.description))
        }
    }

    /// Sends one message. A connection that takes no more is a `LinkFailure`.
    private func send(_ connection: VhostUserConnection, _ message: VhostUserMessage, flags: VhostUserFlags = [],
                      fds: [FileDescriptor] = []) throws {
        do {
            try connection.send(message, flags: flags, fds: fds)
        } catch {
            throw LinkFailure(description: "cannot send \(message.request.name) to the vhost-user backend: \(error)")
        }
    }

    /// Reads the answer to `request` (its name is for messages). Anything that leaves the
    /// connection unusable is a `LinkFailure` saying what happened.
    private func receive(_ connection: VhostUserConnection, answering request: VhostUserRequest) throws -> VhostUserMessage {
        let name = request.name
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

    /// Requests without replies of their own, sent back to back; their acks (REPLY_ACK)
    /// are read once the last one went out (the backend answers in order), so a batch
    /// costs one round trip, not one per request: a local migration target's start at
    /// `cont` is downtime. QEMU does not wait for most of these at all.
    struct Batch {
        let link: Link
        /// Requests whose answer (an ack, or SET_LOG_BASE's reply) is still to be read, in order.
        var awaiting: [VhostUserRequest] = []
    }

    private func post(_ message: VhostUserMessage, fds: [FileDescriptor] = [], in batch: inout Batch) throws {
        try send(batch.link.connection, message, flags: batch.link.replyAck ? .needReply : [], fds: fds)
        if batch.link.replyAck { batch.awaiting.append(message.request) }
    }

    /// Reads the batch's answers. A refusal (non-zero status) throws `VhostUserError` for
    /// the first refused request once the answers still coming were read (a backend that
    /// closes after a refusal just ends that); a broken connection throws `LinkFailure`.
    private func finish(_ batch: Batch) throws {
        var refused: VhostUserRequest?
        for request in batch.awaiting {
            let reply: VhostUserMessage
            do { reply = try receive(batch.link.connection, answering: request) } catch where refused != nil { break }
            guard case .reply(request, let status) = reply else {
                if refused != nil { break }
                throw LinkFailure(description: "no ack from the vhost-user backend for \(request.name)")
            }
            if status != 0 && refused == nil { refused = request }
        }
        if let refused { throw VhostUserError(described("the vhost-user backend refused \(refused.name)")) }
    }

    /// One request without a reply of its own; with REPLY_ACK waits for its ack.
    private func request(_ message: VhostUserMessage, on link: Link, fds: [FileDescriptor] = []) throws {
        var batch = Batch(link: link)
        try post(message, fds: fds, in: &batch)
        try finish(batch)
    }

    /// GET_VRING_BASE for each ring: stops them in the backend; their next available
    /// indices. All requests go out before the first reply is read (the backend answers
    /// in order), so a pause costs about one round trip, not one per ring: it is part of
    /// a migration's downtime.
    private func stopRings(_ indices: [Int], on link: Link) throws -> [Int: UInt16] {
        for index in indices { try send(link.connection, .getVringBase(VhostUserVringState(index: UInt32(index), num: 0))) }
        var bases: [Int: UInt16] = [:]
        for index in indices {
            guard case .vringBaseReply(let state) = try receive(link.connection, answering: .getVringBase), state.index == UInt32(index) else {
                throw LinkFailure(description: "no GET_VRING_BASE reply for ring \(index)")
            }
            bases[index] = UInt16(truncatingIfNeeded: state.num)
        }
        return bases
    }

    /// SET_LOG_BASE with the log's memfd (LOG_SHMFD, size in the payload); the backend
    /// answers it whether or not REPLY_ACK was negotiated, and QEMU waits for that answer.
    private func setLogBase(_ log: VhostDirtyLog, in batch: inout Batch) throws {
        try send(batch.link.connection, .setLogBase(size: log.size, offset: 0), fds: log.fd.map { [$0] } ?? [])
        batch.awaiting.append(.setLogBase)
    }

    /// SET_FEATURES: virtio 1, MQ for several pairs, and LOG_ALL while pre-copy logs.
    private func setFeatures(logging: Bool, in batch: inout Batch) throws {
        var features = VhostUserNetBackend.versionOne | VhostUserFeature.protocolFeatures
        if queueCount > 1 { features |= VhostUserNetBackend.netMultiQueue }
        if logging { features |= VhostUserFeature.logAll }
        try post(.setFeatures(features & batch.link.backendFeatures), in: &batch)
    }

    /// SET_VRING_ADDR in this process's addresses; with `logging`, VHOST_VRING_F_LOG and
    /// the used ring's guest address.
    private func setRingAddress(_ index: Int, _ q: Virtqueue, memory: GuestMemory, logging: Bool, in batch: inout Batch) throws {
        func user(_ gpa: UInt64) throws -> UInt64 { UInt64(UInt(bitPattern: try memory.slice(at: gpa, count: 1).baseAddress!)) }
        try post(.setVringAddr(VhostUserVringAddress(
            index: UInt32(index), flags: logging ? VhostUserVringAddress.logUsed : 0, descriptor: user(q.descriptorTable),
            used: user(q.deviceArea), available: user(q.driverArea), log: logging ? q.deviceArea : 0)), in: &batch)
    }

    /// A live migration needs the backend to log its writes to guest RAM.
    private func checkLogs(_ link: Link) throws {
        guard !link.logs else { return }
        throw VhostUserError("netdev \(id): the vhost-user backend cannot log its writes to guest RAM (it lacks \(link.backendFeatures & VhostUserFeature.logAll == 0 ? "the LOG_ALL feature" : "the LOG_SHMFD protocol feature")); migrate with x-ignore-shared and local on, or with the guest paused")
    }

    /// Everything the rings need, in QEMU's vhost_dev_start order, as one batch:
    /// SET_FEATURES (LOG_ALL while `log`), the memory table (the RAM memfd per region, user
    /// addresses in this process), SET_LOG_BASE while `log`, then per ring NUM, BASE, ADDR,
    /// KICK, CALL, ENABLE. Returns the batch, its answers still to be read (`finish`).
    private func sendRunning(_ running: Running, log: VhostDirtyLog?, on link: Link) throws -> Batch {
        if log != nil { try checkLogs(link) }
        if let index = running.rings.first(where: { $0.value.kick == nil || $0.value.call == nil })?.key {
            throw VhostUserError(described("ring \(index) has no kick/call eventfd"))
        }
        var batch = Batch(link: link)
        try setFeatures(logging: log != nil, in: &batch)
        let memory = running.memory
        let regions = memory.regions.map { r in
            VhostUserMemoryRegion(guestAddress: r.guestAddress, size: r.size,
                                  userAddress: UInt64(UInt(bitPattern: memory.hostAddress(of: r))), mmapOffset: r.hostOffset)
        }
        try post(.setMemTable(regions), fds: regions.map { _ in memory.fd }, in: &batch)
        if let log { try setLogBase(log, in: &batch) }
        for (index, ring) in running.rings.sorted(by: { $0.key < $1.key }) {
            let q = ring.queue
            let i = UInt32(index)
            try post(.setVringNum(VhostUserVringState(index: i, num: UInt32(q.size))), in: &batch)
            try post(.setVringBase(VhostUserVringState(index: i, num: UInt32(q.lastAvailable))), in: &batch)
            try setRingAddress(index, q, memory: memory, logging: log != nil, in: &batch)
            try post(.setVringKick(VhostUserVringFile(index: UInt8(index), hasFD: true)), fds: [ring.kick!.fd], in: &batch)
            try post(.setVringCall(VhostUserVringFile(index: UInt8(index), hasFD: true)), fds: [ring.call!.fd], in: &batch)
            try post(.setVringEnable(VhostUserVringState(index: i, num: index / 2 < running.activePairs ? 1 : 0)), in: &batch)
        }
        return batch
    }

    /// Reads the answers `startRings` left (any thread, under the session lock): every
    /// exchange does this first, as the answers come before its own; the loop does it soon
    /// after the start anyway. A refusal fails the device's ring, as at the start itself.
    private func settle(_ s: inout Session) {
        guard let pending = s.unanswered else { return }
        s.unanswered = nil
        guard let link = s.link, link.number == pending.batch.link.number else { return }
        do {
            try finish(pending.batch)
        } catch let failure as LinkFailure {
            linkLost(&s, link, failure.description)
        } catch {
            s.running?.refused = true
            pending.context.ringFailed(pending.ring, "\(error)")
        }
    }

    /// The link is gone (any thread, under the session lock): the rings count as stopped
    /// where guest RAM's used index says (QEMU's virtio_queue_restore_last_avail_idx: what
    /// the backend took but never used is offered again), the link is down, and the loop
    /// forgets the socket and, with `reconnect=`, tries again later.
    private func linkLost(_ s: inout Session, _ link: Link, _ reason: String) {
        guard s.link?.number == link.number else { return }
        s.link = nil
        s.unanswered = nil
        up.store(false, ordering: .relaxed)
        let lent = s.handedOver
        // The backend sees the end now; the fd number stays taken until the loop unwatched
        // it. A socket a migration target shares is only closed here: shutting it down
        // would end the target's link too.
        if !lent { _ = link.connection.socket.withRaw { Glibc.shutdown($0, Int32(SHUT_RDWR)) } }
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
            if lent {
                logger.warning("\(message); the connection was handed over to a migration target, so this netdev does not reconnect unless its rings start here again")
            } else if let reconnect = chardev?.reconnect, reconnect > 0 {
                logger.warning("\(message); reconnecting every \(reconnect) s (reconnect=\(reconnect))")
                scheduleReconnect()
            } else if chardev == nil {
                logger.error("\(message); it stays down: the connection came from a migration source (no chardev to reconnect through)")
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
        loop.watch(fd, interest: { Int16(0x2000) /* POLLRDHUP */ }) { [weak self] _ in self?.hungUp(link.number) }
    }

    /// The backend closed its end of link `number` (nil: the current link), as the loop's
    /// watch saw it.
    func hungUp(_ number: Int? = nil) {
        session.withLock { s in
            guard let link = s.link, link.number == number ?? link.number else { return }
            linkLost(&s, link, "the vhost-user backend closed the connection")
        }
    }

    /// Loop thread: one attempt `reconnect` seconds from now.
    private func scheduleReconnect() {
        guard let reconnect = chardev?.reconnect, reconnect > 0 else { return }
        let due = session.withLock { s -> Bool in
            guard !s.closed, s.link == nil, !s.handedOver, !s.reconnectScheduled else { return false }
            s.reconnectScheduled = true
            return true
        }
        guard due else { return }
        loop.after(nanoseconds: Int64(reconnect) * 1_000_000_000) { [weak self] in self?.reconnect() }
    }

    /// Loop thread: connects and sends the running rings again (bases from the used
    /// index, with pre-copy's log if it runs), then the link is up; a failure waits for
    /// the next attempt. The wait for each answer is bounded by `replyTimeout`.
    func reconnect() {
        guard session.withLock({ s in s.reconnectScheduled = false; return !s.closed && s.link == nil && !s.handedOver }) else { return }
        let number = session.withLock { s in s.connections += 1; return s.connections }
        do {
            let link = try connect(number: number)
            let restored = try session.withLock { s -> Int? in
                guard !s.closed, !s.handedOver else { return nil }
                if let running = s.running, !running.refused { try finish(sendRunning(running, log: s.log, on: link)) }
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
            if first { logger.warning("\(message); retrying every \(chardev?.reconnect ?? 0) s") }
            scheduleReconnect()
        }
    }

    /// `netdev_del` and machine shutdown (loop thread): no more attempts, socket closed
    /// (never shut down: a migration target may share it).
    public func shutdown() {
        let (link, adopted) = session.withLock { s -> (Link?, VhostUserConnection?) in
            s.closed = true
            defer {
                s.link = nil
                s.adopted = nil
            }
            return (s.link, s.adopted)
        }
        up.store(false, ordering: .relaxed)
        if let link {
            loop.unwatch(link.connection.socket.withRaw { $0 })
            link.connection.socket.close()
        }
        adopted?.socket.close()
    }

    // MARK: local migration (the connection travels as fd `netdev/<id>/vhost-user`)

    /// The connection a local migration hands over, once `pause` stopped the rings; the
    /// source keeps its reference, and with it the connection if the migration fails.
    /// From here on the socket is shared (see `Session.handedOver`).
    func handOverConnection() -> FileDescriptor? {
        session.withLock { s in
            settle(&s)  // No answer of ours may be left for the target to read.
            guard let socket = s.link?.connection.socket ?? s.adopted?.socket else { return nil }
            s.handedOver = true
            return socket
        }
    }

    public var awaitsIncomingQueues: Bool { session.withLock { $0.awaitsConnection } }

    /// `cpr=on`: a cpr-transfer hands the connection (`handOverConnection`) to the next VMM.
    public var cpr = false
    public var cprVhostKind: CPRState.VhostKind { .user }

    /// A cpr-transfer that handed the connection over failed or was cancelled before the
    /// rings ran again: the connection is this netdev's alone once more (a shutdown may end
    /// it, a lost link reconnects). The resume's start does the same when the rings run.
    func takeBackConnection() {
        let reconnect = session.withLock { s -> Bool in
            defer { s.handedOver = false }
            return s.handedOver && s.link == nil && !s.closed
        }
        if reconnect { loop.post { [weak self] in self?.scheduleReconnect() } }
    }

    /// A cpr-transfer target's `cpr=on` netdev `id`: the source's connection from the cpr
    /// state (`netdev/<id>/vhost-user`), for the same number of queue pairs (`queues` 1,
    /// the default, takes the source's). Returns the pairs and the fd, now the caller's.
    static func claimCPRConnection(id: String, queues: Int, from incoming: IncomingMigration) throws -> (pairs: Int, fd: FileDescriptor) {
        guard let entry = incoming.cprState?.netdev(id), entry.vhostKind == .user else {
            throw VhostUserError("netdev \(id) is cpr=on, but the cpr state hands over no vhost-user connection for it (was the source's netdev vhost-user with cpr=on?)")
        }
        guard queues == 1 || queues == Int(entry.queues) else {
            throw VhostUserError("netdev \(id): queues=\(queues), but the vhost-user connection the cpr state hands over serves \(entry.queues) queue pair(s)")
        }
        return (Int(entry.queues), try incoming.claimCPRFD(NamedFD.vhostUserConnectionName(netdev: id), by: "netdev '\(id)' (vhost-user)"))
    }

    /// Takes the connection a local migration passed in. Nothing is sent now: the
    /// source's migration may still fail and resume on it; the first start of the rings
    /// (`cont`) runs the handshake (`startRings`).
    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws {
        guard fds.count == 1 else {
            throw StreamError("netdev '\(id)' (vhost-user) takes one connection from a migration, not \(fds.count) fds")
        }
        let connection = VhostUserConnection(socket: fds[0].take(label: "netdev \(id) vhost-user socket (handed over)"))
        try session.withLock { s in
            guard s.awaitsConnection else { throw StreamError("netdev '\(id)' (vhost-user) already has its connection") }
            s.awaitsConnection = false
            s.adopted = connection
        }
        up.store(true, ordering: .relaxed)
    }

    /// An adopted connection becomes the link at its first use: the handshake without
    /// SET_OWNER (the source owned it). A failure takes the link down for good (no
    /// chardev to reconnect through); a backend that does not fit is a refusal.
    private func negotiateAdopted(_ s: inout Session) throws {
        guard s.link == nil, let adopted = s.adopted else { return }
        s.adopted = nil
        s.connections += 1
        do {
            let link = try handshake(adopted, number: s.connections, owned: true)
            s.link = link
            // From any thread (cont, or DRIVER_OK on the vCPU): the loop's sources are its own.
            loop.post { [self] in watch(link) }
        } catch {
            up.store(false, ordering: .relaxed)
            adopted.socket.close()
            if error is LinkFailure {
                // A cpr-transfer target keeps its chardev: reconnect through it as any netdev.
                if let reconnect = chardev?.reconnect, reconnect > 0 {
                    logger.warning("\(error); link down; reconnecting every \(reconnect) s (reconnect=\(reconnect))")
                } else {
                    logger.error("\(error); link down; it stays down: the connection came from a migration source (\(chardev == nil ? "no chardev to reconnect through" : "its chardev has no reconnect="))")
                }
            }
            throw error
        }
    }

    // MARK: the rings (for VhostUserDatapath)

    /// Sends what the rings need and returns without waiting for the answers: the device
    /// (and at a local migration target's `cont`, the guest) runs on while the backend
    /// works through them, in order; `settle` reads them on the loop or before the next
    /// exchange, whichever comes first. QEMU does not wait for most of them at all.
    func startRings(_ running: Running) {
        let began = monotonicNanoseconds()
        defer { logTiming("rings started", since: began) }
        let (reconnect, unanswered) = session.withLock { s -> (Bool, Bool) in
            settle(&s)
            s.running = running
            // Running here again: the connection is this netdev's alone once more.
            let wasLent = s.handedOver
            s.handedOver = false
            let ring = running.rings.keys.min() ?? 0
            do {
                try negotiateAdopted(&s)
            } catch is LinkFailure {
                return (chardev != nil, false)  // scheduleReconnect decides by its reconnect=
            } catch {
                s.running?.refused = true
                running.context.ringFailed(ring, "\(error)")
                return (false, false)
            }
            // Without a link the rings wait for the next connection.
            guard let link = s.link else { return (wasLent, false) }
            do {
                s.unanswered = Unanswered(batch: try sendRunning(running, log: s.log, on: link), context: running.context, ring: ring)
                return (false, true)
            } catch let failure as LinkFailure {
                linkLost(&s, link, failure.description)
            } catch {
                s.running?.refused = true
                running.context.ringFailed(ring, "\(error)")
            }
            return (false, false)
        }
        if unanswered { loop.post { [weak self] in self?.session.withLock { self?.settle(&$0) } } }
        // A link lost while it was lent was not reconnected; now it may be.
        if reconnect { loop.post { [weak self] in self?.scheduleReconnect() } }
    }

    /// GET_VRING_BASE for all rings (pipelined) with the used index from guest RAM; rings
    /// whose backend is gone stop at the used index.
    func stopRings() -> [Int: Virtqueue] {
        let began = monotonicNanoseconds()
        defer { logTiming("rings stopped", since: began) }
        return session.withLock { s in
            settle(&s)
            guard let running = s.running else { return [:] }
            s.running = nil
            var bases: [Int: UInt16] = [:]
            if let link = s.link {
                do {
                    bases = try stopRings(running.rings.keys.sorted(), on: link)
                } catch {
                    linkLost(&s, link, "\(error)")
                }
            }
            return running.rings.reduce(into: [:]) { returned, ring in
                guard let base = bases[ring.key] else {
                    returned[ring.key] = Self.stoppedAtUsedIndex(ring.value.queue, memory: running.memory)
                    return
                }
                var queue = ring.value.queue
                queue.lastAvailable = base
                if let used = try? running.memory.load(UInt16.self, at: queue.deviceArea + 2) { queue.usedIndex = used }
                returned[ring.key] = queue
            }
        }
    }

    /// A migration's downtime contains the rings' stop and start: the debug log says when
    /// (monotonic, as the migration timelines) and how long each took.
    private func logTiming(_ what: String, since began: Int64) {
        let now = monotonicNanoseconds()
        logger.debug("\(described("\(what) at \(now / 1000) us in \((now - began) / 1000) us"))")
    }

    func setActivePairs(_ pairs: Int) {
        session.withLock { s in
            settle(&s)
            guard var running = s.running else { return }
            running.activePairs = pairs
            s.running = running
            guard let link = s.link else { return }
            do {
                var batch = Batch(link: link)
                for index in running.rings.keys.sorted() {
                    try post(.setVringEnable(VhostUserVringState(index: UInt32(index), num: index / 2 < pairs ? 1 : 0)), in: &batch)
                }
                try finish(batch)
            } catch let failure as LinkFailure {
                linkLost(&s, link, failure.description)
            } catch {
                logger.error("\(error)")
            }
        }
    }

    // MARK: dirty log (pre-copy)

    /// As QEMU's vhost_migration_log: the log first (SET_LOG_BASE), then LOG_ALL and each
    /// running ring's used-ring logging. Rings that start later, or again after a
    /// reconnect, get them with `sendRunning`. A backend without logging fails it.
    func startDirtyLog(covering memory: GuestMemory) throws {
        try session.withLock { s in
            settle(&s)
            guard s.log == nil else { return }
            if let link = s.link { try checkLogs(link) }
            let log = try VhostDirtyLog(covering: memory)
            guard let running = s.running, !running.refused, let link = s.link else {
                s.log = log
                return
            }
            do {
                var batch = Batch(link: link)
                try setLogBase(log, in: &batch)
                try setFeatures(logging: true, in: &batch)
                for (index, ring) in running.rings.sorted(by: { $0.key < $1.key }) {
                    try setRingAddress(index, ring.queue, memory: running.memory, logging: true, in: &batch)
                }
                try finish(batch)
                s.log = log
            } catch let failure as LinkFailure {
                // The backend is away and writes nothing; the reconnect sends the log first.
                s.log = log
                linkLost(&s, link, failure.description)
            }
        }
    }

    func collectDirty(into bitmap: inout [UInt64]) {
        session.withLock { $0.log }?.collect(into: &bitmap)
    }

    /// LOG_ALL off and the rings' logging off; the backend keeps the mapping until the
    /// next SET_LOG_BASE or reset, as with QEMU.
    func stopDirtyLog() {
        session.withLock { s in
            settle(&s)
            guard s.log != nil else { return }
            s.log = nil
            guard let running = s.running, !running.refused, let link = s.link else { return }
            do {
                var batch = Batch(link: link)
                try setFeatures(logging: false, in: &batch)
                for (index, ring) in running.rings.sorted(by: { $0.key < $1.key }) {
                    try setRingAddress(index, ring.queue, memory: running.memory, logging: false, in: &batch)
                }
                try finish(batch)
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
        return VhostUserDatapath(netdev: self, pairs: pairs, memory: memory)
    }
}

/// The rings of a vhost-user netdev, run by the backend; the netdev keeps them (to send
/// them again after a reconnect), pre-copy's dirty log, and talks to the backend.
public final class VhostUserDatapath: NetDatapath, @unchecked Sendable {
    let netdev: VhostUserNetdev
    public let queuePairs: Int
    let memory: GuestMemory

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
        netdev.handOverConnection().map { [NamedFD(name: NamedFD.vhostUserConnectionName(netdev: netdev.id), fd: $0)] } ?? []
    }
    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws { try netdev.adoptIncoming(fds, vnetHeader: vnetHeader) }

    public var handsOverForCPR: Bool { netdev.cpr }

    /// cpr-transfer, the device paused (the rings stopped: GET_VRING_BASE): the connection
    /// goes to the next VMM as in a local migration, `netdev/<id>/vhost-user`. This end lets
    /// go, vhost-user's side of the reset: it sends nothing more, does not reconnect and
    /// only closes its copy, unless the handover is cancelled. The next VMM speaks to the
    /// backend (no SET_OWNER: it is owned) only when its rings run.
    public func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD] { handedOverFDs() }

    public func cancelHandover(_ context: HandoverContext, host: DeviceHost) { netdev.takeBackConnection() }

    public var linkUp: Bool { netdev.linkUp }

    public func start(_ rings: [Int: RingHandoff], activePairs: Int, context: DatapathContext) {
        netdev.startRings(.init(rings: rings, memory: context.memory, activePairs: activePairs, context: context))
    }

    public func stop() -> [Int: Virtqueue] { netdev.stopRings() }

    public func setActivePairs(_ pairs: Int) { netdev.setActivePairs(pairs) }

    public func startDirtyLog() throws { try netdev.startDirtyLog(covering: memory) }
    public func collectDirty(into bitmap: inout [UInt64]) { netdev.collectDirty(into: &bitmap) }
    public func stopDirtyLog() { netdev.stopDirtyLog() }
}
