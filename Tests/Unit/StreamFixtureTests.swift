import Foundation
import Testing
@testable import VMMCore

/// Streams captured from real migrations (Tests/Fixtures/streams, made by capture.py there)
/// load with the current code: every format change must keep reading what earlier binaries
/// sent (issue 11 §2). No KVM: the sections and each device's state go through the
/// loaders a target uses, into devices built as a target builds them.
@Suite struct StreamFixtureTests {
    struct Fixture: CustomTestStringConvertible {
        var name: String
        var queuePairs: Int
        var local: Bool
        /// The NIC on vhost-user (capture.py --vhost-user): locally, its backend connection
        /// travels as the one fd of datapath descriptor kind 2.
        var vhostUser = false
        var testDescription: String { name }
    }

    static let fixtures = ["v2", "v3"].flatMap { version in [
        Fixture(name: "\(version)-normal-1queue", queuePairs: 1, local: false),
        Fixture(name: "\(version)-local-tap-fds", queuePairs: 1, local: true),
        Fixture(name: "\(version)-normal-4queues", queuePairs: 4, local: false),
    ] } + [Fixture(name: "v3-local-vhost-user-2queues", queuePairs: 2, local: true, vhostUser: true)]

    static func bytes(_ fixture: Fixture) throws -> [UInt8] { try bytes(fixture.name) }

    static func bytes(_ name: String) throws -> [UInt8] {
        Array(try Data(contentsOf: URL(fileURLWithPath: "\(packageRoot)/Tests/Fixtures/streams/\(name).stream")))
    }

    /// The fds the source passed, as capture.py recorded them: (section name, count).
    static func recordedFDClaims(_ fixture: Fixture) throws -> [String: Int] { try recordedFDClaims(fixture.name) }

    static func recordedFDClaims(_ name: String) throws -> [String: Int] {
        let data = try Data(contentsOf: URL(fileURLWithPath: "\(packageRoot)/Tests/Fixtures/streams/\(name).fds.json"))
        let json = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let claims = try #require(json["claims"] as? [[String: Any]])
        var result: [String: Int] = [:]
        for claim in claims {
            let kind = try #require(claim["kind"] as? Int)
            let name = try #require(claim["section"] as? String)
            result[name.isEmpty ? "kind \(kind)" : name] = try #require(claim["fds"] as? Int)
        }
        return result
    }

    @Test(arguments: fixtures) func capturedStreamLoads(_ fixture: Fixture) throws {
        let bytes = try Self.bytes(fixture)
        let version = try MigrationStream.checkHeader(bytes)
        #expect("v\(version)" == fixture.name.prefix(2))
        let sections = try MigrationStream.decodeAll(bytes)
        let configuration = try #require(sections.first)
        #expect(configuration.kind == .configuration)
        let description = try MachineDescription.decode(configuration.payload)
        #expect(description.properties["ram-size"] == String(64 << 20))
        #expect(description.properties["local"] == (fixture.local ? "on" : "off"))
        let nic = try #require(description.devices.first { $0.type == "virtio-net-pci" })
        #expect(nic.id == "net0")
        #expect(nic.properties["max_queue_pairs"] == String(fixture.queuePairs))

        let target = try FixtureTarget(description, recordedFDs: try Self.recordedFDClaims(fixture), vhostUser: fixture.vhostUser)
        try target.load(sections, header: Array(bytes.prefix(MigrationStream.headerSize)), configuration: description)
        #expect(target.received.closeUnclaimed() == [], "every fd the source passed was claimed")
        #expect(target.ramPages > 0 || fixture.local)
        // The guest had booted: the NIC is live, with every pair it asked for.
        #expect(target.transport.status & VirtioPCITransport.Status.driverOK != 0)
        #expect(target.nic.queuePairsInUse == fixture.queuePairs)
        #expect(target.transport.negotiatedFeatures & VirtioPCITransport.featureVersion1 != 0)
        // Local: the TAP queues (or the vhost-user connection) came as fds and went to the
        // netdev; the RAM memfd replaced RAM.
        if let netdev = target.vhostUser {
            #expect(!netdev.awaitsIncomingQueues && target.nic.datapath.kind == .vhostUser)
        } else {
            #expect(target.backend.adopted == (fixture.local ? fixture.queuePairs : 0))
        }
    }
}

