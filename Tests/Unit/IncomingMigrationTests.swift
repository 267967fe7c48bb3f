import Glibc
import Testing
@testable import VMMCore

/// The target's receive state machine, transition by transition, on a machine of RAM and
/// a serial port (no KVM: the vCPU state is recorded, not restored).
@Suite struct IncomingMigrationTests {
    final class Fixture {
        static let ramSize: UInt64 = 2 << 20
        let memory: GuestMemory
        let serial = Serial16550(output: { _ in })
        let progress = MigrationState()
        let incoming: IncomingMigration
        let main = ReceivedFDs()
        let cpr = ReceivedFDs()
        let description: MachineDescription
        /// Registers of the vCPU states restored, in order.
        let restored = RestoredVCPUs()

        init(expectsCPR: Bool = false) throws {
            memory = try GuestMemory(size: Self.ramSize)
            description = MachineDescription(properties: ["ram-size": String(Self.ramSize), "vcpus": "1", "local": "off"],
                                             devices: [serial.configuration(HandoverContext(mode: .normal))!])
            let target = IncomingTarget(description: description, devices: [serial], memory: memory, netdevOf: [:], progress: progress,
                                        restoreVCPU: { [restored] in restored.regs.append($0.regs) })
            incoming = IncomingMigration(expectsCPR: expectsCPR, target: target)
        }

        var configuration: MigrationStream.Section { .init(kind: .configuration, payload: description.encode()) }
        /// One zero page at address 0.
        var ram: MigrationStream.Section {
            var w = StreamWriter()
            w.u64(RAMTransfer.zeroPageFlag)
            return .init(kind: .ram, payload: w.bytes)
        }
        var vcpu: MigrationStream.Section {
            .init(kind: .vcpu, name: "cpu0", payload: VCPUState(regs: [1], sregs: [], fpu: [], events: [], xcrs: [], msrs: [:]).encode())
        }
        var serialState: MigrationStream.Section {
            .init(kind: .device, name: "serial0", payload: serial.saveSection(HandoverContext(mode: .normal)).payload)
        }

        func beginMain() throws { try incoming.begin(.main, header: MigrationStream.header(), fds: main) }
        func beginCPR() throws { try incoming.begin(.cpr, header: MigrationStream.header(), fds: cpr) }
        @discardableResult
        func send(_ section: MigrationStream.Section, on channel: MigrationChannelType = .main) throws -> IncomingMigration.Step {
            try incoming.receive(section, on: channel)
        }

        /// A cpr state as a source sends it: the RAM memfd (`machine/ram`, with `ramBytes`
        /// written into it) and `queues` TAP queue stand-ins per netdev, arrived on the cpr channel.
        func cprState(netdevs: [(String, Int)] = [], ramSize: UInt64 = ramSize, ramBytes: [UInt8] = [], version: UInt16? = nil) throws -> MigrationStream.Section {
            let ram = try GuestMemory(size: ramSize, shared: true)
            try ram.write(ramBytes, at: 0)
            cpr.append([try ram.fd.duplicate()])
            var names = [CPRState.ramFDName]
            for (id, queues) in netdevs {
                arrive(queues, on: cpr)
                names += (0..<queues).map { NamedFD.tapQueueName(netdev: id, queue: $0) }
            }
            let state = CPRState(ramKind: .memfd, ramSize: ramSize, netdevs: netdevs.map {
                CPRState.Netdev(id: $0.0, queues: UInt16($0.1), vnetHeader: true, ifname: "tap0")
            })
            var payload = state.encoded()
            if let version { payload[0] = UInt8(version & 0xFF); payload[1] = UInt8(version >> 8) }
            return .init(kind: .cprState, payload: payload, fdNames: names)
        }

        /// An fd as a channel would collect it.
        func arrive(_ count: Int, on fds: ReceivedFDs) {
            fds.append((0..<count).map { _ in FileDescriptor(adopting: open("/dev/null", O_RDONLY | O_CLOEXEC), label: "test fd") })
        }
    }

    final class RestoredVCPUs: @unchecked Sendable { var regs: [[UInt8]] = [] }

    @Test func normalStreamWalksEveryState() throws {
        let f = try Fixture()
        #expect(f.incoming.state == .waitingForChannels)
        try f.beginMain()
        #expect(f.incoming.state == .receivingConfiguration)
        #expect(try f.send(f.configuration) == .next)
        #expect(f.incoming.state == .receivingState)
        #expect(try f.send(f.ram) == .next)
        #expect(!f.incoming.pollsForNext)
        #expect(try f.send(.init(kind: .switchover)) == .answerReadyToSwitchOver)
        #expect(f.incoming.state == .switchingOver)
        #expect(f.incoming.pollsForNext)
        try f.send(f.ram)
        try f.send(f.vcpu)
        try f.send(f.serialState)
        #expect(try f.send(.init(kind: .end)) == .finished)
        #expect(f.incoming.state == .completed)
        #expect(f.restored.regs == [[1]])
        // Nothing after the end.
        #expect { try f.send(f.ram) } throws: { "\($0)" == "ram on the main channel in state completed" }
    }

