import Glibc
import Testing
@testable import VMMCore

/// vhost's dirty log: the VMM's memfd, a back-end's mapping of it, and the translation
/// of its guest-physical bits into the host-offset bitmap pre-copy sends from.
@Suite struct VhostDirtyLogTests {
    /// q35-like: 3 GiB low, 1 GiB above 4 GiB (host offset 3 GiB).
    static let regions = GuestMemory.layout(size: 4 << 30)
    static let hostPages = Int((4 << 30) / VhostDirtyLog.pageSize)

    static func backEnd(of log: VhostDirtyLog) throws -> VhostDirtyLog {
        try VhostDirtyLog(mapping: log.fd!.duplicate(), size: log.size, offset: 0)
    }

    @Test func coversEveryGuestPhysicalPageInWholeWords() throws {
        let log = try VhostDirtyLog(regions: Self.regions)
        #expect(log.size == (5 << 30) / 4096 / 8, "a bit per page up to 5 GiB, the end of the high region")
        #expect(log.fd != nil)
        let small = try GuestMemory(size: 1 << 20, name: "vhost-log-test")
        let smallLog = try VhostDirtyLog(covering: small)
        #expect(smallLog.size == 32, "256 pages: 4 words")
    }

    /// What a back-end marks by guest-physical address arrives at the page's host offset,
    /// once: collecting clears the log.
    @Test func backEndMarksArriveByHostOffsetAndAreTakenOnce() throws {
        let log = try VhostDirtyLog(regions: Self.regions)
        let backEnd = try Self.backEnd(of: log)
        #expect(backEnd.mark(guestAddress: 0x1000, count: 1))
        #expect(backEnd.mark(guestAddress: 0x2FFF, count: 2), "two pages: 2 and 3")
        #expect(backEnd.mark(guestAddress: (4 << 30) + 0x5000, count: 4096), "first page of high RAM + 5")
        var bitmap = [UInt64](repeating: 0, count: Self.hostPages / 64)
        log.collect(into: &bitmap)
        let set = bitmap.enumerated().flatMap { i, w in (0..<64).filter { w >> UInt64($0) & 1 != 0 }.map { i * 64 + $0 } }
        #expect(set == [1, 2, 3, (3 << 30) / 4096 + 5])
        var again = [UInt64](repeating: 0, count: Self.hostPages / 64)
        log.collect(into: &again)
        #expect(again.allSatisfy { $0 == 0 }, "the first collection cleared the log")
    }

    /// A bit in the PCI hole (no RAM) or a range past the log is dropped, not a crash.
    @Test func marksOutsideRAMOrPastTheLogAreDropped() throws {
        let log = try VhostDirtyLog(regions: Self.regions)
        let backEnd = try Self.backEnd(of: log)
        #expect(backEnd.mark(guestAddress: 0xD000_0000, count: 8), "in the hole: inside the log")
        #expect(!backEnd.mark(guestAddress: 5 << 30, count: 1), "past the log")
        #expect(!backEnd.mark(guestAddress: (5 << 30) - 4096, count: 8192), "straddles the log's end")
        #expect(!backEnd.mark(guestAddress: UInt64.max - 10, count: 100), "wraps around")
        var bitmap = [UInt64](repeating: 0, count: Self.hostPages / 64)
        log.collect(into: &bitmap)
        let set = bitmap.enumerated().flatMap { i, w in (0..<64).filter { w >> UInt64($0) & 1 != 0 }.map { i * 64 + $0 } }
        #expect(set == [Self.hostPages - 1], "only the last page of high RAM, from the straddling range")
    }

    /// A front-end's SET_LOG_BASE values are untrusted: each bad one is an error naming it.
    @Test func aBackEndRefusesABadLogNamingTheValue() throws {
        let log = try VhostDirtyLog(regions: Self.regions)
        func refusal(_ fd: FileDescriptor, size: UInt64, offset: UInt64) -> String {
            do {
                _ = try VhostDirtyLog(mapping: fd, size: size, offset: offset)
                return "accepted"
            } catch { return "\(error)" }
        }
        #expect(refusal(try log.fd!.duplicate(), size: 0, offset: 0) == "log size 0 is out of range 1...1073741824 bytes")
        #expect(refusal(try log.fd!.duplicate(), size: 1 << 31, offset: 0) == "log size 2147483648 is out of range 1...1073741824 bytes")
        #expect(refusal(try log.fd!.duplicate(), size: 8, offset: 8) == "log offset 0x8 is not page-aligned")
        #expect(refusal(try log.fd!.duplicate(), size: log.size, offset: 4096).contains("exceeds its fd's \(log.size) bytes"))
        #expect(refusal(try log.fd!.duplicate(), size: 4096, offset: UInt64.max & ~4095).contains("exceeds"), "offset + size overflows")
        let event = try EventFD(label: "not a file")
        #expect(refusal(event.fd, size: 8, offset: 0).contains("not a file"))
    }
}

/// A datapath whose "back-end" writes guest RAM through a vhost dirty log, to see the
/// hooks reach it through the device as the migration source calls them.
final class DirtyLoggingDatapath: NetDatapath, @unchecked Sendable {
    let netdevID = "log"
    let ifname = ""
    let kind = DatapathKind.userspace
    let notification = DatapathNotification.eventFDs
    let queuePairs = 1
    let vnetHeader = true
    let awaitsIncomingFDs = false
    var statistics: (rx: [UInt64], tx: [UInt64]) { ([0], [0]) }
    let memory: GuestMemory
    var log: VhostDirtyLog?
    var calls: [String] = []
    init(memory: GuestMemory) { self.memory = memory }
    func attach(to host: DeviceHost) {}
    func detach() {}
    func handedOverFDs() -> [NamedFD] { [] }
    func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws {}
    func setActivePairs(_ pairs: Int) {}
    func notified(_ index: Int) {}
    func start(_ rings: [Int: RingHandoff], activePairs: Int, context: DatapathContext) {}
    func stop() -> [Int: Virtqueue] { [:] }
    func startDirtyLog() throws {
        calls.append("start")
        log = try VhostDirtyLog(covering: memory)
    }
    func collectDirty(into bitmap: inout [UInt64]) {
        calls.append("collect")
        log?.collect(into: &bitmap)
    }
    func stopDirtyLog() {
        calls.append("stop")
        log = nil
    }
}

@Suite struct DirtyLogHookTests {
    /// `MachineDevice`'s hooks on a virtio-net function reach its datapath, and pages its
    /// back-end logged land in the caller's bitmap.
    @Test func theDeviceForwardsTheHooksToItsDatapath() throws {
        let memory = try GuestMemory(size: 4 << 20, name: "hook-test")
        let datapath = DirtyLoggingDatapath(memory: memory)
        let nic = VirtioNet(id: "nic0", mac: [0x52, 0x54, 0, 1, 2, 3], datapath: datapath, multiQueue: false, logger: .init(label: "t"))
        let device: any MachineDevice = VirtioPCITransport(name: "nic0", model: nic, memory: memory, logger: .init(label: "t"))
        try device.startDirtyLog()
        let backEnd = try VhostDirtyLog(mapping: datapath.log!.fd!.duplicate(), size: datapath.log!.size, offset: 0)
        backEnd.mark(guestAddress: 0x3000, count: 1)
        var bitmap = [UInt64](repeating: 0, count: memory.deviceDirty.wordCount)
        device.collectDirty(into: &bitmap)
        device.stopDirtyLog()
        #expect(bitmap[0] == 1 << 3)
        #expect(datapath.calls == ["start", "collect", "stop"])
    }
}
