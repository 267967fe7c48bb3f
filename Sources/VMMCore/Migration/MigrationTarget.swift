import CLinux
import Glibc
import QMPWire

/// `-incoming` / `migrate-incoming`: listen on each channel given, accept one connection
/// per channel, and run its stream through the target's `IncomingMigration` on a thread
/// of its own (the vCPU has never run); the main channel acknowledges at the end.
extension Machine {
    func startIncoming(_ channels: MigrationChannels, exitOnError: Bool = true) throws {
        guard runState == .inmigrate else { throw QMPCommandError("The incoming migration can only start in state 'inmigrate' (-incoming defer)") }
        // Part of a failed stream may have loaded (RAM, registers, adopted TAP queues):
        // a second attempt would start from that, so this target is spent.
        guard migration.status != .failed else {
            throw QMPCommandError("An incoming migration failed here before (\(migration.error ?? "")); start a new target")
        }
        // The cpr channel is read first in `start`, before netdevs and the monitor exist.
        precondition(channels.cpr == nil, "the cpr channel is given to receiveCPRState")
        guard let main = channels.main, migration.incomingChannels.main == nil, migration.status != .completed else {
            throw QMPCommandError("An incoming migration is already set up")
        }
        migration.exitOnError = exitOnError
        // A cpr-transfer target bound its command line's main channel before the cpr state.
        let listener = try migration.incomingListeners.removeValue(forKey: .main) ?? incomingListener(main, for: .main)
        if let incoming = migration.incoming {
            // cpr-transfer: the cpr state came first; the devices exist only now.
            incoming.retarget(incomingTarget())
        } else {
            migration.incoming = IncomingMigration(expectsCPR: false, target: incomingTarget())
        }
        migration.incomingChannels.main = main
        migration.incomingListeners[.main] = listener
        let acceptor = listener.withRaw { raw in
            ClientAcceptor(fd: raw, what: "main migration listener", loop: loop, logger: logger) { [unowned self] fd in
                connected(fd, .main, early: false)
            }
        }
        migration.incomingAcceptors[.main] = acceptor
        migration.mark("main listening")
        // A cpr-transfer source connected while this target took the cpr state in: its
        // stream loads now, before the rest of the start-up.
        acceptor.acceptPending { [unowned self] fd in connected(fd, .main, early: true) }
        // A source that found no listener on the main channel waits for the cpr channel to
        // close (QEMU's HUP) before it connects again: now there is one.
        if let cpr = migration.cprChannel {
            migration.cprChannel = nil
            cpr.abort()
        }
    }

    /// A listening socket for one channel: a unix path (unlinked when closed), tcp, or an
    /// inherited / `getfd` fd.
    private func incomingListener(_ uri: MigrationURI, for type: MigrationChannelType) throws -> FileDescriptor {
        switch uri {
        case .unix(let path):
            let listener = FileDescriptor(adopting: try UnixSocket.listen(path: path, backlog: 1), label: "\(type) migration listener")
            migration.incomingPaths[type] = path
            return listener
        case .tcp(let host, let port):
            return FileDescriptor(adopting: try TCPSocket.listen(host: host, port: port), label: "\(type) migration listener")
        case .fd(let name):
            return try listeningSocket(name, for: type)
        }
    }

    /// A cpr-transfer target whose command line names the main channel listens on it before
    /// it waits for the cpr state: the source then sends the main stream right behind the
    /// cpr state, without waiting for the cpr channel to close, and it waits in the socket
    /// until `startIncoming` accepts it, after the devices were built.
    func listenEarly(_ main: MigrationURI) throws {
        migration.incomingListeners[.main] = try incomingListener(main, for: .main)
    }