    @Test func cprStateComesFirstOnItsOwnChannel() throws {
        let f = try Fixture(expectsCPR: true)
        // The main channel may connect first, but its stream must wait for the cpr state.
        #expect { try f.beginMain() } throws: {
            "\($0)" == "the main channel's stream arrived before the cpr state; the cpr channel carries it first"
        }
        #expect(f.incoming.state == .failed)

        let g = try Fixture(expectsCPR: true)
        try g.beginCPR()
        #expect(g.incoming.state == .receivingCPRState)
        #expect(try g.send(try g.cprState(ramBytes: [0xC0, 0xDE]), on: .cpr) == .finished)
        #expect(g.incoming.state == .cprStateApplied)
        // The source's RAM replaced this machine's in place: its bytes are here.
        #expect(try g.memory.read(at: 0, count: 2) == [0xC0, 0xDE])
        try g.beginMain()
        #expect(g.incoming.state == .receivingConfiguration)
        try g.send(g.configuration)
        // cpr-transfer's main channel carries no RAM: the cpr state had it.
        try g.send(g.vcpu)
        try g.send(g.serialState)
        #expect(try g.send(.init(kind: .end)) == .finished)
        #expect(g.incoming.state == .completed)
    }

    @Test(arguments: [
        ("a device section before the configuration", [MigrationStream.Kind.device], "the stream starts with device 'serial0', not the configuration"),
        ("a second configuration", [.configuration, .configuration], "a second configuration section"),
        ("a cpr state on the main channel", [.configuration, .cprState], "a cpr state on the main channel; it belongs on the cpr channel"),
        ("a second switch-over", [.configuration, .switchover, .switchover], "a second switch-over section"),
        ("an end without RAM", [.configuration, .end], "the stream carried no guest RAM"),
        ("an end without the devices", [.configuration, .ram, .end], "the stream ended without state for cpu0, serial0"),
    ])
    func badOrderFailsNamingWhatArrived(_ label: String, _ kinds: [MigrationStream.Kind], message: String) throws {
        let f = try Fixture()
        try f.beginMain()
        let sections: [MigrationStream.Kind: MigrationStream.Section] = [
            .configuration: f.configuration, .device: f.serialState, .cprState: .init(kind: .cprState), .ram: f.ram,
            .switchover: .init(kind: .switchover), .end: .init(kind: .end),
        ]
        for kind in kinds.dropLast() { try f.send(sections[kind]!) }
        #expect { try f.send(sections[kinds.last!]!) } throws: { "\($0)" == message }
        #expect(f.incoming.state == .failed)
    }

    @Test func cprChannelRefusesAnythingButTheCPRState() throws {
        let f = try Fixture()
        #expect { try f.beginCPR() } throws: { "\($0)" == "a cpr channel connected, but this target was not given one" }

        let g = try Fixture(expectsCPR: true)
        try g.beginCPR()
        #expect { try g.send(g.configuration, on: .cpr) } throws: {
            "\($0)" == "the cpr channel carries the cpr state only, not configuration"
        }

        let h = try Fixture(expectsCPR: true)
        try h.beginCPR()
        try h.send(try h.cprState(), on: .cpr)
        #expect { try h.beginCPR() } throws: { "\($0)" == "the cpr channel opened a second time (in state cprStateApplied)" }
    }

    /// `cpr=on` netdevs claim their TAP queues by id; one the cpr state does not carry is
    /// named with what it does carry, and one left unclaimed fails the end, counted.
    @Test func cprNetdevsClaimTheirQueuesByID() throws {
        let f = try Fixture(expectsCPR: true)
        try f.beginCPR()
        try f.send(try f.cprState(netdevs: [("n0", 4), ("n1", 1)]), on: .cpr)
        let (entry, queues) = try f.incoming.claimCPRNetdev("n0")
        #expect(entry.queues == 4 && entry.ifname == "tap0" && queues.count == 4)
        #expect { try f.incoming.claimCPRNetdev("n9") } throws: {
            "\($0)" == "netdev 'n9': cpr=on, but the cpr state carries no netdev 'n9' (it carries n0, n1): is cpr=on set for it on the source?"
        }
        try f.beginMain()
        try f.send(f.configuration)
        try f.send(f.vcpu)
        try f.send(f.serialState)
        #expect { try f.send(.init(kind: .end)) } throws: {
            "\($0)" == "received 1 file descriptor(s) that no section claimed: netdev/n1/tap.0"
        }
        #expect(f.cpr.count == 0)
    }

    /// The cpr state is versioned like a device state; a skewed one fails naming why.
    @Test(arguments: [
        (UInt16(2), nil as UInt64?, "cpr: state version 2 is newer than this build reads (1...1); update the target"),
        (UInt16(1), UInt64(4 << 20), "cpr state: the source's RAM is 4194304 bytes, this machine's 2097152; give the target the same -m or memory backend size"),
    ])
    func badCPRStatesAreRefused(version: UInt16, ramSize: UInt64?, message: String) throws {
        let f = try Fixture(expectsCPR: true)
        try f.beginCPR()
        let section = try f.cprState(ramSize: ramSize ?? Fixture.ramSize, version: version)
        #expect { try f.send(section, on: .cpr) } throws: { "\($0)" == message }
        #expect(f.incoming.state == .failed)
        _ = f.incoming.fail(StreamError("x"))
        #expect(f.cpr.count == 0)
    }

    /// The cpr state comes from a peer: every truncation of a valid one is refused by name,
    /// and bad kinds, counts and duplicates are named, never misread.
    @Test func cprStateDecodingRefusesBadPayloads() throws {
        let state = CPRState(ramKind: .memfd, ramSize: 64 << 20, netdevs: [
            .init(id: "n0", queues: 4, vnetHeader: true, ifname: "tap0"), .init(id: "n1", queues: 1, vnetHeader: false, ifname: "tapc"),
        ])
        let bytes = state.encoded()
        #expect(try CPRState.decode(bytes, owner: "cpr") == state)
        for length in 0..<bytes.count {
            #expect(throws: StreamError.self, "truncated to \(length)") { try CPRState.decode(Array(bytes.prefix(length)), owner: "cpr") }
        }
        #expect { try CPRState.decode(bytes + [0], owner: "cpr") } throws: { "\($0)".contains("cpr state") }
        var badKind = bytes
        badKind[2] = 9
        #expect { try CPRState.decode(badKind, owner: "cpr") } throws: { "\($0)" == "cpr state: RAM kind 9 is not known to this build" }
        let twice = CPRState(ramKind: .file, ramSize: 1 << 20, netdevs: [
            .init(id: "n0", queues: 1, vnetHeader: true, ifname: "a"), .init(id: "n0", queues: 1, vnetHeader: true, ifname: "b"),
        ])
        #expect { try CPRState.decode(twice.encoded(), owner: "cpr") } throws: { "\($0)" == "cpr state: netdev 'n0' listed twice" }
        let none = CPRState(ramKind: .memfd, ramSize: 1 << 20, netdevs: [.init(id: "n0", queues: 0, vnetHeader: true, ifname: "a")])
        #expect { try CPRState.decode(none.encoded(), owner: "cpr") } throws: { "\($0)" == "cpr state: netdev 'n0' has 0 queues, outside 1...256" }
    }

    @Test func headerIsCheckedPerChannel() throws {
        let f = try Fixture()
        #expect { try f.incoming.begin(.main, header: Array("QEVM".utf8) + [0, 0, 0, 3, 0, 0, 0, 0], fds: f.main) } throws: {
            "\($0)" == "the peer sent a QEMU migration stream; this VMM only speaks its own format"
        }
        #expect(f.incoming.state == .failed)
    }

    /// Each channel's fds are claimed from that channel; a failure closes what either
    /// channel received and nobody claimed, and says how many.
    @Test func unclaimedFDsOfEveryChannelAreClosedAndCounted() throws {
        let f = try Fixture(expectsCPR: true)
        try f.beginCPR()
        try f.send(try f.cprState(netdevs: [("n0", 1)]), on: .cpr)
        try f.beginMain()
        f.arrive(1, on: f.main)
        // The RAM fd was claimed when the cpr state was applied; the TAP queue waits for its netdev.
        let message = f.incoming.fail(StreamError("the peer closed the connection"))
        #expect(message == "the peer closed the connection (closed 2 received file descriptor(s) no device claimed: unnamed, netdev/n0/tap.0)")
        #expect(f.main.count == 0 && f.cpr.count == 0)
        #expect(f.incoming.state == .failed)
    }

    /// A stream that completes with an fd nobody claimed fails before the acknowledgement.
    @Test func endWithAnUnclaimedFDFails() throws {
        let f = try Fixture()
        try f.beginMain()
        try f.send(f.configuration)
        f.arrive(1, on: f.main)
        try f.send(.init(kind: .ram, payload: f.ram.payload, fdNames: ["stray"]))
        try f.send(f.vcpu)
        try f.send(f.serialState)
        #expect { try f.send(.init(kind: .end)) } throws: { "\($0)" == "received 1 file descriptor(s) that no section claimed: stray" }
        #expect(f.main.count == 0)
    }
}
