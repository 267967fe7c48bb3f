import Foundation
import Glibc
import Testing
@testable import VMMCore

/// A migration target's RAM before pages are copied in (issue 8 §1b), and the
/// configuration properties that are informational or compared only with `local`.
@Suite struct MigrationTargetRAMTests {
    static let size = 2 << 20

    /// A /dev/shm file of `size` bytes, all `fill`; removed by the caller.
    static func filledFile(_ fill: UInt8, tag: String) throws -> String {
        let path = "/dev/shm/vmm-unit-ram-\(getpid())-\(tag)"
        #expect(FileManager.default.createFile(atPath: path, contents: Data(repeating: fill, count: size)))
        return path
    }

    static func allZero(_ memory: GuestMemory) throws -> Bool {
        try memory.read(at: 0, count: size).allSatisfy { $0 == 0 }
    }

    @Test func sharedFileWithDataIsPunchedOut() throws {
        let path = try Self.filledFile(0xFF, tag: "shared")
        defer { unlink(path) }
        let memory = try GuestMemory(size: UInt64(Self.size), backing: .file(path: path), shared: true)
        #expect(try !Self.allZero(memory))
        try memory.emptyForCopy(sourceRAMFile: "1:2")
        // Holes now, not written zeros: nothing stays allocated for them. (Checked before
        // reading: reading a hole of a shared tmpfs mapping allocates the page.)
        #expect(memory.dataExtents(in: 0..<UInt64(Self.size)) == [])
        #expect(try Self.allZero(memory))
    }

    @Test func privateFileIsLeftAloneAndTheGuestSeesZeros() throws {
        let path = try Self.filledFile(0xFF, tag: "private")
        defer { unlink(path) }
        let memory = try GuestMemory(size: UInt64(Self.size), backing: .file(path: path), shared: false)
        try memory.emptyForCopy(sourceRAMFile: nil)
        #expect(try Self.allZero(memory))
        try memory.write([1, 2, 3], at: 4096)
        #expect(try Data(contentsOf: URL(fileURLWithPath: path)).allSatisfy { $0 == 0xFF })
    }

    @Test func theSourcesOwnFileIsRefused() throws {
        let path = try Self.filledFile(0xAB, tag: "same")
        defer { unlink(path) }
        let memory = try GuestMemory(size: UInt64(Self.size), backing: .file(path: path), shared: true)
        let identity = try #require(memory.fileIdentity)
        #expect { try memory.emptyForCopy(sourceRAMFile: identity) } throws: { "\($0)".contains("the source copies its RAM into \(path)") }
        #expect(try memory.read(at: 0, count: 1) == [0xAB])
    }

    @Test func knownZeroRAMIsNotTouched() throws {
        let memfd = try GuestMemory(size: UInt64(Self.size), shared: true)
        try memfd.emptyForCopy(sourceRAMFile: nil)
        #expect(memfd.dataExtents(in: 0..<UInt64(Self.size)) == [])
        let path = "/dev/shm/vmm-unit-ram-\(getpid())-fresh"
        defer { unlink(path) }
        let fresh = try GuestMemory(size: UInt64(Self.size), backing: .file(path: path), shared: true)
        try fresh.emptyForCopy(sourceRAMFile: fresh.fileIdentity)  // no data: nothing to empty, nothing refused
        #expect(try Self.allZero(fresh))
    }

    @Test func ramFileIsInformationalAndLocalMigrationIsComparedAsGiven() {
        let nic = MachineDescription.Device(id: "nic0", type: "virtio-net-pci", properties: ["mq": "on"])
        let source = MachineDescription(properties: ["ram-size": "1", "ram-file": "1:2"], devices: [nic])
        let target = MachineDescription(properties: ["ram-size": "1", "ram-file": "3:4"], devices: [nic])
        #expect(source.mismatches(target: target).isEmpty)
        let targetWithoutFile = MachineDescription(properties: ["ram-size": "1"], devices: [nic])
        #expect(source.mismatches(target: targetWithoutFile).isEmpty)
    }
}