    /// cpr-transfer's first step on the target, as QEMU's `cpr_state_load`: called by
    /// `start`, after RAM exists and before netdevs, devices and the monitor. Blocks (the
    /// control thread has nothing else to do yet) until the source connected the cpr
    /// channel and its cpr state was applied: the RAM fd mapped in place, the netdevs'
    /// fds kept for `cpr=on` netdevs to claim by id. A termination signal ends the wait.
    /// The channel stays open until the main channel listens: its closing tells the
    /// source to connect that one.
    func receiveCPRState(_ uri: MigrationURI) throws {
        let listener = try incomingListener(uri, for: .cpr)
        migration.incomingChannels.cpr = uri
        logger.info("cpr-transfer: waiting for the cpr state on \(uri)")
        let client: Int32
        do {
            client = try listener.withRaw { try signals.waitForClient(on: $0) }
        } catch {
            listener.close()
            if let path = migration.incomingPaths.removeValue(forKey: .cpr) { unlink(path) }
            throw error
        }
        migration.mark("cpr connected")
        listener.close()
        if let path = migration.incomingPaths.removeValue(forKey: .cpr) { unlink(path) }
        let channel = MigrationChannel(socket: FileDescriptor(adopting: client, label: "cpr migration connection"))
        let incoming = IncomingMigration(expectsCPR: true, target: incomingTarget())
        migration.incoming = incoming
        // Read on a thread of its own, so that this one can watch for termination signals.
        // That thread then stays for the main channel (`receive(on:)`): a thread started
        // inside the downtime took 0.1-0.7 ms here before it ran.
        let done = try EventFD(label: "cpr state received")
        let failure = ConditionLock<String?>(nil)
        let reader = IncomingReader()
        migration.incomingReader = reader
        _ = try OSThread(name: "migration-in") {
            do {
                // The source connects just before it stops its guest: poll for what follows.
                try incoming.begin(.cpr, header: try channel.receive(MigrationStream.headerSize, what: "the cpr channel's stream header", pollFirst: true),
                                   fds: channel.received)
                while try incoming.receive(try channel.receiveSection(version: incoming.version(of: .cpr), pollFirst: true), on: .cpr) != .finished {}
            } catch {
                let message = incoming.fail(error)
                failure.update { $0 = message }
            }
            let applied = failure.read({ $0 }) == nil
            done.signal()
            if applied { reader.serve(pollingFor: MigrationChannel.spinNanoseconds) }
        }
        // The source stopped its guest by now, or is about to: poll (yielding) a while
        // before sleeping, as the source does, so that this thread's wake-up (up to 0.7 ms
        // here) stays out of the downtime.
        let pollUntil = monotonicNanoseconds() + MigrationChannel.spinNanoseconds
        while true {
            var fds = [done.fd.pollRequest(), pollfd(fd: signals.fd, events: Int16(POLLIN), revents: 0)]
            let polling = monotonicNanoseconds() < pollUntil
            let ready = poll(&fds, 2, polling ? 0 : -1)
            if ready < 0 { continue }
            if ready == 0 {
                sched_yield()
                continue
            }
            if fds[0].revents != 0 { break }
            if fds[1].revents != 0, let signal = signals.take() {
                channel.abort()
                done.wait(timeoutMilliseconds: -1)
                throw TerminationRequested(signal: signal)
            }
        }
        migration.mark("cpr state taken")
        if let message = failure.read({ $0 }) {
            migration.incomingReader = nil
            throw VMMConfiguration.Error("-incoming cpr channel \(uri): the cpr state could not be applied: \(message)")
        }
        migration.cprChannel = channel
        // The command-line flow: the source connected the main channel right behind the cpr
        // state, so this thread will read its stream (`receive(on:)`); the reader thread
        // would only poll for it, on a core the loading needs.
        if let main = migration.incomingListeners[.main], main.withRaw({ Self.hasPendingClient($0) }) {
            migration.incomingReader = nil
            reader.give {}
        }
        logger.info("cpr-transfer: cpr state applied (\(incoming.cprState?.netdevs.count ?? 0) netdev(s) handed over)")
    }

    private static func hasPendingClient(_ listener: Int32) -> Bool {
        var request = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        return poll(&request, 1, 0) == 1
    }

    /// `fd:N`: a listening socket this process inherited (the command line) or got with
    /// `getfd` (QMP). An inherited number stays open, as `-netdev fd=N` leaves it.
    private func listeningSocket(_ name: String, for type: MigrationChannelType) throws -> FileDescriptor {
        let label = "\(type) migration listener fd:\(name)"
        let fd: FileDescriptor
        if let named = namedFDs[name] {
            fd = named
        } else if let number = Int32(name), number >= 0 {
            fd = try FileDescriptor.duplicating(inherited: number, label: label)
        } else {
            throw QMPCommandError("fd '\(name)' is neither an fd number nor a name given with getfd")
        }
        var accepting: Int32 = 0
        var length = socklen_t(MemoryLayout<Int32>.size)
        let rc = fd.withRaw { getsockopt($0, SOL_SOCKET, SO_ACCEPTCONN, &accepting, &length) }
        guard rc == 0, accepting != 0 else {
            throw QMPCommandError("fd \(name) is not a listening socket (\(rc == 0 ? "not listening" : String(cString: strerror(errno))))")
        }
        namedFDs[name] = nil
        return fd
    }

    /// What this machine's migration loads into.
    func incomingTarget() -> IncomingTarget {
        IncomingTarget(description: machineDescription(), devices: devices, memory: memory,
                       netdevOf: Dictionary(uniqueKeysWithValues: netdevUsers.map { ($1, $0) }), progress: migration,
                       restoreVCPU: { [vcpuRunner] in try $0.restore(into: vcpuRunner.vcpu) })
    }

