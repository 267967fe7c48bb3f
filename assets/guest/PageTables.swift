import CPU

/// Run-time additions to the identity map from entry.S, which covers the
/// first 4 GiB. Firmware may place a 64-bit BAR above that; the 1 GiB region
/// around it is then mapped once through the spare tables. Relocating the BAR
/// below 4 GiB instead would need a free, decoded window there, which only
/// the firmware knows about.
enum PageTables {
    /// Everything below this is mapped from entry on.
    static let bootMappedLimit: UInt64 = 1 << 32

    private static let gigabyte: UInt64 = 1 << 30
    private static let largePage: UInt64 = 2 << 20

    /// Present, writable, accessed: the CPU never writes accessed bits back,
    /// which would cost a hypervisor trip per table under shadow paging.
    private static let tableEntry: UInt64 = 0x23
    /// Present, writable, write-through, cache-disable, accessed, dirty, 2 MiB page.
    private static let deviceLargePageEntry: UInt64 = 0xfb

    /// The region mapped through the spare tables; 0 while they are unused.
    nonisolated(unsafe) private static var highRegion: UInt64 = 0

    /// Makes `[address, address + length)` accessible at the same virtual
    /// address. Fails for a range that needs a second high region, crosses
    /// a 1 GiB boundary, or lies beyond what the CPU can address.
    static func map(_ address: UInt64, length: UInt64) -> Bool {
        let end = address &+ length
        guard end >= address else { return false }
        if end <= bootMappedLimit {
            return true
        }
        let region = address & ~(gigabyte - 1)
        guard end - region <= gigabyte else { return false }
        if region == highRegion {
            return true
        }
        guard highRegion == 0, end <= addressLimit() else { return false }

        // The directory is filled before any table points at it.
        let directory = memory_high_pd()!
        var entry = region | deviceLargePageEntry
        for index in 0..<512 {
            directory[index] = entry
            entry &+= largePage
        }
        let pml4Index = Int(truncatingIfNeeded: region >> 39)
        let pdptIndex = Int(truncatingIfNeeded: (region >> 30) & 511)
        let pdpt = pml4Index == 0 ? memory_pdpt()! : memory_high_pdpt()!
        pdpt[pdptIndex] = UInt64(UInt(bitPattern: directory)) | tableEntry
        if pml4Index != 0 {
            memory_pml4()![pml4Index] = UInt64(UInt(bitPattern: pdpt)) | tableEntry
        }
        cpu_reload_cr3()
        highRegion = region
        return true
    }

    /// The CPU's physical address width (CPUID 0x80000008), capped at 47
    /// bits because the identity map needs a canonical lower-half address.
    private static func addressLimit() -> UInt64 {
        var bits: UInt32 = 36
        if cpu_cpuid(0x8000_0000).eax >= 0x8000_0008 {
            bits = cpu_cpuid(0x8000_0008).eax & 0xff
        }
        return 1 << UInt64(min(bits, 47))
    }
}
