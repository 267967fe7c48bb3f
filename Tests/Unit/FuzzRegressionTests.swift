import Foundation
import Testing
@testable import VMMCore

/// Inputs the fuzz targets (Fuzz/, run by ci/fuzz) crashed or hung on, kept in
/// Tests/Fixtures/fuzz-crashes/<target>/ and replayed the way that target reads them.
@Suite struct FuzzRegressionTests {
    static func fixture(_ path: String) throws -> [UInt8] {
        let full = packageRoot + "/Tests/Fixtures/fuzz-crashes/" + path
        guard let data = FileManager.default.contents(atPath: full) else { throw StreamError("cannot read \(full)") }
        return [UInt8](data)
    }

    /// The virtqueue target's input: the queue registers (little-endian size, descriptor
    /// table, driver area, device area, last available, used index, a not-ready flag),
    /// then guest RAM from address 0.
    static func queue(_ bytes: [UInt8], in memory: GuestMemory) throws -> Virtqueue {
        var r = StreamReader(Array(bytes.prefix(31)), context: "virtqueue fuzz input")
        var queue = Virtqueue(maxSize: 256)
        queue.size = try r.u16("size")
        queue.descriptorTable = try r.u64("descriptor table")
        queue.driverArea = try r.u64("driver area")
        queue.deviceArea = try r.u64("device area")
        queue.lastAvailable = try r.u16("last available")
        queue.usedIndex = try r.u16("used index")
        queue.ready = try r.u8("not ready") & 1 == 0
        try memory.write(bytes.dropFirst(31), at: 0)
        return queue
    }

    /// A driver area 2 bytes below 2^64: reading avail.idx computed the address with a
    /// trapping `+` (signal 4) instead of reporting a ring outside guest RAM.
    @Test func virtqueueRingAddressNearTwoToTheSixtyFour() throws {
        let memory = try GuestMemory(size: 1 << 20)
        var queue = try Self.queue(Self.fixture("virtqueue/driver-area-overflow"), in: memory)
        #expect(throws: VirtqueueError.self) { try queue.validateLayout(in: memory) }
        // The walker must not rely on that check (it ran only at DRIVER_OK; a queue
        // enabled later went unchecked).
        queue.ready = true
        #expect(throws: VirtqueueError.self) { _ = try queue.hasAvailable(in: memory) }
        #expect(throws: VirtqueueError.self) { _ = try queue.popAvailable(from: memory) }
        #expect(throws: VirtqueueError.self) { try queue.pushUsed(head: 0, length: 0, to: memory) }
    }

    /// The used ring on top of the available ring: each returned chain rewrote avail.idx,
    /// so the device never ran out of chains (the fuzz target's 65536-chain limit; the
    /// device's TX loop spun forever). The layout check refuses it now.
    @Test func virtqueueUsedRingOverAvailableRingIsRefused() throws {
        let memory = try GuestMemory(size: 1 << 20)
        let queue = try Self.queue(Self.fixture("virtqueue/used-ring-over-available-ring"), in: memory)
        let error = try #require(throws: VirtqueueError.self) { try queue.validateLayout(in: memory) }
        #expect(error.description.contains("overlaps the available ring"))
    }

    /// A segment memory size of 2^64 - 5 GiB: `PVHBoot.load` trapped converting it to Int.
    @Test func elfSegmentMemorySizePastIntMax() throws {
        let bytes = try Self.fixture("elf/segment-memsz-huge")
        let memory = try GuestMemory(size: 4 << 20)
        // Refused by the parser or by the loader, whichever checks it: an error, not a trap.
        #expect(throws: (any Error).self) {
            try PVHBoot.load(try ELFImage(bytes: bytes), into: memory, commandLine: "", flags: 0)
        }
    }
}