    func closeIncomingListener(_ type: MigrationChannelType) {
        guard let listener = migration.incomingListeners.removeValue(forKey: type) else { return }
        migration.incomingAcceptors.removeValue(forKey: type)?.close()
        listener.close()
        if let path = migration.incomingPaths.removeValue(forKey: type) { unlink(path) }
    }

    func closeIncomingListeners() {
        for type in MigrationChannelType.allCases { closeIncomingListener(type) }
        // No main channel will come: the thread that read the cpr state ends.
        migration.incomingReader?.give {}
        migration.incomingReader = nil
    }

    /// The main channel connected (the cpr state, if any, was applied in `start`); `early`:
    /// the source connected before this target listened for it (`startIncoming`'s
    /// `acceptPending`: the cpr-transfer command-line flow).
    private func connected(_ fd: Int32, _ type: MigrationChannelType, early: Bool) {
        closeIncomingListener(type)
        let channel = MigrationChannel(socket: FileDescriptor(adopting: fd, label: "\(type) migration connection"))
        guard let incoming = migration.incoming else { return }
        migration.mark("\(type) connected")
        if migration.status == .none {
            migration.reset(ramTotal: memory.size, now: monotonicNanoseconds())
            migration.outgoing = false
            setMigrationStatus(.setup)
            setMigrationStatus(.active)
        }
        receive(on: channel, type, into: incoming, early: early)
    }

    /// Reads the channel's stream into `incoming` on a thread of its own; the control thread
    /// then goes on with the start-up or the event loop. Except in the cpr-transfer
    /// command-line flow (`early`): the source sent the whole main stream right behind the
    /// cpr state, so it waits in the socket already, and handing it to the reader thread
    /// would cost that thread's wake-up (median 262 us on this 2-core host) inside the
    /// downtime. This thread reads it first, as far as whole sections are queued (it never
    /// blocks there, away from the signalfd); the reader thread, or a new one if it was
    /// let go, reads whatever is left.
    private func receive(on channel: MigrationChannel, _ type: MigrationChannelType, into incoming: IncomingMigration, early: Bool) {
        let reading = IncomingChannelReading(channel: channel, type: type, incoming: incoming)
        // Reads on; when the stream ended (or failed), posts its end to the control thread and
        // returns true. Posted even from this thread: `start` resumes nothing of an 'inmigrate'
        // machine, and the migration's end must come after that.
        let read: @Sendable (_ queuedOnly: Bool) -> Bool = { [self] queuedOnly in
            var failure: String?
            do {
                guard try reading.advance(queuedOnly: queuedOnly) else { return false }
                if type == .main {
                    try channel.send([Self.acknowledgement])
                    migration.mark("acknowledged")
                }
            } catch {
                failure = incoming.fail(error)
            }
            let result = failure
            loop.post { [self] in channelFinished(type, error: result) }
            return true
        }
        if early, type == .main, incoming.cprState != nil {
            migration.mark("\(type) read here")
            if read(true) {
                // The thread that read the cpr state, if it still waits, has nothing left to do.
                migration.incomingReader?.give {}
                migration.incomingReader = nil
                return
            }
        }
        do {
            try onReaderThread { [self] in
                migration.mark("\(type) thread")
                _ = read(false)
            }
        } catch {
            channelFinished(type, error: incoming.fail(error))
        }
    }

    /// Runs `body` on the thread that read the cpr state, if it waits for the main channel,
    /// else on a new thread.
    private func onReaderThread(_ body: @escaping @Sendable () -> Void) throws {
        if let reader = migration.incomingReader {
            migration.incomingReader = nil
            reader.give(body)
        } else {
            _ = try OSThread(name: "migration-in", body)
        }
    }

    /// Back on the control thread: the main channel ends the migration.
    private func channelFinished(_ type: MigrationChannelType, error: String?) {
        guard migration.status == .active else { return }
        finishIncoming(error: error)
    }

    func finishIncoming(error: String?) {
        migration.endTime = monotonicNanoseconds()
        migration.mark("finished")
        logger.debug("incoming migration timeline: \(migration.takeTimeline())")
        if let error {
            closeIncomingListeners()
            migration.error = error
            logger.error("incoming migration failed: \(error)")
            setMigrationStatus(.failed)
            // QEMU's exit-on-error (default on): a target that could not load exits;
            // without it, it stays in 'inmigrate' for query-migrate and quit.
            if migration.exitOnError { loop.stop(exitStatus: 1) }
            return
        }
        // Like QEMU, a paused target leaves frames in the TAP until `cont`: reading them
        // now would only fill the guest's ring, on the cores the switch-over still needs.
        // Its devices were never resumed; `cont` does that.
        setMigrationStatus(.completed)
        runState = .paused
    }
}

