import Glibc
import Testing
@testable import VMMCore

/// The backend's memory table at its edges: two regions of one memfd, adjacent in user
/// space but not in guest physical space (as QEMU's q35 RAM around the VGA hole).
@Suite struct VhostUserMemoryTableTests {
    static let user: UInt64 = 0x7F00_0000_0000
    static let regions = [
        VhostUserMemoryRegion(guestAddress: 0, size: 0xA0000, userAddress: user, mmapOffset: 0),
        VhostUserMemoryRegion(guestAddress: 0xC0000, size: 0x40000, userAddress: user + 0xA0000, mmapOffset: 0xC0000),
    ]

    static func table() throws -> (VhostUserMemoryTable, GuestMemory) {
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true, name: "vu-table-test")
        return (try VhostUserMemoryTable(regions: regions, fds: [ram.fd.duplicate(), ram.fd.duplicate()]), ram)
    }

    @Test func userAddressesTranslateOnlyWithinOneRegion() throws {
        let (table, _) = try Self.table()
        #expect(table.guestAddress(ofUser: Self.user, count: 16) == 0)
        #expect(table.guestAddress(ofUser: Self.user + 0x9FFF0, count: 16) == 0x9FFF0, "the last 16 bytes of region 0")
        #expect(table.guestAddress(ofUser: Self.user + 0x9FFF8, count: 16) == nil, "across the regions' boundary")
        #expect(table.guestAddress(ofUser: Self.user + 0xA0000, count: 16) == 0xC0000, "the first bytes of region 1")
        #expect(table.guestAddress(ofUser: Self.user + 0xDFFF0, count: 16) == 0xFFFF0)
        #expect(table.guestAddress(ofUser: Self.user + 0xE0000, count: 1) == nil, "past the last region")
        #expect(table.guestAddress(ofUser: Self.user - 1, count: 1) == nil, "before the first region")
        #expect(table.guestAddress(ofUser: UInt64.max, count: 16) == nil)
    }

    /// Guest physical accesses map to the region's own part of the fd (its mmap offset).
    @Test func guestAccessesStayInsideTheirRegionAndItsPartOfTheFile() throws {
        let (table, ram) = try Self.table()
        try table.storeLE(UInt32(0xDEADBEEF), at: 0xC0010)
        #expect(try ram.load(UInt32.self, at: 0xC0010) == 0xDEADBEEF, "same bytes through the VMM's view")
        #expect(throws: GuestMemoryError.self) { try table.slice(at: 0x9FFFC, count: 8) }
        #expect(throws: GuestMemoryError.self) { try table.slice(at: 0xA0000, count: 1) }
        #expect(throws: GuestMemoryError.self) { try table.slice(at: 0xFFFFF, count: 2) }
        #expect(throws: GuestMemoryError.self) { try table.slice(at: UInt64.max, count: 2) }
        #expect(try table.slice(at: 0xFFFFF, count: 1).count == 1)
    }
}
