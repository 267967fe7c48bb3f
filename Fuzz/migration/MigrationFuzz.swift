import FuzzSupport
import Logging
@testable import VMMCore

/// The migration target's reader: stream header, section framing and CRCs, the
/// configuration section (`MachineDescription`) and its comparison with this machine, RAM
/// records, the shared-RAM section, the vCPU state, and each device's state loader (serial,
/// PCI bus, the virtio-net function with its queues), through the target's own receive
/// state machine (`IncomingMigration`), as a migration's main channel delivers them. No
/// KVM: the vCPU state is decoded, not restored.
///
/// The first input byte picks how the rest is read:
/// - 0: a whole stream as it arrives (a mutation almost always breaks a CRC, which tests the framing);
/// - 1: a whole stream whose CRCs are recomputed first, so mutations reach the loaders;
/// - 2: one section payload for the loader that the next byte picks (see `loaders`), after
///   a valid header and this machine's own configuration;
/// - 3: a cpr state payload on a cpr-transfer target's cpr channel (`CPRState`).
/// Seeds are cut from a real migration (docs/reliability.md says how it was captured).
@main enum FuzzMigration {
    static func main() { runLibFuzzer(fuzz) }
}

/// What the machine that captured the seed stream has, so the seeds load in full.
final class TargetMachine {
    static let ramSize: UInt64 = 128 << 20
    let memory: GuestMemory
    let serial = Serial16550(output: { _ in })
    let pciBus: PCIBus
    let backend = TapBackend(id: "n0", incomingQueues: 2)
    let nic: VirtioNet
    let transport: VirtioPCITransport
    let received = ReceivedFDs()
    /// The target's own receive state machine, as `Machine` drives it.
    let incoming: IncomingMigration
    let description: MachineDescription
    let target: IncomingTarget

    init() throws {
        memory = try GuestMemory(size: Self.ramSize)
        let logger = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
        nic = VirtioNet(id: "net0", mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56], datapath: UserspaceTapDatapath(queues: backend, pairs: 2),
                        multiQueue: true, logger: logger)
        transport = VirtioPCITransport(name: "net0", model: nic, memory: memory, logger: logger)
        pciBus = try PCIBus()
        try pciBus.plug(transport)
        description = MachineDescription(properties: ["ram-size": String(Self.ramSize), "vcpus": "1", "local": "off"], devices: [
            .init(id: "serial0", type: "isa-serial", properties: [:]),
            .init(id: "net0", type: "virtio-net-pci", properties: ["max_queue_pairs": "2", "mq": "on", "mac": "52:54:0:12:34:56", "local-migration": "on"]),
        ])
        target = IncomingTarget(
            description: description, devices: [serial, pciBus, transport], memory: memory, netdevOf: [nic.id: backend.id],
            progress: MigrationState(), restoreVCPU: { _ in })
        incoming = IncomingMigration(expectsCPR: false, target: target)
    }

    /// A cpr channel's one section with any payload (mode 3): the cpr state decoder,
    /// through a cpr-transfer target's state machine.
    func receiveCPR(_ payload: [UInt8]) throws {
        let cpr = IncomingMigration(expectsCPR: true, target: target)
        try cpr.begin(.cpr, header: MigrationStream.header(), fds: ReceivedFDs())
        _ = try cpr.receive(.init(kind: .cprState, payload: payload), on: .cpr)
    }

    /// A whole stream, header first, each section a transition of the state machine.
    func receive(_ stream: [UInt8]) throws {
        try incoming.begin(.main, header: Array(stream.prefix(MigrationStream.headerSize)), fds: received)
        for section in try MigrationStream.decodeAll(stream) { _ = try incoming.receive(section, on: .main) }
    }

    /// One section after a valid header and this machine's own configuration: reaches
    /// each loader with any payload (mode 2).
    func receive(_ section: MigrationStream.Section) throws {
        try incoming.begin(.main, header: MigrationStream.header(), fds: received)
        if section.kind != .configuration {
            _ = try incoming.receive(.init(kind: .configuration, payload: description.encode()), on: .main)
        }
        _ = try incoming.receive(section, on: .main)
    }
}

/// Mode 2's loaders: one section payload each, as this build's (v3) sections name them.
let loaders: [(MigrationStream.Kind, String)] = [
    (.configuration, ""), (.ram, ""), (.sharedRAM, ""), (.vcpu, "cpu0"),
    (.device, "serial0"), (.device, "pci0"), (.device, "net0"),
]

/// Recomputes each frame's CRC-32C in place, as far as the frame lengths hold.
func fixingChecksums(_ stream: [UInt8]) -> [UInt8] {
    var bytes = stream
    var offset = MigrationStream.headerSize
    while offset + 4 <= bytes.count {
        let length = Int(bytes[offset]) | Int(bytes[offset + 1]) << 8 | Int(bytes[offset + 2]) << 16 | Int(bytes[offset + 3]) << 24
        guard length >= 4, offset + 4 + length <= bytes.count else { break }
        let crc = CRC32C.checksum(bytes[offset + 4..<offset + length])
        for i in 0..<4 { bytes[offset + length + i] = UInt8(truncatingIfNeeded: crc >> (8 * i)) }
        offset += 4 + length
    }
    return bytes
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let mode = input.u8() % 4
    let machine = try! TargetMachine()
    if mode == 3 {
        try? machine.receiveCPR(input.rest())
        return 0
    }
    if mode == 2 {
        let (kind, name) = loaders[Int(input.u8()) % loaders.count]
        try? machine.receive(.init(kind: kind, name: name, payload: input.rest()))
        return 0
    }
    var stream = input.rest()
    if mode == 1 { stream = fixingChecksums(stream) }
    try? machine.receive(stream)
    return 0
}
