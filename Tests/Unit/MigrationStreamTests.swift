import Glibc
import Testing
@testable import VMMCore

@Suite struct MigrationStreamTests {
    static let sections: [MigrationStream.Section] = [
        .init(kind: .configuration, payload: MachineDescription(properties: ["ram-size": "134217728"], devices: []).encode()),
        .init(kind: .ram, payload: [UInt8](repeating: 0xAB, count: 5000)),
        .init(kind: .vcpu, name: "cpu0", payload: Array(0..<200)),
        .init(kind: .device, name: "net0", payload: [1, 2, 3], fdNames: ["netdev/n1/tap.0", "netdev/n1/tap.1"]),
        .init(kind: .end),
    ]

    static func stream() -> [UInt8] { MigrationStream.header() + sections.flatMap { MigrationStream.encode($0) } }

    @Test func roundTripsEverySection() throws {
        #expect(try MigrationStream.decodeAll(Self.stream()) == Self.sections)
    }

    /// Cutting the stream anywhere, in particular at every section boundary, gives an
    /// error and never a shorter stream that parses.
    @Test func truncationAnywhereIsAnError() throws {
        let bytes = Self.stream()
        var boundaries = [MigrationStream.headerSize]
        for section in Self.sections { boundaries.append(boundaries.last! + MigrationStream.encode(section).count) }
        let cuts = Set(boundaries.dropLast() + Array(stride(from: 0, to: bytes.count, by: 97)) + [bytes.count - 1])
        for cut in cuts.sorted() {
            #expect(throws: StreamError.self, "cut at \(cut)") { try MigrationStream.decodeAll(Array(bytes.prefix(cut))) }
        }
    }

    @Test func flippedBitsAreCaughtByTheChecksum() throws {
        var bytes = Self.stream()
        for position in stride(from: MigrationStream.headerSize + 4, to: bytes.count, by: 131) {
            bytes[position] ^= 0x10
            #expect(throws: StreamError.self, "bit flip at \(position)") { try MigrationStream.decodeAll(bytes) }
            bytes[position] ^= 0x10
        }
    }

    @Test func foreignStreamsAreNamed() throws {
        let qemu = Array("QEVM".utf8) + [0, 0, 0, 3] + [UInt8](repeating: 0, count: 16)
        #expect { try MigrationStream.checkHeader(qemu) } throws: { "\($0)".contains("QEMU migration stream") }
        var skew = MigrationStream.header()
        skew[8] = 9
        #expect { try MigrationStream.checkHeader(skew) } throws: { "\($0)" == "migration stream version 9 is not supported (this VMM reads 2...3)" }
        skew[8] = 2
        #expect(try MigrationStream.checkHeader(skew) == 2)
        #expect { try MigrationStream.checkHeader(Array("GET / HTTP/1.1\r\n".utf8)) } throws: { "\($0)".contains("not a swift-vmm") }
    }

    @Test func absurdFrameLengthsAreRefusedBeforeAllocating() {
        #expect(throws: StreamError.self) { try MigrationStream.frameLength([0xFF, 0xFF, 0xFF, 0x7F]) }
        #expect(throws: StreamError.self) { try MigrationStream.frameLength([1, 0, 0, 0]) }
    }

    @Test func bytesAfterTheEndSectionAreAnError() {
        #expect(throws: StreamError.self) { try MigrationStream.decodeAll(Self.stream() + [0]) }
    }
}

@Suite struct MachineDescriptionTests {
    static func machine(queuePairs: String = "4", mq: String = "on", ram: String = "134217728", extraDevice: Bool = false) -> MachineDescription {
        var devices = [MachineDescription.Device(id: "net0", type: "virtio-net-pci",
                                                 properties: ["max_queue_pairs": queuePairs, "mq": mq, "local-migration": "on"])]
        if extraDevice { devices.append(.init(id: "net1", type: "virtio-net-pci", properties: [:])) }
        return MachineDescription(properties: ["ram-size": ram, "local": "on"], devices: devices)
    }

    @Test func roundTrips() throws {
        let m = Self.machine(extraDevice: true)
        #expect(try MachineDescription.decode(m.encode()) == m)
    }

    @Test func agreeingMachinesPass() throws {
        try Self.machine().check(target: Self.machine())
    }

    @Test(arguments: [
        (machine(queuePairs: "2"), "device 'net0' (virtio-net-pci): property 'max_queue_pairs' is 4 on the source but 2 on the target"),
        (machine(mq: "off"), "property 'mq' is on on the source but off on the target"),
        (machine(ram: "268435456"), "machine: property 'ram-size' is 134217728 on the source but 268435456 on the target"),
        (machine(extraDevice: true), "device 'net1' (virtio-net-pci) exists on the target but not on the source"),
        (MachineDescription(properties: ["ram-size": "134217728", "local": "on"], devices: []), "device 'net0' (virtio-net-pci) exists on the source but not on the target"),
        (MachineDescription(properties: ["ram-size": "134217728"], devices: machine().devices), "property 'local' is on on the source but unset on the target"),
    ])
    func mismatchesNameDevicePropertyAndBothValues(target: MachineDescription, message: String) {
        #expect { try Self.machine().check(target: target) } throws: { "\($0)".contains(message) }
    }

