import CLinux
import Glibc
import QMPWire

/// `migrate`: live pre-copy while the guest runs, then stop, the last dirty pages and
/// the device state, and the target's acknowledgement. Any failure or migrate_cancel
/// puts the source back where it was.
extension Machine {
    func startMigration(to channels: OutgoingChannels) throws {
        let uri = channels.main
        guard !migration.isActive else { throw QMPCommandError("There's a migration process in progress") }
        guard [.running, .paused, .prelaunch].contains(runState) else {
            throw QMPCommandError("Cannot migrate in state '\(runState.rawValue)'")
        }
        // A device that would lose state blocks the migration, as QEMU's blockers do.
        if let blocker = devices.lazy.compactMap(\.migrationBlocker).first {
            throw QMPCommandError("disallowing migration: \(blocker)")
        }
        // Refused before anything happens to the guest: these cannot work on this channel.
        if isLocalMigration && !uri.carriesFileDescriptors {
            throw QMPCommandError("Migration parameter 'local' requires a unix socket channel, got '\(uri)'")
        }
        if channels.cpr != nil && !memory.shared {
            // The next process maps this RAM; a private mapping cannot be handed over.
            let backend = config.machineMemoryBackend.map { "memory backend '\($0)'" } ?? "guest RAM"
            throw QMPCommandError("Migration mode 'cpr-transfer' needs guest RAM the next process can map: \(backend) is private (share=off); use memory-backend-memfd or memory-backend-file with share=on")
        }
        let sharedRAM = migration.capabilities["x-ignore-shared"] == true && channels.cpr == nil ? try SharedRAM.describing(memory) : nil
        if case .memfd = sharedRAM, !uri.carriesFileDescriptors {
            throw QMPCommandError("x-ignore-shared: guest RAM is a shared memfd, which reaches the target only as a file descriptor over a unix socket, not '\(uri)'")
        }
        migration.reset(ramTotal: memory.size, now: monotonicNanoseconds())
        migration.outgoing = true
        setMigrationStatus(.setup)
        // Pre-copy only pays when the guest runs and its RAM must be copied.
        let live = runState == .running && sharedRAM == nil && channels.cpr == nil
        if live {
            do {
                try vm.setDirtyLogging(true, memory: memory)
            } catch {
                finishOutgoing(error: "cannot log dirty pages: \(error)")
                return
            }
            // From here `finishOutgoing` stops every log, also those of devices after one
            // that failed to start (stopping is idempotent).
            migration.dirtyLogging = true
            for device in devices {
                do {
                    try device.startDirtyLog()
                } catch {
                    finishOutgoing(error: "cannot log dirty pages: device '\(device.id)': \(error)")
                    return
                }
            }
        }
        var discard = [UInt64](repeating: 0, count: memory.deviceDirty.wordCount)
        memory.deviceDirty.take(into: &discard)

        let plan = OutgoingPlan(
            uri: uri, cpr: channels.cpr, sharedRAM: sharedRAM, live: live, configuration: machineDescription().encode(), devices: devices,
            maxBandwidth: UInt64(max(0, migration.parameters["max-bandwidth"]?.intValue ?? 0)),
            downtimeLimit: (migration.parameters["downtime-limit"]?.intValue ?? 300) * 1_000_000)
        let stopper = GuestStopper(machine: self)
        let loop = self.loop
        do {
            _ = try OSThread(name: "migration-out") { [self] in
                var failure: String?
                var acknowledged: Int64 = 0
                do {
                    acknowledged = plan.cpr != nil ? try transferCPR(plan, stopper: stopper) : try transferOutgoing(plan, stopper: stopper)
                } catch {
                    failure = "\(error)"
                }
                let result = failure
                let end = acknowledged
                loop.post { [self] in finishOutgoing(error: result, acknowledged: end) }
            }
        } catch {
            finishOutgoing(error: "\(error)")
        }
    }

