import CLinux
import Glibc
import Synchronization

/// The device side of vhost-user-net (the `vhost-user-net` executable's core): answers a
/// front-end's messages (`handle`), validates every ring against the memory table, and
/// moves frames between TAP queue p and guest rings 2p (RX) / 2p+1 (TX) on a datapath
/// thread of its own. It outlives connections: `serve` runs one front-end to its end, then
/// the rings stop and the TAP (with the frames waiting in it) stays for the next.
public final class VhostUserNetBackend: @unchecked Sendable {
    public static let maxRingSize: UInt32 = 32768
    static let versionOne: UInt64 = 1 << 32
    static let netMultiQueue: UInt64 = 1 << 22
    public static let features = versionOne | netMultiQueue | VhostUserFeature.protocolFeatures | VhostUserFeature.logAll
    public static let protocolFeatures = VhostUserProtocolFeature.mq | VhostUserProtocolFeature.replyAck
        | VhostUserProtocolFeature.resetDevice | VhostUserProtocolFeature.logSHMFD

    public let queuePairs: Int
    let tapFDs: [FileDescriptor]
    let tapVnetHeader: Bool
    let log: @Sendable (String) -> Void

    struct Ring {
        var num: UInt32?
        var address: VhostUserVringAddress?
        var base: UInt16 = 0
        var kick: FileDescriptor?
        var call: FileDescriptor?
        var err: FileDescriptor?
        /// SET_VRING_KICK arrived since the last stop (the spec starts a ring on it).
        var kicked = false
        var enabled = false
        /// Set while the ring runs: its layout in guest physical terms and its progress.
        var queue: Virtqueue?
        /// RX: the guest may have posted buffers since the ring last ran dry.
        var rxHasBuffers = true
        /// Just started: work the guest posted while it was stopped waits for no kick.
        var needsPass = false
    }

    struct State {
        var rings: [Ring]
        var table: VhostUserMemoryTable?
        /// SET_LOG_BASE's log; written only while LOG_ALL is negotiated (`updateLogging`).
        var log: VhostDirtyLog?
        var features: UInt64 = 0
        var protocolFeatures: UInt64 = 0
        var counters = (rx: UInt64(0), tx: UInt64(0))
    }
    let state: Mutex<State>
    /// Tells the datapath thread that the rings changed (its poll set is stale).
    let wake: EventFD
    let running = Atomic<Bool>(true)
    private var thread: OSThread?

    public init(queuePairs: Int, tapFDs: [FileDescriptor], tapVnetHeader: Bool,
                log: @escaping @Sendable (String) -> Void = { _ in }) throws {
        guard queuePairs >= 1, queuePairs == tapFDs.count else {
            throw VhostUserError("vhost-user-net: \(queuePairs) queue pairs need as many TAP queues (have \(tapFDs.count))")
        }
        self.queuePairs = queuePairs
        self.tapFDs = tapFDs
        self.tapVnetHeader = tapVnetHeader
        self.log = log
        state = Mutex(State(rings: Array(repeating: Ring(), count: 2 * queuePairs)))
        wake = try EventFD(label: "vhost-user-net datapath wake")
    }

    /// Starts the datapath thread (once).
    public func start() throws {
        guard thread == nil else { return }
        thread = try OSThread(name: "vu-net datapath") { [self] in runDatapath() }
    }

    /// Stops and joins the datapath thread.
    public func shutdown() {
        running.store(false, ordering: .relaxed)
        wake.signal()
        thread?.join()
        thread = nil
    }

    /// Frames received from and sent to the guest since start.
    public var statistics: (rx: UInt64, tx: UInt64) { state.withLock { $0.counters } }

    // MARK: connection