extension StreamFixtureTests {
    /// cpr-transfer (capture.py --cpr): the cpr channel's stream, one cpr state section with
    /// the RAM memfd and the TAP queues, and the main channel's stream without RAM. The
    /// cpr state goes through the target's state machine first, the `cpr=on` netdev claims
    /// its queues by id, then the main stream loads and completes.
    @Test func capturedCPRTransferLoads() throws {
        let name = "v3-cpr-transfer-4queues"
        let cprBytes = try Self.bytes(name + ".cpr")
        #expect(try MigrationStream.checkHeader(cprBytes) == 3)
        let length = try MigrationStream.frameLength(Array(cprBytes[12..<16]))
        #expect(cprBytes.count == 16 + length, "the cpr channel carries one section")
        let section = try MigrationStream.decode(frame: Array(cprBytes[16...]))
        #expect(section.kind == .cprState)
        #expect(section.fdNames == ["machine/ram"] + (0..<4).map { "netdev/n0/tap.\($0)" })
        let state = try CPRState.decode(section.payload, owner: "cpr")
        #expect(state.ramKind == .memfd && state.ramSize == 64 << 20)
        #expect(state.netdevs.map { "\($0.id) \($0.queues) \($0.ifname)" } == ["n0 4 tap0"])

        let main = try Self.bytes(name)
        let sections = try MigrationStream.decodeAll(main)
        let description = try MachineDescription.decode(try #require(sections.first).payload)
        #expect(description.properties["mode"] == "cpr-transfer")
        #expect(!sections.contains { $0.kind == .ram || $0.kind == .sharedRAM }, "no RAM on the main channel")
        #expect(try Self.recordedFDClaims(name) == [:])

        let target = try FixtureTarget(description, recordedFDs: [:])
        let cprFDs = ReceivedFDs()
        cprFDs.append([try GuestMemory(size: 64 << 20, shared: true).fd.duplicate()])
        cprFDs.append((0..<4).map { _ in FileDescriptor(adopting: open("/dev/null", O_RDONLY | O_CLOEXEC), label: "TAP queue stand-in") })
        try target.load(sections, header: Array(main.prefix(MigrationStream.headerSize)), configuration: description,
                        cpr: (Array(cprBytes.prefix(MigrationStream.headerSize)), section, cprFDs))
        #expect(cprFDs.closeUnclaimed() == [] && target.received.closeUnclaimed() == [])
        #expect(target.backend.adopted == 4)
        #expect(target.transport.status & VirtioPCITransport.Status.driverOK != 0)
        #expect(target.nic.queuePairsInUse == 4)
    }
}

/// The devices an incoming machine builds from the configuration section, loaded by
/// the target's own code (`IncomingMigration`, with `LegacyStreamV2` for v2 streams). The
/// NIC's netdev is a stand-in for an `incoming-fds=on` TAP; the fds the source passed
/// (not storable) are stand-ins too: a memfd of the RAM's size, /dev/null for TAP queues.
final class FixtureTarget {
    /// The target's netdev: with `incoming` an `incoming-fds=on` one, which takes any fds
    /// (the real one checks they are TAPs); else one that opened its own TAP.
    final class IncomingBackend: NetBackend, @unchecked Sendable {
        let id = "n0"
        let ifname = ""
        let queueCount: Int
        private(set) var queueFDs: [FileDescriptor] = []
        let vnetHeader = true
        let incoming: Bool
        var adopted: Int { queueFDs.count }
        init(queues: Int, incoming: Bool) {
            queueCount = queues
            self.incoming = incoming
        }
        func attachQueues(count: Int) {}
        var awaitsIncomingQueues: Bool { incoming && queueFDs.isEmpty }
        func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws { queueFDs = fds }
    }

