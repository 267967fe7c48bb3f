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
        var testDescription: String { name }
    }

    static let fixtures = ["v2", "v3"].flatMap { version in [
        Fixture(name: "\(version)-normal-1queue", queuePairs: 1, local: false),
        Fixture(name: "\(version)-local-tap-fds", queuePairs: 1, local: true),
        Fixture(name: "\(version)-normal-4queues", queuePairs: 4, local: false),
    ] }

    static func bytes(_ fixture: Fixture) throws -> [UInt8] {
        Array(try Data(contentsOf: URL(fileURLWithPath: "\(packageRoot)/Tests/Fixtures/streams/\(fixture.name).stream")))
    }

    /// The fds the source passed, as capture.py recorded them: (section name, count).
    static func recordedFDClaims(_ fixture: Fixture) throws -> [String: Int] {
        let data = try Data(contentsOf: URL(fileURLWithPath: "\(packageRoot)/Tests/Fixtures/streams/\(fixture.name).fds.json"))
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

        let target = try FixtureTarget(description, recordedFDs: try Self.recordedFDClaims(fixture))
        try target.load(sections, header: Array(bytes.prefix(MigrationStream.headerSize)), configuration: description)
        #expect(target.received.closeUnclaimed() == [], "every fd the source passed was claimed")
        #expect(target.ramPages > 0 || fixture.local)
        // The guest had booted: the NIC is live, with every pair it asked for.
        #expect(target.transport.status & VirtioPCITransport.Status.driverOK != 0)
        #expect(target.nic.queuePairsInUse == fixture.queuePairs)
        #expect(target.transport.negotiatedFeatures & VirtioPCITransport.featureVersion1 != 0)
        // Local: the TAP queues came as fds and went to the netdev; the RAM memfd replaced RAM.
        #expect(target.backend.adopted == (fixture.local ? fixture.queuePairs : 0))
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
    let nic: VirtioNet
    let transport: VirtioPCITransport
    let received = ReceivedFDs()
    private(set) var ramPages = 0

    init(_ description: MachineDescription, recordedFDs: [String: Int]) throws {
        let size = try #require(description.properties["ram-size"].flatMap { UInt64($0) })
        memory = try GuestMemory(size: size, shared: description.properties["local"] == "on")
        let device = try #require(description.devices.first { $0.type == "virtio-net-pci" })
        let pairs = try #require(device.properties["max_queue_pairs"].flatMap { Int($0) })
        backend = IncomingBackend(queues: pairs, incoming: device.properties["local-migration"] == "on")
        let mac = try #require(device.properties["mac"]).split(separator: ":").compactMap { UInt8($0, radix: 16) }
        let multiQueue = device.properties["mq"] == "on"
        nic = VirtioNet(id: device.id, mac: mac, datapath: UserspaceTapDatapath(queues: backend, pairs: VirtioNet.queuePairs(multiQueue: multiQueue, netdev: backend)),
                        multiQueue: multiQueue, logger: .init(label: "fixture"))
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
    func load(_ sections: [MigrationStream.Section], header: [UInt8], configuration: MachineDescription) throws {
        let target = IncomingTarget(description: configuration, devices: [serial, pciBus, transport], memory: memory,
                                    netdevOf: [nic.id: backend.id], progress: MigrationState(), restoreVCPU: { _ in })
        let incoming = IncomingMigration(expectsCPR: false, target: target)
        try incoming.begin(.main, header: header, fds: received)
        for section in sections {
            if section.kind == .ram { ramPages += 1 }
            _ = try incoming.receive(section, on: .main)
        }
        #expect(incoming.state == .completed)
    }
}