    /// Serves one front-end until it disconnects or sends something malformed: then an
    /// error reply (when it asked for one), a log line, and the connection is closed.
    /// Either way every ring stops and the device resets for the next front-end.
    public func serve(_ connection: VhostUserConnection) {
        defer {
            resetDevice()
            connection.socket.close()
        }
        while true {
            let received: VhostUserReceived
            do {
                guard let next = try connection.receive() else {
                    log("front-end disconnected")
                    return
                }
                received = next
            } catch let error as VhostUserError {
                if let header = error.header, header.flags.contains(.needReply), let request = VhostUserRequest(rawValue: header.request) {
                    try? connection.send(.reply(request, 1))
                }
                log("\(error); closing the connection")
                return
            } catch {
                log("\(error); closing the connection")
                return
            }
            let request = received.message.request
            let needReply = received.flags.contains(.needReply)
            do {
                let reply = try handle(received)
                if let reply {
                    try connection.send(reply)
                } else if needReply {
                    try connection.send(.reply(request, 0))
                }
            } catch {
                if needReply { try? connection.send(.reply(request, 1)) }
                log("\(error); closing the connection")
                return
            }
        }
    }

    // MARK: messages

    /// Applies one message; returns the reply it has (GET_*), nil for the others. Throws a
    /// `VhostUserError` naming the message when it cannot be applied.
    public func handle(_ received: VhostUserReceived) throws -> VhostUserMessage? {
        let name = received.message.request.name
        let fds = received.fds
        defer { wake.signal() }
        return try state.withLock { s -> VhostUserMessage? in
            func ring(_ index: UInt32) throws -> Int {
                guard index < UInt32(s.rings.count) else {
                    throw VhostUserError("vhost-user \(name): ring \(index) out of range (this backend has \(s.rings.count) rings for \(queuePairs) queue pairs)")
                }
                return Int(index)
            }
            switch received.message {
            case .getFeatures:
                return .reply(.getFeatures, Self.features)
            case .setFeatures(let value):
                guard value & ~Self.features == 0 else {
                    throw VhostUserError("vhost-user \(name): features \(hex(value)) include \(hex(value & ~Self.features)), which this backend did not offer")
                }
                s.features = value
                try Self.updateLogging(&s, name)
                return nil
            case .getProtocolFeatures:
                return .reply(.getProtocolFeatures, Self.protocolFeatures)
            case .setProtocolFeatures(let value):
                guard value & ~Self.protocolFeatures == 0 else {
                    throw VhostUserError("vhost-user \(name): protocol features \(hex(value)) include \(hex(value & ~Self.protocolFeatures)), which this backend did not offer")
                }
                s.protocolFeatures = value
                return nil
            case .getQueueNum:
                return .reply(.getQueueNum, UInt64(queuePairs))
            case .setOwner:
                return nil
            case .resetOwner, .resetDevice:
                Self.reset(&s)
                return nil
            case .setMemTable(let regions):
                let table = try VhostUserMemoryTable(regions: regions, fds: fds)
                s.table = table
                try Self.updateLogging(&s, name)
                // Running rings keep their progress and move to the new table.
                for i in s.rings.indices where s.rings[i].queue != nil {
                    let progress = s.rings[i].queue!
                    s.rings[i].queue = nil
                    try startIfReady(&s, i, name, progress: progress)
                }
                return nil
            case .setLogBase(let size, let offset):
                guard s.protocolFeatures & VhostUserProtocolFeature.logSHMFD != 0 else {
                    throw VhostUserError("vhost-user \(name): the log comes as an fd only with LOG_SHMFD, which was not negotiated")
                }
                defer { for fd in fds { fd.close() } }
                do {
                    s.log = try VhostDirtyLog(mapping: fds[0], size: size, offset: offset)
                } catch {
                    throw VhostUserError("vhost-user \(name): \(error)")
                }
                try Self.updateLogging(&s, name)
                // The spec's one request that answers without NEED_REPLY (QEMU waits for it).
                return .reply(.setLogBase, 0)
            case .setLogFD:
                throw VhostUserError("vhost-user \(name): not supported (this backend logs through the shared memory of SET_LOG_BASE)")
            case .setVringNum(let st):
                let i = try ring(st.index)
                guard st.num >= 1, st.num <= Self.maxRingSize, st.num & (st.num - 1) == 0 else {
                    throw VhostUserError("vhost-user \(name): ring \(i) size \(st.num) must be a power of two 1...\(Self.maxRingSize)")
                }
                guard s.rings[i].queue == nil else { throw VhostUserError("vhost-user \(name): ring \(i) is running") }
                s.rings[i].num = st.num
                return nil
            case .setVringBase(let st):
                let i = try ring(st.index)
                guard st.num <= 0xFFFF else { throw VhostUserError("vhost-user \(name): ring \(i) base \(st.num) exceeds 65535") }
                guard s.rings[i].queue == nil else { throw VhostUserError("vhost-user \(name): ring \(i) is running") }
                s.rings[i].base = UInt16(st.num)
                return nil
            case .setVringAddr(let address):
                let i = try ring(address.index)
                s.rings[i].address = address
                if let progress = s.rings[i].queue {
                    s.rings[i].queue = nil
                    try startIfReady(&s, i, name, progress: progress)
                }
                return nil
            case .getVringBase(let st):
                let i = try ring(st.index)
                let base = Self.stop(&s.rings[i])
                s.rings[i].kicked = false
                s.rings[i].kick = nil
                return .vringBaseReply(VhostUserVringState(index: st.index, num: UInt32(base)))
            case .setVringKick(let file):
                let i = try ring(UInt32(file.index))
                s.rings[i].kick = fds.first
                s.rings[i].kicked = true
                try startIfReady(&s, i, name)
                return nil
            case .setVringCall(let file):
                s.rings[try ring(UInt32(file.index))].call = fds.first
                return nil
            case .setVringErr(let file):
                s.rings[try ring(UInt32(file.index))].err = fds.first
                return nil
            case .setVringEnable(let st):
                let i = try ring(st.index)
                guard st.num <= 1 else { throw VhostUserError("vhost-user \(name): ring \(i) enable value \(st.num) is not 0 or 1") }
                s.rings[i].enabled = st.num == 1
                if st.num == 1 {
                    try startIfReady(&s, i, name)
                } else {
                    _ = Self.stop(&s.rings[i])
                }
                return nil
            case .reply, .vringBaseReply:
                throw VhostUserError("vhost-user \(name): a reply sent to the backend")
            }
        }
    }

