import CLinux
import Glibc
import QMPWire

/// Moving the running guest to another VMM process: the source side (`migrate`) and the
/// target side (`-incoming` / `migrate-incoming`). This first version stops the guest,
/// then sends the configuration, RAM (zero pages skipped: the target's RAM starts
/// zeroed), vCPU and device state, and waits for the target's acknowledgement.
extension Machine {
    static let chunkSize = 1 << 20
    static let pageSize = 4096
    static let acknowledgement: UInt8 = 0x06

    /// What must agree between source and target before any state is loaded.
    func machineDescription() -> MachineDescription {
        var devices = [MachineDescription.Device(id: "serial0", type: "isa-serial", properties: [:])]
        for nic in nics {
            devices.append(.init(id: nic.id, type: "virtio-net-pci", properties: [
                "max_queue_pairs": String(nic.maxQueuePairs), "mq": nic.multiQueue ? "on" : "off",
                "mac": nic.mac.map { String($0, radix: 16) }.joined(separator: ":"),
                "local-migration": nic.localMigration ? "on" : "off",
            ]))
        }
        return MachineDescription(properties: ["ram-size": String(memory.size), "vcpus": "1", "local": isLocalMigration ? "on" : "off"],
                                  devices: devices)
    }

    var isLocalMigration: Bool { migration.parameters["local"]?.boolValue == true }

    /// NICs whose TAP queues travel in the stream: `local` on and the device's opt-in.
    var nicsPassingTap: [VirtioNet] { isLocalMigration ? nics.filter { $0.localMigration } : [] }

    func now() -> Int64 { monotonicNanoseconds() / 1_000_000 }

    func setMigrationStatus(_ status: MigrationState.Status) {
        migration.status = status
        if migration.capabilities["events"] == true {
            qmp.emit("MIGRATION", data: ["status": .string(status.rawValue)])
        }
    }

    // MARK: source

    func startMigration(uri text: String) throws {
        guard !migration.isActive else { throw QMPCommandError("There's a migration process in progress") }
        guard [.running, .paused, .prelaunch].contains(runState) else {
            throw QMPCommandError("Cannot migrate in state '\(runState.rawValue)'")
        }
        let uri = try MigrationURI(text)
        let channel = try MigrationChannel.connect(uri: uri)
        migration.error = nil
        migration.startTime = now()
        migration.ramTransferred.store(0, ordering: .relaxed)
        migration.pagesTransferred.store(0, ordering: .relaxed)
        migration.ramTotal = memory.size
        setMigrationStatus(.setup)
        migration.setupDoneTime = now()
        setMigrationStatus(.active)

        // Stop-and-copy: the guest stops before anything is read.
        migration.runStateBefore = runState
        if runState == .running {
            vcpuRunner.pause()
            runState = .finishMigrate
            qmp.emit("STOP")
        } else {
            runState = .finishMigrate
        }
        // From here the target gets every frame: they wait in the TAP (local) or are lost
        // with the old TAP (normal), but the source never takes one after the snapshot.
        for nic in nics { nic.suspendReceive(true) }
        migration.stopTime = now()
        setMigrationStatus(.device)
        let sections: [(MigrationStream.Section, [Int32])]
        do {
            sections = try captureState()
        } catch {
            finishOutgoing(error: "\(error)")
            return
        }
        let memory = self.memory
        let progress = migration
        let loop = self.loop
        do {
            _ = try OSThread(name: "migration-out") { [self] in
                var failure: String?
                do {
                    try Self.send(sections: sections, memory: memory, over: channel, progress: progress)
                } catch {
                    failure = "\(error)"
                }
                let result = failure
                loop.post { [self] in finishOutgoing(error: result) }
            }
        } catch {
            finishOutgoing(error: "\(error)")
        }
    }

