/// A type-0 PCI configuration header with capability list and BARs. Writes go through a
/// per-byte mask, so a guest can only change what a real device lets it change.
public struct PCIConfigSpace: Sendable {
    public static let size = 256

    public struct BAR: Sendable, Equatable {
        public var size: UInt32
        public var isIO: Bool
        public var is64Bit: Bool
    }

    var bytes = [UInt8](repeating: 0, count: PCIConfigSpace.size)
    var writeMask = [UInt8](repeating: 0, count: PCIConfigSpace.size)
    /// Bits that a write of 1 clears (status register error bits).
    var clearOnWrite = [UInt8](repeating: 0, count: PCIConfigSpace.size)
    public private(set) var bars: [BAR?] = Array(repeating: nil, count: 6)
    private var lastCapability: Int?
    private var nextCapabilityOffset = 0x40

    public init(vendor: UInt16, device: UInt16, classCode: UInt32, revision: UInt8 = 0,
                subsystemVendor: UInt16 = 0, subsystem: UInt16 = 0) {
        set16(0x00, vendor)
        set16(0x02, device)
        bytes[0x08] = revision
        bytes[0x09] = UInt8(truncatingIfNeeded: classCode)
        bytes[0x0A] = UInt8(truncatingIfNeeded: classCode >> 8)
        bytes[0x0B] = UInt8(truncatingIfNeeded: classCode >> 16)
        set16(0x2C, subsystemVendor)
        set16(0x2E, subsystem)
        // Command: I/O space, memory space, bus master, INTx disable are writable.
        writeMask[0x04] = 0x07
        writeMask[0x05] = 0x04
        clearOnWrite[0x07] = 0xF9
        writeMask[0x0C] = 0xFF  // cache line size
        writeMask[0x0D] = 0xFF  // latency timer
        writeMask[0x3C] = 0xFF  // interrupt line
    }

    // MARK: raw access

    func get16(_ offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }
    func get32(_ offset: Int) -> UInt32 { UInt32(get16(offset)) | UInt32(get16(offset + 2)) << 16 }
    mutating func set16(_ offset: Int, _ value: UInt16) {
        bytes[offset] = UInt8(truncatingIfNeeded: value)
        bytes[offset + 1] = UInt8(truncatingIfNeeded: value >> 8)
    }
    mutating func set32(_ offset: Int, _ value: UInt32) {
        set16(offset, UInt16(truncatingIfNeeded: value))
        set16(offset + 2, UInt16(truncatingIfNeeded: value >> 16))
    }

    public var command: UInt16 { get16(0x04) }
    public var memoryEnabled: Bool { command & 0x2 != 0 }
    public var busMasterEnabled: Bool { command & 0x4 != 0 }

    /// Reads `size` (1, 2 or 4) bytes; out-of-range or misaligned reads see all ones.
    public func read(offset: Int, size: Int) -> UInt32 {
        guard [1, 2, 4].contains(size), offset >= 0, offset + size <= Self.size else { return 0xFFFF_FFFF }
        var value: UInt32 = 0
        for i in 0..<size { value |= UInt32(bytes[offset + i]) << (8 * i) }
        return value
    }

    /// Applies a guest write through the masks; returns the BAR indices whose address changed.
    @discardableResult
    public mutating func write(offset: Int, size: Int, value: UInt32) -> [Int] {
        guard [1, 2, 4].contains(size), offset >= 0, offset + size <= Self.size else { return [] }
        let before = (0..<6).map { barAddress($0) }
        for i in 0..<size {
            let byte = UInt8(truncatingIfNeeded: value >> (8 * i))
            let at = offset + i
            bytes[at] = (bytes[at] & ~writeMask[at]) | (byte & writeMask[at])
            bytes[at] &= ~(byte & clearOnWrite[at])
        }
        return (0..<6).filter { barAddress($0) != before[$0] }
    }

    // MARK: BARs

    /// Declares BAR `index` (a 64-bit BAR also uses `index + 1`). `size` must be a power of two.
    public mutating func addBAR(_ index: Int, size: UInt32, isIO: Bool = false, is64Bit: Bool = false, prefetchable: Bool = false) {
        precondition(index >= 0 && index < (is64Bit ? 5 : 6) && size.nonzeroBitCount == 1 && size >= 16)
        bars[index] = BAR(size: size, isIO: isIO, is64Bit: is64Bit)
        let offset = 0x10 + index * 4
        let flags: UInt32 = isIO ? 0x1 : ((is64Bit ? 0x4 : 0) | (prefetchable ? 0x8 : 0))
        set32(offset, flags)
        let mask = ~(size - 1) & (isIO ? ~UInt32(0x3) : ~UInt32(0xF))
        for i in 0..<4 { writeMask[offset + i] = UInt8(truncatingIfNeeded: mask >> (8 * i)) }
        if is64Bit { for i in 0..<4 { writeMask[offset + 4 + i] = 0xFF } }
    }

    /// The address programmed into BAR `index`, nil if it is not a BAR or still unassigned.
    public func barAddress(_ index: Int) -> UInt64? {
        guard index >= 0 && index < 6, let bar = bars[index] else { return nil }
        let low = get32(0x10 + index * 4) & (bar.isIO ? ~UInt32(0x3) : ~UInt32(0xF))
        let high = bar.is64Bit ? UInt64(get32(0x14 + index * 4)) << 32 : 0
        let address = high | UInt64(low)
        return address == 0 ? nil : address
    }

    public mutating func setBARAddress(_ index: Int, _ address: UInt64) {
        guard let bar = bars[index] else { return }
        let offset = 0x10 + index * 4
        let flags = get32(offset) & (bar.isIO ? 0x3 : 0xF)
        set32(offset, UInt32(truncatingIfNeeded: address) | flags)
        if bar.is64Bit { set32(offset + 4, UInt32(truncatingIfNeeded: address >> 32)) }
    }

    // MARK: capabilities

    /// Appends a capability (`body` excludes the id and next bytes); returns its offset.
    @discardableResult
    public mutating func addCapability(id: UInt8, body: [UInt8], writableBody: [UInt8]? = nil) -> Int {
        let offset = nextCapabilityOffset
        precondition(offset + 2 + body.count <= Self.size, "capabilities overflow configuration space")
        bytes[offset] = id
        bytes[offset + 1] = 0
        for (i, b) in body.enumerated() { bytes[offset + 2 + i] = b }
        if let writableBody { for (i, m) in writableBody.enumerated() { writeMask[offset + 2 + i] = m } }
        if let last = lastCapability {
            bytes[last + 1] = UInt8(offset)
        } else {
            bytes[0x34] = UInt8(offset)
            bytes[0x06] |= 0x10  // status: capability list present
        }
        lastCapability = offset
        nextCapabilityOffset = (offset + 2 + body.count + 3) & ~3
        return offset
    }

    /// This space with the bits a guest may write taken from `saved` (a migrated
    /// space): identity, BAR sizes and capabilities stay this device's.
    func merging(guestWritable saved: [UInt8]) -> PCIConfigSpace {
        var merged = self
        for offset in 0..<min(Self.size, saved.count) {
            merged.bytes[offset] = (bytes[offset] & ~writeMask[offset]) | (saved[offset] & writeMask[offset])
        }
        return merged
    }
}