    /// What the transfer thread needs to know, fixed when `migrate` is issued.
    struct OutgoingPlan: Sendable {
        var uri: MigrationURI
        /// cpr-transfer's cpr channel.
        var cpr: MigrationURI?
        /// Set when x-ignore-shared lets the RAM stay where it is.
        var sharedRAM: SharedRAM?
        /// Pre-copy while the guest runs (it runs, and its RAM must be copied).
        var live: Bool
        var configuration: [UInt8]
        /// The devices as `migrate` found them (their dirty logs are collected each pass).
        var devices: [any MachineDevice]
        var maxBandwidth: UInt64
        var downtimeLimit: Int64
    }

    /// The transfer thread: connect, configuration, RAM (shared, or pre-copy passes), the
    /// switch-over, stop, the last dirty pages and the state, the acknowledgement. Returns
    /// when the acknowledgement arrived (monotonic ns): the end of the downtime.
    func transferOutgoing(_ plan: OutgoingPlan, stopper: GuestStopper) throws -> Int64 {
        // Connecting (tcp may take long) happens here, not on the control thread.
        let channel = try MigrationChannel.connect(uri: plan.uri)
        migration.channel.withLock { $0 = channel }
        try migration.checkCancelled()
        loop.post { [self] in
            migration.setupDoneTime = monotonicNanoseconds()
            if migration.status == .setup { setMigrationStatus(.active) }
        }
        let transfer = RAMTransfer(memory: memory, channel: channel, progress: migration,
                                   maxBandwidth: plan.maxBandwidth, logger: logger, deviceLogs: plan.devices)
        try channel.send(MigrationStream.header())
        try channel.send(.init(kind: .configuration, payload: plan.configuration))
        var dirty: [UInt64]?
        if let sharedRAM = plan.sharedRAM {
            let fds = sharedRAM == .memfd(size: memory.size) ? [NamedFD(name: SharedRAM.memfdName, fd: memory.fd)] : []
            try channel.send(.init(kind: .sharedRAM, payload: sharedRAM.encode()), fds: fds)
        } else if plan.live {
            dirty = try transfer.precopy(vm: vm, downtimeLimit: plan.downtimeLimit)
        }
        try migration.checkCancelled()
        // The guest runs on until the target has taken in everything so far and is awake
        // for the rest: its catching up, and a wake-up from sleep (up to 0.7 ms on this
        // kind of machine), then stay out of the downtime.
        try channel.send(.init(kind: .switchover))
        let ready = try channel.receive(1, what: "the target's readiness to switch over", pollFirst: true)
        guard ready == [Self.readyToSwitchOver] else {
            throw StreamError("the target answered \(ready) instead of being ready to switch over")
        }
        migration.mark("target ready")
        try migration.checkCancelled()
        let sections = try stopper.stop().sections
        if plan.sharedRAM == nil {
            // Stopped: what is still dirty, or everything if the guest never ran.
            let final = plan.live ? try transfer.collectDirty(vm: vm, into: dirty) : nil
            _ = try transfer.sendPass(bitmap: final, live: false)
        }
        migration.ramRemaining.store(0, ordering: .relaxed)
        migration.mark("state handed over")
        for (section, fds) in sections { try channel.send(section, fds: fds) }
        try channel.send(.init(kind: .end))
        migration.mark("sent")
        let ack = try channel.receive(1, what: "the target's acknowledgement", pollFirst: true)
        guard ack == [Self.acknowledgement] else { throw StreamError("the target answered \(ack) instead of an acknowledgement") }
        // Completion as the transfer thread sees it, not when the control thread gets to it.
        let acknowledged = monotonicNanoseconds()
        migration.mark("acknowledged")
        return acknowledged
    }