    /// Ends every ring and forgets the front-end's table and features (RESET_OWNER,
    /// RESET_DEVICE, disconnect); the TAP stays.
    public func resetDevice() {
        state.withLock { Self.reset(&$0) }
        wake.signal()
    }

    static func reset(_ s: inout State) {
        for i in s.rings.indices { s.rings[i] = Ring() }
        s.table = nil
        s.log = nil
        s.features = 0
        s.protocolFeatures = 0
    }

    /// Every write through the table (used rings, headers, RX buffers) is logged while
    /// LOG_ALL is negotiated and a log was given. That includes each used ring whether or
    /// not its SET_VRING_ADDR asked (VHOST_VRING_F_LOG): the ring's guest address comes
    /// from the table, so the front-end's `log` address adds nothing.
    /// A log too small for the table would silently lose pages: refused, naming both.
    static func updateLogging(_ s: inout State, _ name: String) throws {
        if let log = s.log, let table = s.table, log.pageCount * VhostDirtyLog.pageSize < table.guestEnd {
            s.log = nil
            throw VhostUserError("vhost-user \(name): the log of \(log.size) bytes covers guest memory up to \(hex(log.pageCount * VhostDirtyLog.pageSize)), but the memory table reaches \(hex(table.guestEnd))")
        }
        s.table?.dirtyLog = s.features & VhostUserFeature.logAll != 0 ? s.log : nil
    }

    /// Stops a ring; returns where it stopped (the next available index), which is also
    /// where it resumes unless SET_VRING_BASE says otherwise.
    static func stop(_ ring: inout Ring) -> UInt16 {
        if let queue = ring.queue { ring.base = queue.lastAvailable }
        ring.queue = nil
        return ring.base
    }