    let memory: GuestMemory
    let serial = Serial16550(output: { _ in })
    let pciBus: PCIBus
    let backend: IncomingBackend
    /// `vhostUser`: the NIC's netdev, an `incoming-fds=on` vhost-user one (it adopts the
    /// connection's stand-in silently: nothing is sent before the rings start).
    let vhostUser: VhostUserNetdev?
    let nic: VirtioNet
    let transport: VirtioPCITransport
    let received = ReceivedFDs()
    private(set) var ramPages = 0

    init(_ description: MachineDescription, recordedFDs: [String: Int], vhostUser: Bool = false) throws {
        let size = try #require(description.properties["ram-size"].flatMap { UInt64($0) })
        memory = try GuestMemory(size: size, shared: description.properties["local"] == "on")
        let device = try #require(description.devices.first { $0.type == "virtio-net-pci" })
        let pairs = try #require(device.properties["max_queue_pairs"].flatMap { Int($0) })
        backend = IncomingBackend(queues: pairs, incoming: device.properties["local-migration"] == "on")
        let mac = try #require(device.properties["mac"]).split(separator: ":").compactMap { UInt8($0, radix: 16) }
        let multiQueue = device.properties["mq"] == "on"
        let pairsUsed = VirtioNet.queuePairs(multiQueue: multiQueue, netdev: backend)
        self.vhostUser = vhostUser ? VhostUserNetdev(id: backend.id, incomingQueues: pairs, loop: try EventLoop(), logger: .init(label: "fixture")) : nil
        let datapath = try self.vhostUser?.makeDatapath(pairs: pairsUsed, memory: memory, memoryBackend: nil)
            ?? UserspaceTapDatapath(queues: backend, pairs: pairsUsed)
        nic = VirtioNet(id: device.id, mac: mac, datapath: datapath, multiQueue: multiQueue, logger: .init(label: "fixture"))
        nic.localMigration = device.properties["local-migration"] == "on"
        transport = VirtioPCITransport(name: device.id, model: nic, memory: memory, logger: .init(label: "fixture"))
        pciBus = try PCIBus()
        try pciBus.plug(transport)
        // The fds arrive before the sections that name them, in the source's order.
        if let ram = recordedFDs["kind 5"] {
            for _ in 0..<ram { received.append([try GuestMemory(size: size, shared: true).fd.duplicate()]) }
        }
        for (section, count) in recordedFDs where section != "kind 5" {
            received.append((0..<count).map { _ in FileDescriptor(adopting: open("/dev/null", O_RDONLY | O_CLOEXEC), label: "\(section) stand-in") })
        }
    }

    /// The whole stream through the target's receive state machine, as it arrives.
    /// `cpr`: a cpr-transfer's cpr channel (header, cpr state, its fds), read first; the
    /// netdev then claims its queues from it, as a `cpr=on` netdev does.
    func load(_ sections: [MigrationStream.Section], header: [UInt8], configuration: MachineDescription,
              cpr: (header: [UInt8], section: MigrationStream.Section, fds: ReceivedFDs)? = nil) throws {
        let target = IncomingTarget(description: configuration, devices: [serial, pciBus, transport], memory: memory,
                                    netdevOf: [nic.id: backend.id], progress: MigrationState(), restoreVCPU: { _ in })
        let incoming = IncomingMigration(expectsCPR: cpr != nil, target: target)
        if let cpr {
            try incoming.begin(.cpr, header: cpr.header, fds: cpr.fds)
            #expect(try incoming.receive(cpr.section, on: .cpr) == .finished)
            let (entry, queues) = try incoming.claimCPRNetdev(backend.id)
            try backend.adoptIncoming(queues, vnetHeader: entry.vnetHeader)
        }
        try incoming.begin(.main, header: header, fds: received)
        for section in sections {
            if section.kind == .ram { ramPages += 1 }
            _ = try incoming.receive(section, on: .main)
        }
        #expect(incoming.state == .completed)
    }
}