    /// cpr-transfer, in 003's order: (1) stop the guest and capture its state, (2) the
    /// devices let go of what the next process takes over (`prepareForHandover`), (3) the
    /// cpr state with the RAM fd and every `cpr=on` netdev's fds on the cpr channel,
    /// (4) the main channel as in local mode without RAM: configuration, vCPU, devices,
    /// end, acknowledgement. Nothing is copied, so nothing runs while the guest runs: the
    /// downtime is the whole migration, and every step in it counts (a wake-up from sleep
    /// costs up to 0.7 ms on this kind of machine).
    /// - The cpr channel connects before the stop: connecting is no part of the handover,
    ///   and a target that is not there fails the migration with the guest untouched.
    /// - A target started with its main channel on the command line listens on it from the
    ///   start, so the main stream goes out right behind the cpr state and waits in the
    ///   socket until the target's devices exist. One started with `-incoming defer` listens
    ///   only at `migrate-incoming`: then, as in QEMU, the source waits until the target
    ///   closes the cpr channel (its HUP: it listens now) and connects again.
    func transferCPR(_ plan: OutgoingPlan, stopper: GuestStopper) throws -> Int64 {
        let cpr = try MigrationChannel.connect(uri: plan.cpr!)
        migration.channel.withLock { $0 = cpr }
        try migration.checkCancelled()
        loop.post { [self] in
            migration.setupDoneTime = monotonicNanoseconds()
            if migration.status == .setup { setMigrationStatus(.active) }
        }
        let stopped = try stopper.stop(handover: true)
        guard let cprState = stopped.cprState else { throw StreamError("cpr-transfer: no cpr state was built") }
        try cpr.send([(cprState.section, cprState.fds)], after: MigrationStream.header())
        migration.mark("cpr state sent")
        let main = try connectMainAfterCPRState(plan.uri, cpr: cpr)
        migration.mark("main connected")
        migration.channel.withLock { $0 = main }
        try migration.checkCancelled()
        // One write: the target, polling by now, takes it in with one read per section.
        try main.send([(.init(kind: .configuration, payload: plan.configuration), [])] + stopped.sections + [(.init(kind: .end), [])],
                      after: MigrationStream.header())
        migration.mark("sent")
        // Sleeps, unlike the other waits in the downtime: the target loads on this host's
        // other core now, and a poller yielding next to it saw the acknowledgement up to
        // 150 us late; a sleeper woken by it gets the core at once (downtime median 890 vs
        // 925 us, p90 997 vs 1129 us, 63 rounds each, quiet 2-core host).
        let ack = try main.receive(1, what: "the target's acknowledgement", pollFirst: false)
        guard ack == [Self.acknowledgement] else { throw StreamError("the target answered \(ack) instead of an acknowledgement") }
        let acknowledged = monotonicNanoseconds()
        migration.mark("acknowledged")
        return acknowledged
    }

    /// The main channel of a cpr-transfer, once the cpr state is out: at once if the target
    /// listens (its command line named it), else after the target closed the cpr channel
    /// (`-incoming defer`: it listens once `migrate-incoming` came).
    private func connectMainAfterCPRState(_ uri: MigrationURI, cpr: MigrationChannel) throws -> MigrationChannel {
        do {
            return try MigrationChannel.connect(uri: uri)
        } catch let error as SystemError where [ENOENT, ECONNREFUSED].contains(error.errno) {
            try cpr.waitForPeerClose(what: "the target to take the cpr state and listen on the main channel")
            try migration.checkCancelled()
            migration.mark("cpr channel closed")
        }
        do {
            return try MigrationChannel.connect(uri: uri)
        } catch {
            throw StreamError("cpr-transfer: the target closed the cpr channel, but its main channel \(uri) cannot be reached (did the target exit?): \(error)")
        }
    }

    /// The cpr state section and its fds (control thread, guest stopped): after every
    /// device let go of what the target takes over.
    func handOverForCPR() throws -> CPRHandover {
        let context = handoverContext
        migration.handoverPrepared = true
        var extra: [NamedFD] = []
        for device in devices { extra += try device.prepareForHandover(context) }
        var fds = [NamedFD(name: CPRState.ramFDName, fd: memory.fd)]
        var entries: [CPRState.Netdev] = []
        for id in netdevs.keys.sorted() {
            guard let (entry, queues) = CPRState.Netdev.handover(of: netdevs[id]!) else { continue }
            entries.append(entry)
            fds += queues
        }
        let ramKind: CPRState.RAMKind = memory.backing == .memfd ? .memfd : .file
        let state = CPRState(ramKind: ramKind, ramSize: memory.size, netdevs: entries)
        return CPRHandover(section: .init(kind: .cprState, payload: state.encoded()), fds: fds + extra)
    }