    /// Runs ring `i` once it has a kick, is enabled (always, without PROTOCOL_FEATURES)
    /// and has its size, addresses and a memory table: each ring area must translate into
    /// one region and pass `Virtqueue`'s layout checks. `progress`: a running ring moving
    /// to a new table or address keeps its indices.
    func startIfReady(_ s: inout State, _ i: Int, _ name: String, progress: Virtqueue? = nil) throws {
        let r = s.rings[i]
        let enabled = r.enabled || s.features & VhostUserFeature.protocolFeatures == 0
        guard r.kicked, enabled, r.queue == nil else { return }
        guard let num = r.num, let address = r.address, let table = s.table else {
            let missing = [r.num == nil ? "SET_VRING_NUM" : nil, r.address == nil ? "SET_VRING_ADDR" : nil,
                           s.table == nil ? "SET_MEM_TABLE" : nil].compactMap { $0 }
            throw VhostUserError("vhost-user \(name): ring \(i) cannot start without \(missing.joined(separator: ", "))")
        }
        func translate(_ what: String, _ user: UInt64, _ length: UInt64) throws -> UInt64 {
            guard let gpa = table.guestAddress(ofUser: user, count: length) else {
                throw VhostUserError("vhost-user \(name): ring \(i)'s \(what) at user address \(hex(user))+\(length) is not inside one memory region")
            }
            return gpa
        }
        let n = UInt64(num)
        var queue = Virtqueue(maxSize: UInt16(Self.maxRingSize))
        queue.size = UInt16(num)
        queue.ready = true
        queue.descriptorTable = try translate("descriptor table", address.descriptor, 16 * n)
        queue.driverArea = try translate("available ring", address.available, 6 + 2 * n)
        queue.deviceArea = try translate("used ring", address.used, 6 + 8 * n)
        do {
            try queue.validateLayout(in: table)
            if let progress {
                queue.lastAvailable = progress.lastAvailable
                queue.usedIndex = progress.usedIndex
            } else {
                queue.lastAvailable = r.base
                // The used index lives in guest RAM; the front-end does not send it.
                queue.usedIndex = try table.loadLE(UInt16.self, at: queue.deviceArea + 2)
            }
        } catch {
            throw VhostUserError("vhost-user \(name): ring \(i): \(error)")
        }
        s.rings[i].queue = queue
        s.rings[i].rxHasBuffers = true
        s.rings[i].needsPass = true
    }

    // MARK: datapath (its own thread)

    enum Ready { case wake, kick(Int), tap(Int) }

    func runDatapath() {
        while running.load(ordering: .relaxed) {
            var watched: [FileDescriptor] = [wake.fd]
            var roles: [Ready] = [.wake]
            // Rings to work on without a kick: just started, or set up with NOFD (the
            // spec's polling mode, checked every millisecond).
            var passes: [Int] = []
            var polling = false
            state.withLock { s in
                for (i, r) in s.rings.enumerated() where r.queue != nil {
                    if let kick = r.kick {
                        watched.append(kick)
                        roles.append(.kick(i))
                    } else {
                        polling = true
                    }
                    if r.needsPass || r.kick == nil {
                        passes.append(i)
                        s.rings[i].needsPass = false
                    }
                    if i % 2 == 0 && r.rxHasBuffers {
                        watched.append(tapFDs[i / 2])
                        roles.append(.tap(i / 2))
                    }
                }
            }
            for i in passes { pass(ring: i) }
            // The references in `watched` keep every fd open until poll returns.
            var requests = watched.map { $0.pollRequest() }
            let n = poll(&requests, nfds_t(requests.count), polling ? 1 : 1000)
            guard n > 0 else { continue }
            for (index, (request, role)) in zip(requests, roles).enumerated() where request.revents != 0 {
                switch role {
                case .wake:
                    wake.drain()
                case .kick(let i):
                    var value: UInt64 = 0
                    _ = watched[index].withRaw { read($0, &value, 8) }
                    pass(ring: i)
                case .tap(let p):
                    receive(pair: p)
                }
            }
        }
    }