    /// Configuration, vCPU and device sections (with the fds each one passes), taken
    /// while the vCPU is stopped.
    func captureState() throws -> [(MigrationStream.Section, [Int32])] {
        var sections: [(MigrationStream.Section, [Int32])] = [(.init(kind: .configuration, payload: machineDescription().encode()), [])]
        let vcpuState = try VCPUState.capture(vcpuRunner.vcpu, msrIndices: VCPUState.savableMSRs(hypervisor: hypervisor))
        sections.append((.init(kind: .vcpu, name: "cpu0", payload: vcpuState.encode()), []))
        sections.append((.init(kind: .device, name: "serial0", payload: serial.save()), []))
        let passing = nicsPassingTap
        for nic in nics {
            guard let transport = nic.transport else { continue }
            sections.append((.init(kind: .device, name: "\(nic.id)/transport", payload: transport.save()), []))
            sections.append((.init(kind: .device, name: "\(nic.id)/net", payload: nic.save()), []))
            if passing.contains(where: { $0 === nic }) {
                let fds = nic.backend.queueFDs
                var w = StreamWriter()
                w.u16(UInt16(fds.count))
                w.bool(nic.backend.vnetHeader)
                sections.append((.init(kind: .device, name: "\(nic.id)/tap", payload: w.bytes, fdCount: fds.count), fds))
            }
        }
        return sections
    }

    /// Runs on the migration thread: header, configuration, RAM, the rest, end, ack.
    static func send(sections: [(MigrationStream.Section, [Int32])], memory: GuestMemory, over channel: MigrationChannel,
                     progress: MigrationState) throws {
        try channel.send(MigrationStream.header())
        try channel.send(sections[0].0, fds: sections[0].1)
        for region in memory.regions {
            var offset: UInt64 = 0
            while offset < region.size {
                let length = Int(min(UInt64(chunkSize), region.size - offset))
                let bytes = try memory.slice(at: region.guestAddress + offset, count: length)
                var w = StreamWriter()
                var pages = 0
                for page in stride(from: 0, to: length, by: pageSize) {
                    let slice = UnsafeRawBufferPointer(rebasing: bytes[page..<min(page + pageSize, length)])
                    guard !isZeroPage(slice) else { continue }
                    w.u64(region.guestAddress + offset + UInt64(page))
                    w.raw(slice)
                    pages += 1
                }
                if pages > 0 { try channel.send(.init(kind: .ram, payload: w.bytes)) }
                progress.ramTransferred.add(UInt64(length), ordering: .relaxed)
                progress.pagesTransferred.add(UInt64(pages), ordering: .relaxed)
                offset += UInt64(length)
            }
        }
        for (section, fds) in sections.dropFirst() { try channel.send(section, fds: fds) }
        try channel.send(.init(kind: .end))
        let ack = try channel.receive(1, what: "the target's acknowledgement")
        guard ack == [acknowledgement] else { throw StreamError("the target answered \(ack) instead of an acknowledgement") }
    }

    /// Word-wise: this runs over every page of RAM.
    static func isZeroPage(_ page: UnsafeRawBufferPointer) -> Bool {
        let words = page.count / 8
        for i in 0..<words where page.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
        return page[(words * 8)...].allSatisfy { $0 == 0 }
    }

    /// Back on the control thread: completed (postmigrate), or failed and the source
    /// goes back to what it was doing.
    func finishOutgoing(error: String?) {
        migration.endTime = now()
        if let error {
            migration.error = error
            logger.error("migration failed: \(error)")
            runState = migration.runStateBefore
            for nic in nics { nic.suspendReceive(false) }
            setMigrationStatus(.failed)
            if runState == .running {
                vcpuRunner.resume()
                qmp.emit("RESUME")
            }
        } else {
            runState = .postmigrate
            setMigrationStatus(.completed)
        }
    }

    // MARK: target