    /// Stops the guest for the final pass (control thread, which owns the run state): the
    /// vCPU, then the NICs' receiving, so from here every frame waits in the TAP (local)
    /// or stays with the old TAP (normal) and the source takes none after the snapshot.
    /// (Stopping from the migration thread instead measured 0.5 ms slower here: the
    /// vCPU took longer to park.)
    func stopForCompletion(handover: Bool = false) throws -> StoppedGuest {
        try migration.checkCancelled()
        // The outage starts here, before the vCPU is even asked to stop, as QEMU counts it.
        migration.stopTime = monotonicNanoseconds()
        migration.mark("stop")
        migration.runStateBefore = runState
        if runState == .running {
            vcpuRunner.pause()
            runState = .finishMigrate
            qmp.emit("STOP")
        } else {
            runState = .finishMigrate
        }
        for device in devices { try device.pause() }
        migration.mark("vcpu stopped")
        setMigrationStatus(.device)
        let sections = try captureState()
        migration.mark("state captured")
        let cpr = handover ? try handOverForCPR() : nil
        if handover { migration.mark("handed over") }
        return StoppedGuest(sections: sections, cprState: cpr)
    }

    func cancelMigration() {
        guard migration.isActive, migration.outgoing, migration.status != .cancelling else { return }
        migration.cancelRequested.store(true, ordering: .relaxed)
        setMigrationStatus(.cancelling)
        migration.channel.withLock { $0?.abort() }
    }

    /// Back on the control thread: completed (postmigrate), or failed/cancelled and
    /// the source goes back to what it was doing.
    func finishOutgoing(error: String?, acknowledged: Int64 = 0) {
        migration.endTime = error == nil && acknowledged > 0 ? acknowledged : monotonicNanoseconds()
        migration.mark("finished")
        logger.debug("migration timeline: \(migration.takeTimeline())")
        migration.channel.withLock { $0 = nil }
        if migration.dirtyLogging {
            do { try vm.setDirtyLogging(false, memory: memory) } catch { logger.warning("\(error)") }
            // Before a failed migration resumes the devices, so they restart unlogged.
            for device in devices { device.stopDirtyLog() }
            migration.dirtyLogging = false
        }
        guard let error else {
            runState = .postmigrate
            setMigrationStatus(.completed)
            return
        }
        let cancelled = migration.cancelRequested.load(ordering: .relaxed)
        if !cancelled {
            migration.error = error
            logger.error("migration failed: \(error)")
        }
        if migration.stopTime > 0 {
            runState = migration.runStateBefore
            if migration.handoverPrepared {
                // Before resume: vhost ownership back, TAP polling on again.
                let context = handoverContext
                for device in devices { device.cancelHandover(context) }
            }
            resumeDevices()
        }
        migration.handoverPrepared = false
        setMigrationStatus(cancelled ? .cancelled : .failed)
        if migration.stopTime > 0 && runState == .running {
            vcpuRunner.resume()
            qmp.emit("RESUME")
        }
    }
}

/// The cpr state section and the fds that go with it.
struct CPRHandover {
    var section: MigrationStream.Section
    var fds: [NamedFD]
}

/// What stopping the guest captured: the vCPU and device sections, and for
/// cpr-transfer the cpr state.
struct StoppedGuest {
    var sections: [(MigrationStream.Section, [NamedFD])]
    var cprState: CPRHandover?
}

/// Lets the migration thread stop the guest on the control thread and wait for the
/// captured state.
final class GuestStopper: @unchecked Sendable {
    private unowned let machine: Machine
    private let result = ConditionLock<Result<StoppedGuest, any Error>?>(nil)

    init(machine: Machine) { self.machine = machine }

    /// `handover`: cpr-transfer, also let the devices go and build the cpr state.
    func stop(handover: Bool = false) throws -> StoppedGuest {
        machine.loop.post { [self] in
            let outcome = Result(catching: { try machine.stopForCompletion(handover: handover) })
            result.update { $0 = outcome }
        }
        // Poll (yielding) before sleeping: the stop takes a few hundred microseconds, and
        // waking this thread from sleep afterwards cost up to 0.7 ms more downtime here.
        let pollUntil = monotonicNanoseconds() + 5_000_000
        while monotonicNanoseconds() < pollUntil {
            if let ready = result.read({ $0 }) { return try ready.get() }
            sched_yield()
        }
        return try result.wait(until: { $0 != nil }, then: { $0! })!.get()
    }
}
