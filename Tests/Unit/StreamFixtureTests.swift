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

    static let fixtures = [
        Fixture(name: "v2-normal-1queue", queuePairs: 1, local: false),
        Fixture(name: "v2-local-tap-fds", queuePairs: 1, local: true),
        Fixture(name: "v2-normal-4queues", queuePairs: 4, local: false),
    ]

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
        let sections = try MigrationStream.decodeAll(try Self.bytes(fixture))
        let configuration = try #require(sections.first)
        #expect(configuration.kind == .configuration)
        let description = try MachineDescription.decode(configuration.payload)
        #expect(description.properties["ram-size"] == String(64 << 20))
        #expect(description.properties["local"] == (fixture.local ? "on" : "off"))
        let nic = try #require(description.devices.first { $0.type == "virtio-net-pci" })
        #expect(nic.id == "net0")
        #expect(nic.properties["max_queue_pairs"] == String(fixture.queuePairs))

        let target = try FixtureTarget(description)
        let fdClaims = try target.load(sections)
        #expect(fdClaims == (try Self.recordedFDClaims(fixture)))
        #expect(target.loaded == ["cpu0", "serial0", "pci0", "net0"])
        #expect(target.ramPages > 0 || fixture.local)
        // The guest had booted: the NIC is live, with every pair it asked for.
        #expect(target.transport.status & VirtioPCITransport.Status.driverOK != 0)
        #expect(target.nic.queuePairsInUse == fixture.queuePairs)
        #expect(target.transport.negotiatedFeatures & VirtioPCITransport.featureVersion1 != 0)
    }
}

/// The devices an incoming machine builds from the configuration section (one NIC on an
/// `incoming-fds=on` TAP stand-in, whose queues are not opened), loading sections as
/// `Machine.receive` does. Returns which sections claimed how many fds.
final class FixtureTarget {
    let memory: GuestMemory
    let serial = Serial16550(output: { _ in })
    let pciBus: PCIBus
    let nic: VirtioNet
    let transport: VirtioPCITransport
    private(set) var loaded: Set<String> = []
    private(set) var ramPages = 0

    init(_ description: MachineDescription) throws {
        memory = try GuestMemory(size: UInt64(try #require(description.properties["ram-size"].flatMap { UInt64($0) })))
        let device = try #require(description.devices.first { $0.type == "virtio-net-pci" })
        let pairs = try #require(device.properties["max_queue_pairs"].flatMap { Int($0) })
        let backend = TapBackend(id: "n0", incomingQueues: pairs)
        let mac = try #require(device.properties["mac"]).split(separator: ":").compactMap { UInt8($0, radix: 16) }
        nic = VirtioNet(id: device.id, mac: mac, backend: backend, multiQueue: device.properties["mq"] == "on", logger: .init(label: "fixture"))
        transport = VirtioPCITransport(name: device.id, model: nic, memory: memory, logger: .init(label: "fixture"))
        nic.transport = transport
        pciBus = try PCIBus()
        try pciBus.plug(transport)
    }

    func load(_ sections: [MigrationStream.Section]) throws -> [String: Int] {
        var claims: [String: Int] = [:]
        let progress = MigrationState()
        for section in sections.dropFirst() {
            if section.fdCount > 0 { claims[section.name.isEmpty ? "kind \(section.kind.rawValue)" : section.name] = section.fdCount }
            switch section.kind {
            case .ram:
                try RAMTransfer.load(section.payload, into: memory, progress: progress)
                ramPages += 1
            case .sharedRAM:
                #expect(try SharedRAM.decode(section.payload) == .memfd(size: memory.size))
            case .vcpu:
                _ = try VCPUState.decode(section.payload)
                loaded.insert(section.name)
            case .device:
                switch section.name {
                case "serial0": try serial.load(section.payload)
                case "pci0": try pciBus.load(section.payload)
                case "\(nic.id)/transport": try transport.load(section.payload)
                case "\(nic.id)/net": try nic.load(section.payload)
                case "\(nic.id)/tap":
                    var r = StreamReader(section.payload, context: section.name)
                    #expect(Int(try r.u16("queue count")) == section.fdCount)
                    _ = try r.bool("vnet header")
                    try r.finish()
                default: throw StreamError("unexpected section \(section.label)")
                }
                loaded.insert(String(section.name.split(separator: "/")[0]))
            case .switchover, .end: break
            case .configuration: throw StreamError("a second configuration section")
            }
        }
        return claims
    }
}
