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
                    if unclaimed > 0 { throw StreamError("received \(unclaimed) file descriptor(s) that no section claimed") }
                    try channel.send([Self.acknowledgement])
                    migration.mark("acknowledged")
                } catch {
                    let unclaimed = channel.received.closeUnclaimed()
                    failure = unclaimed > 0 ? "\(error) (closed \(unclaimed) received file descriptor(s) no section claimed)" : "\(error)"
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
        try MigrationStream.checkHeader(try channel.receive(MigrationStream.headerSize, what: "the stream header"))
        let first = try channel.receiveSection()
        guard first.kind == .configuration else { throw StreamError("the stream starts with \(first.label), not the configuration") }
        let sourceDescription = try MachineDescription.decode(first.payload)
        try sourceDescription.check(target: own)
        migration.mark("configuration checked")
        var loaded: Set<String> = []
        var ramArrived = false
        var ramEmptied = false
        var switchingOver = false
        while true {
            let section = try channel.receiveSection(pollFirst: switchingOver)
            let fds = try channel.received.claim(section.fdCount, for: section.label)
            if !(section.name.hasSuffix("/tap") || section.kind == .sharedRAM) && !fds.isEmpty {
                throw StreamError("\(section.label) carries \(fds.count) file descriptor(s) it has no use for")
            }
            switch section.kind {
            case .end:
                migration.mark("end arrived")
                // Never start a guest without its memory or with a NIC that has no backend.
                guard ramArrived else { throw StreamError("the stream carried no guest RAM") }
                let missing = ["cpu0", "serial0", "pci0"].filter { !loaded.contains($0) }
                guard missing.isEmpty else { throw StreamError("the stream ended without \(missing.joined(separator: ", "))") }
                for nic in nics where nic.backend.queueFDs.isEmpty {
                    throw StreamError("netdev '\(nic.backend.id)' (incoming-fds=on) received no TAP queues: is migration parameter 'local' on at the source, and local-migration on for \(nic.id)?")
                }
                return
            case .ram:
                // The source leaves zero pages out: whatever this RAM held must go first.
                if !ramEmptied {
                    try memory.emptyForCopy(sourceRAMFile: sourceDescription.properties["ram-file"])
                    ramEmptied = true
                }
                try RAMTransfer.load(section.payload, into: memory, progress: migration)
                ramArrived = true
            case .sharedRAM:
                try SharedRAM.decode(section.payload).adopt(into: memory, fds: fds)
                ramArrived = true
            case .vcpu:
                migration.mark("vcpu state arrived")
                guard section.name == "cpu0" else { throw StreamError("state for vCPU '\(section.name)', this machine has cpu0 only") }
                try VCPUState.decode(section.payload).restore(into: vcpuRunner.vcpu)
                loaded.insert("cpu0")
            case .device:
                try loadDevice(section, fds: fds)
                loaded.insert(section.name)
            case .switchover:
                try channel.send([Self.readyToSwitchOver])
                migration.mark("ready to switch over")
                switchingOver = true
            case .configuration:
                throw StreamError("a second configuration section")
            }
        }
    }

    func loadDevice(_ section: MigrationStream.Section, fds: [FileDescriptor]) throws {
        if section.name == "serial0" { return try serial.load(section.payload) }
        if section.name == "pci0" { return try pciBus.load(section.payload) }
        let parts = section.name.split(separator: "/")
        guard parts.count == 2, let nic = nics.first(where: { $0.id == parts[0] }), let transport = nic.transport else {
            throw StreamError("state for device '\(section.name)', which this machine does not have")
        }
        switch parts[1] {
        case "transport": try transport.load(section.payload)
        case "net": try nic.load(section.payload)
        case "tap":
            var r = StreamReader(section.payload, context: "\(section.name)")
            let queues = Int(try r.u16("queue count"))
            let vnetHeader = try r.bool("vnet header")
            try r.finish()
            guard let tap = nic.backend as? TapBackend, tap.queueFDs.isEmpty else {
                // The series' tap_pre_load wording, then what it means here.
                throw StreamError("\(section.name): TAP is already initialized and cannot receive incoming fd: netdev '\(nic.backend.id)' was not created with incoming-fds=on")
            }
            guard queues == fds.count else {
                throw StreamError("\(section.name): the section announces \(queues) TAP queue(s) but carries \(fds.count) file descriptor(s)")
            }
            try tap.adopt(fds, vnetHeader: vnetHeader)
        default: throw StreamError("unknown state '\(section.name)'")
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
        for nic in nics {
            nic.suspendReceive(true)
            attach(nic)
        }
        setMigrationStatus(.completed)
        runState = .paused
    }
}