    func startIncoming(uri text: String) throws {
        guard runState == .inmigrate else { throw QMPCommandError("The incoming migration can only start in state 'inmigrate' (-incoming defer)") }
        guard migration.incomingListener < 0, !migration.isActive else { throw QMPCommandError("An incoming migration is already set up") }
        let uri = try MigrationURI(text)
        let listener = try UnixSocket.listen(path: uri.path, backlog: 1)
        migration.incomingListener = listener
        migration.incomingPath = uri.path
        loop.watch(listener) { [unowned self] _ in
            guard let fd = UnixSocket.accept(listener) else { return }
            closeIncomingListener()
            receiveMigration(on: MigrationChannel(fd: fd))
        }
    }

    func closeIncomingListener() {
        guard migration.incomingListener >= 0 else { return }
        loop.unwatch(migration.incomingListener)
        close(migration.incomingListener)
        migration.incomingListener = -1
        if let path = migration.incomingPath { unlink(path) }
    }

    func receiveMigration(on channel: MigrationChannel) {
        migration.startTime = now()
        migration.ramTotal = memory.size
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
                } catch {
                    channel.received.closeUnclaimed()
                    failure = "\(error)"
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
        try MachineDescription.decode(first.payload).check(target: own)
        var loaded: Set<String> = []
        while true {
            let section = try channel.receiveSection()
            let fds = try channel.received.claim(section.fdCount, for: section.label)
            if section.name.hasSuffix("/tap") == false && !fds.isEmpty {
                fds.forEach { close($0) }
                throw StreamError("\(section.label) carries \(fds.count) file descriptor(s) it has no use for")
            }
            switch section.kind {
            case .end:
                let missing = ["cpu0", "serial0"].filter { !loaded.contains($0) }
                guard missing.isEmpty else { throw StreamError("the stream ended without \(missing.joined(separator: ", "))") }
                for nic in nics where nic.backend.queueFDs.isEmpty {
                    throw StreamError("netdev '\(nic.backend.id)' (incoming-fds=on) received no TAP queues: is migration parameter 'local' on at the source, and local-migration on for \(nic.id)?")
                }
                return
            case .ram:
                var r = StreamReader(section.payload, context: "RAM section")
                while !r.isAtEnd {
                    let address = try r.u64("page address")
                    let page = try r.raw(Self.pageSize, "page at \(hex(address))")
                    do {
                        try memory.write(page, at: address)
                    } catch {
                        throw StreamError("RAM page at \(hex(address)) lies outside this machine's RAM")
                    }
                    migration.pagesTransferred.add(1, ordering: .relaxed)
                    migration.ramTransferred.add(UInt64(Self.pageSize), ordering: .relaxed)
                }
            case .vcpu:
                guard section.name == "cpu0" else { throw StreamError("state for vCPU '\(section.name)', this machine has cpu0 only") }
                try VCPUState.decode(section.payload).restore(into: vcpuRunner.vcpu)
                loaded.insert("cpu0")
            case .device:
                try loadDevice(section, fds: fds)
                loaded.insert(section.name)
            case .configuration:
                throw StreamError("a second configuration section")
            }
        }
    }

    func loadDevice(_ section: MigrationStream.Section, fds: [Int32]) throws {
        if section.name == "serial0" { return try serial.load(section.payload) }
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
            guard queues == fds.count, let tap = nic.backend as? TapBackend, tap.queueFDs.isEmpty else {
                fds.forEach { close($0) }
                throw StreamError("\(section.name): the source passes its TAP queues, but netdev '\(nic.backend.id)' was not created with incoming-fds=on")
            }
            try tap.adopt(fds, vnetHeader: vnetHeader)
        default: throw StreamError("unknown state '\(section.name)'")
        }
    }

    func finishIncoming(error: String?) {
        migration.endTime = now()
        if let error {
            migration.error = error
            logger.error("incoming migration failed: \(error)")
            setMigrationStatus(.failed)
            // Like QEMU's default exit-on-error: a target that could not load exits.
            loop.stop(exitStatus: 1)
            return
        }
        for nic in nics { attach(nic) }
        setMigrationStatus(.completed)
        runState = .paused
    }
}
