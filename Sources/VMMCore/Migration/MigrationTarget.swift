import CLinux
import Glibc
import QMPWire

/// `-incoming` / `migrate-incoming`: accept one connection, check the configuration,
/// load RAM and state on a thread of its own (the vCPU has never run), acknowledge.
extension Machine {
    func startIncoming(from uri: MigrationURI, exitOnError: Bool = true) throws {
        guard runState == .inmigrate else { throw QMPCommandError("The incoming migration can only start in state 'inmigrate' (-incoming defer)") }
        guard migration.incomingListener < 0, !migration.isActive else { throw QMPCommandError("An incoming migration is already set up") }
        // Part of a failed stream may have loaded (RAM, registers, adopted TAP queues):
        // a second attempt would start from that, so this target is spent.
        guard migration.status != .failed else {
            throw QMPCommandError("An incoming migration failed here before (\(migration.error ?? "")); start a new target")
        }
        migration.exitOnError = exitOnError
        let listener: Int32
        switch uri {
        case .unix(let path):
            listener = try UnixSocket.listen(path: path, backlog: 1)
            migration.incomingPath = path
        case .tcp(let host, let port):
            listener = try TCPSocket.listen(host: host, port: port)
        }
        migration.incomingListener = listener
        loop.watch(listener) { [unowned self] _ in
            guard let fd = UnixSocket.accept(listener) else { return }
            closeIncomingListener()
            receiveMigration(on: MigrationChannel(socket: FileDescriptor(adopting: fd, label: "incoming migration connection")))
        }
    }

    func closeIncomingListener() {
        guard migration.incomingListener >= 0 else { return }
        loop.unwatch(migration.incomingListener)
        close(migration.incomingListener)
        migration.incomingListener = -1
        if let path = migration.incomingPath { unlink(path) }
        migration.incomingPath = nil
    }

    func receiveMigration(on channel: MigrationChannel) {
        migration.reset(ramTotal: memory.size, now: monotonicNanoseconds())
        migration.outgoing = false
        setMigrationStatus(.setup)
        setMigrationStatus(.active)
        let own = machineDescription()
        do {
            _ = try OSThread(name: "migration-in") { [self] in
                var failure: String?
                do {
                    try receive(over: channel, expecting: own)
                    // Checked before acknowledging: the source must not report success for this.
                    let unclaimed = channel.received.closeUnclaimed()
                    if !unclaimed.isEmpty {
                        throw StreamError("received \(unclaimed.count) file descriptor(s) that no section claimed: \(unclaimed.joined(separator: ", "))")
                    }
                    try channel.send([Self.acknowledgement])
                    migration.mark("acknowledged")
                } catch {
                    let unclaimed = channel.received.closeUnclaimed()
                    failure = unclaimed.isEmpty ? "\(error)"
                        : "\(error) (closed \(unclaimed.count) received file descriptor(s) no device claimed: \(unclaimed.joined(separator: ", ")))"
                }
                let result = failure
                loop.post { [self] in finishIncoming(error: result) }
            }
        } catch {
            finishIncoming(error: "\(error)")
        }
    }

    /// Runs on the migration thread; the vCPU has never run, so loading is race-free.
    func receive(over channel: MigrationChannel, expecting own: MachineDescription) throws {
        let version = try MigrationStream.checkHeader(try channel.receive(MigrationStream.headerSize, what: "the stream header"))
        let first = try channel.receiveSection(version: version)
        guard first.kind == .configuration else { throw StreamError("the stream starts with \(first.label), not the configuration") }
        let sourceDescription = try MachineDescription.decode(first.payload)
        try sourceDescription.check(target: own)
        migration.mark("configuration checked")
        var legacy = version == 2 ? LegacyStreamV2(netdevOf: Dictionary(uniqueKeysWithValues: netdevUsers.map { ($1, $0) })) : nil
        var loader = IncomingSections(devices: devices, memory: memory, sourceRAMFile: sourceDescription.properties["ram-file"],
                                      fds: channel.received, progress: migration)
        var switchingOver = false
        while true {
            let received = try channel.receiveSection(version: version, pollFirst: switchingOver)
            for section in try legacy?.translate(received, received: channel.received) ?? [received] {
                switch section.kind {
                case .vcpu:
                    migration.mark("vcpu state arrived")
                    guard section.name == "cpu0" else { throw StreamError("state for vCPU '\(section.name)', this machine has cpu0 only") }
                    try channel.received.bind(section.fdNames, for: section.label)
                    try VCPUState.decode(section.payload).restore(into: vcpuRunner.vcpu)
                    loader.loaded.insert("cpu0")
                case .switchover:
                    try channel.send([Self.readyToSwitchOver])
                    migration.mark("ready to switch over")
                    switchingOver = true
                case .end:
                    migration.mark("end arrived")
                    try loader.load(section)
                    return
                default:
                    try loader.load(section)
                }
            }
        }
    }

    func finishIncoming(error: String?) {
        migration.endTime = monotonicNanoseconds()
        migration.mark("finished")
        logger.debug("incoming migration timeline: \(migration.takeTimeline())")
        if let error {
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
/// machine that never ran: what `Machine.receive` uses, and what the stream fixtures
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
        case .vcpu, .switchover:
            throw StreamError("\(section.label) is the machine's to load")
        }
    }
}