    @Test func truncatedDescriptionsFail() {
        let bytes = Self.machine().encode()
        for cut in 0..<bytes.count {
            #expect(throws: StreamError.self) { try MachineDescription.decode(Array(bytes.prefix(cut))) }
        }
    }
}

@Suite struct ReceivedFDsTests {
    func openFDs(_ n: Int) -> [FileDescriptor] {
        (0..<n).map { _ in FileDescriptor(adopting: open("/dev/null", O_RDONLY | O_CLOEXEC), label: "/dev/null") }
    }

    /// Pipes whose write ends go into the table: a closed write end reads as EOF on its
    /// read end. Checking an fd *number* is racy here, since tests running in parallel
    /// reuse a closed number at once.
    func pipes(_ n: Int) -> [(read: Int32, write: Int32)] {
        (0..<n).map { _ in
            var p: [Int32] = [-1, -1]
            _ = pipe(&p)
            p.forEach { _ = fcntl($0, F_SETFL, O_NONBLOCK); _ = fcntl($0, F_SETFD, FD_CLOEXEC) }
            return (p[0], p[1])
        }
    }

    func writerClosed(_ readEnd: Int32) -> Bool {
        var byte: UInt8 = 0
        return read(readEnd, &byte, 1) == 0
    }

    @Test func bindsInArrivalOrderClaimsByNameAndClosesTheRest() throws {
        let table = ReceivedFDs()
        let ends = pipes(5)
        defer { ends.forEach { close($0.read) } }
        table.append(ends.map { FileDescriptor(adopting: $0.write, label: "pipe") })
        try table.bind(["netdev/n1/tap.0", "netdev/n1/tap.1"], for: "device 'net0'")
        try table.bind(["machine/ram"], for: "shared RAM")
        let second = try table.claim("netdev/n1/tap.1", by: "netdev 'n1'")
        #expect(second.withRaw { $0 } == ends[1].write)
        // Unclaimed (bound or never named) are closed and named.
        #expect(table.closeUnclaimed() == ["netdev/n1/tap.0", "machine/ram", "unnamed", "unnamed"])
        #expect([0, 2, 3, 4].allSatisfy { writerClosed(ends[$0].read) })
        #expect(!writerClosed(ends[1].read))
    }

    @Test func bindingAndClaimingErrorsNameSectionAndFD() throws {
        let table = ReceivedFDs()
        table.append(openFDs(2))
        #expect { try table.bind(["a", "b", "c"], for: "device 'net0'") } throws: { "\($0)" == "device 'net0' names 3 file descriptor(s) but only 2 arrived" }
        #expect { try table.bind(["a", "a"], for: "device 'net0'") } throws: { "\($0)" == "device 'net0' names file descriptor a a second time" }
        #expect { try table.claim("netdev/n1/tap.3", by: "netdev 'n1'") } throws: {
            "\($0)" == "netdev 'n1' expects netdev/n1/tap.3, which the stream did not carry"
        }
    }
}

/// One owner per fd: `take` hands it on, the last owner's release closes it.
@Suite struct FileDescriptorTests {
    func pipe() -> (read: Int32, write: FileDescriptor) {
        let (read, write) = ReceivedFDsTests().pipes(1)[0]
        return (read, FileDescriptor(adopting: write, label: "pipe write end"))
    }

    @Test func releasingTheOwnerClosesTheFD() {
        let read: Int32
        do {
            let (r, write) = pipe()
            read = r
            #expect(write.isOpen && !ReceivedFDsTests().writerClosed(read))
        }
        defer { close(read) }
        #expect(ReceivedFDsTests().writerClosed(read))
    }

    @Test func takeMovesOwnershipAndEmptiesTheSource() {
        let (read, write) = pipe()
        defer { close(read) }
        let taken = write.take(label: "moved")
        #expect(!write.isOpen)
        #expect(taken.isOpen && taken.label == "moved")
        write.close()  // the old holder letting go closes nothing
        #expect(!ReceivedFDsTests().writerClosed(read))
        taken.close()
        #expect(ReceivedFDsTests().writerClosed(read))
    }

    @Test func duplicateIsASecondOwner() throws {
        let (read, write) = pipe()
        defer { close(read) }
        let copy = try write.duplicate(label: "copy")
        write.close()
        #expect(!ReceivedFDsTests().writerClosed(read))
        copy.close()
        #expect(ReceivedFDsTests().writerClosed(read))
    }

    /// What TapBackend.adopt used four hand-written closes for: fds that are not TAP
    /// queues are refused, and closed with the refusal.
    @Test func refusedTapQueuesAreClosed() {
        let (read, write) = pipe()
        defer { close(read) }
        #expect { try TapBackend(id: "n1", adopting: [write], vnetHeader: nil) } throws: { "\($0)".contains("netdev n1: fd") && "\($0)".contains("is not a TAP queue") }
        #expect(!write.isOpen)
        #expect(ReceivedFDsTests().writerClosed(read))
    }
}