/// The target's loading of every section but the vCPU's, into the devices and RAM of a
/// machine that never ran: what `IncomingMigration` uses, and what the stream fixtures
/// are checked with (no KVM needed).
struct IncomingSections {
    let devices: [any MachineDevice]
    let memory: GuestMemory
    let sourceRAMFile: String?
    let fds: ReceivedFDs
    let progress: MigrationState
    /// Ids of the devices (and the vCPU) whose state arrived.
    var loaded: Set<String> = []
    var ramArrived = false
    var ramEmptied = false

    init(devices: [any MachineDevice], memory: GuestMemory, sourceRAMFile: String?, fds: ReceivedFDs, progress: MigrationState) {
        self.devices = devices
        self.memory = memory
        self.sourceRAMFile = sourceRAMFile
        self.fds = fds
        self.progress = progress
    }

    mutating func load(_ section: MigrationStream.Section) throws {
        // Any section may carry fds; whatever no device claims is reported at the end.
        try fds.bind(section.fdNames, for: section.label)
        switch section.kind {
        case .ram:
            // The source leaves zero pages out: whatever this RAM held must go first.
            if !ramEmptied {
                try memory.emptyForCopy(sourceRAMFile: sourceRAMFile)
                ramEmptied = true
            }
            try RAMTransfer.load(section.payload, into: memory, progress: progress)
            ramArrived = true
        case .sharedRAM:
            try SharedRAM.decode(section.payload).adopt(into: memory, fds: fds)
            ramArrived = true
        case .device:
            guard let device = devices.first(where: { $0.id == section.name }) else {
                throw StreamError("state for device '\(section.name)', which this machine does not have")
            }
            try device.loadSection(section.payload, fds: fds)
            loaded.insert(device.id)
        case .end:
            // Never start a guest without its memory, a device's state, or a NIC's backend.
            guard ramArrived else { throw StreamError("the stream carried no guest RAM") }
            let missing = (["cpu0"] + devices.map(\.id)).filter { !loaded.contains($0) }
            guard missing.isEmpty else { throw StreamError("the stream ended without state for \(missing.joined(separator: ", "))") }
            for device in devices { try device.checkReadyToRun() }
        case .configuration:
            throw StreamError("a second configuration section")
        case .vcpu, .switchover, .cprState:
            throw StreamError("\(section.label) is the machine's to load")
        }
    }
}

/// One channel's stream, read section by section into the target's `IncomingMigration`:
/// on the control thread while whole sections wait in the socket, then on a reader thread.
/// Used by one thread at a time (the hand-over to the reader thread orders them).
final class IncomingChannelReading: @unchecked Sendable {
    private let channel: MigrationChannel
    private let type: MigrationChannelType
    private let incoming: IncomingMigration
    private var begun = false

    init(channel: MigrationChannel, type: MigrationChannelType, incoming: IncomingMigration) {
        self.channel = channel
        self.type = type
        self.incoming = incoming
    }

    /// Reads until the stream ends (true); with `queuedOnly`, stops (false) before the first
    /// header or section that has not arrived whole, so that no read blocks.
    func advance(queuedOnly: Bool) throws -> Bool {
        if !begun {
            if queuedOnly && !channel.hasQueued(MigrationStream.headerSize) { return false }
            try incoming.begin(type, header: try channel.receive(MigrationStream.headerSize, what: "the \(type) channel's stream header",
                                                                 pollFirst: incoming.pollsForNext),
                               fds: channel.received)
            begun = true
        }
        while true {
            if queuedOnly && !channel.nextSectionQueued() { return false }
            let section = try channel.receiveSection(version: incoming.version(of: type), pollFirst: incoming.pollsForNext)
            let step = try incoming.receive(section, on: type)
            if step == .finished { return true }
            if step == .answerReadyToSwitchOver { try channel.send([Machine.readyToSwitchOver]) }
        }
    }
}

/// The thread that read a cpr-transfer target's cpr state, lent to the main channel's
/// stream: `serve` (on that thread) runs what `give` hands it, once.
final class IncomingReader: @unchecked Sendable {
    private let work = ConditionLock<(@Sendable () -> Void)?>(nil)

    /// Polls (yielding) for `nanoseconds` before it sleeps: the main channel comes within
    /// the downtime in the command-line flow, and a wake-up would cost it up to 0.7 ms.
    func serve(pollingFor nanoseconds: Int64) {
        let pollUntil = monotonicNanoseconds() + nanoseconds
        var body: (@Sendable () -> Void)?
        while body == nil && monotonicNanoseconds() < pollUntil {
            body = work.read { $0 }
            if body == nil { sched_yield() }
        }
        (body ?? work.wait(until: { $0 != nil }, then: { $0! })!)()
    }

    func give(_ body: @escaping @Sendable () -> Void) { work.update { $0 = body } }
}