    /// Works on ring `i` as its kick asks: TX sends what is available, RX polls its TAP
    /// queue again (the guest posted buffers) and fills them.
    func pass(ring i: Int) {
        if i % 2 == 1 {
            transmit(pair: i / 2)
        } else {
            state.withLock { $0.rings[i].rxHasBuffers = true }
            receive(pair: i / 2)
        }
    }

    /// Runs `body` on ring `i` if it runs; a guest error stops the ring (logged once, its
    /// err eventfd signalled). Afterwards the call eventfd is signalled if `body` published.
    private func withRing(_ i: Int, _ body: (inout Virtqueue, VhostUserMemoryTable) throws -> Bool) {
        state.withLock { s in
            guard var queue = s.rings[i].queue, let table = s.table else { return }
            do {
                let published = try body(&queue, table)
                s.rings[i].queue = queue
                if published, let call = s.rings[i].call { Self.signal(call) }
            } catch {
                log("ring \(i): \(error); the ring stops until the front-end restarts it")
                s.rings[i].base = queue.lastAvailable
                s.rings[i].queue = nil
                if let err = s.rings[i].err { Self.signal(err) }
            }
        }
    }

    static func signal(_ fd: FileDescriptor) {
        var one: UInt64 = 1
        _ = fd.withRaw { write($0, &one, 8) }
    }

    func transmit(pair: Int) {
        let fd = tapFDs[pair]
        let strip = tapVnetHeader ? 0 : TapBackend.vnetHeaderSize
        var sent: UInt64 = 0
        withRing(2 * pair + 1) { queue, table in
            var published = false
            while let chain = try queue.popAvailable(from: table) {
                let (iov, _) = try UserspaceTapDatapath.iovecs(chain.readable, in: table, splittingOff: strip)
                if !iov.isEmpty && fd.withRaw({ writev($0, iov, Int32(iov.count)) }) >= 0 { sent += 1 }
                try queue.pushUsed(head: chain.head, length: 0, to: table)
                published = true
            }
            return published
        }
        if sent > 0 { state.withLock { $0.counters.tx += sent } }
    }

    func receive(pair: Int) {
        let fd = tapFDs[pair]
        let inline = tapVnetHeader
        var delivered: UInt64 = 0
        var ranDry = false
        withRing(2 * pair) { queue, table in
            var published = false
            while true {
                guard let chain = try queue.popAvailable(from: table) else {
                    ranDry = true
                    return published
                }
                let (iov, headerSlices) = try UserspaceTapDatapath.iovecs(
                    chain.writable, in: table, splittingOff: inline ? 0 : TapBackend.vnetHeaderSize)
                guard chain.writableLength >= TapBackend.vnetHeaderSize, !iov.isEmpty,
                      iov.count <= UserspaceTapDatapath.maxReceiveSegments else {
                    throw VirtqueueError(description: "RX chain of \(chain.writableLength) bytes in \(iov.count) segments cannot take a frame")
                }
                let n = fd.withRaw { readv($0, iov, Int32(iov.count)) }
                if n < 0 {
                    queue.lastAvailable &-= 1  // nothing to read: the chain waits for the next frame
                    return published
                }
                for slice in headerSlices { slice.initializeMemory(as: UInt8.self, repeating: 0) }
                // num_buffers (the header's last field) is 1: one chain per frame.
                if let header = try? table.slice(at: chain.writable[0].address, count: 12), chain.writable[0].length >= 12 {
                    header.storeBytes(of: UInt16(1).littleEndian, toByteOffset: 10, as: UInt16.self)
                }
                let written = n + (inline ? 0 : TapBackend.vnetHeaderSize)
                table.markWritten(chain.writable, bytes: written)
                try queue.pushUsed(head: chain.head, length: UInt32(written), to: table)
                published = true
                delivered += 1
            }
        }
        state.withLock { s in
            if ranDry { s.rings[2 * pair].rxHasBuffers = false }
            s.counters.rx += delivered
        }
    }
}
