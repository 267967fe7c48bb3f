/// Network-order fields in packet buffers. Packets put fields at any
/// alignment, so every access is unaligned-safe (free on x86).
extension UnsafeMutableRawPointer {
    @inline(__always)
    func loadBE16(_ offset: Int) -> UInt16 {
        UInt16(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt16.self))
    }

    @inline(__always)
    func loadBE32(_ offset: Int) -> UInt32 {
        UInt32(bigEndian: loadUnaligned(fromByteOffset: offset, as: UInt32.self))
    }

    @inline(__always)
    func storeBE16(_ offset: Int, _ value: UInt16) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt16.self)
    }

    @inline(__always)
    func storeBE32(_ offset: Int, _ value: UInt32) {
        storeBytes(of: value.bigEndian, toByteOffset: offset, as: UInt32.self)
    }

    /// A MAC address as its six bytes in wire order, in the low bytes of a UInt64.
    @inline(__always)
    func loadMAC(_ offset: Int) -> UInt64 {
        UInt64(loadUnaligned(fromByteOffset: offset, as: UInt32.self))
            | UInt64(loadUnaligned(fromByteOffset: offset + 4, as: UInt16.self)) << 32
    }

    @inline(__always)
    func storeMAC(_ offset: Int, _ mac: UInt64) {
        storeBytes(of: UInt32(truncatingIfNeeded: mac), toByteOffset: offset, as: UInt32.self)
        storeBytes(of: UInt16(truncatingIfNeeded: mac >> 32), toByteOffset: offset + 4, as: UInt16.self)
    }
}

/// The Internet checksum (RFC 1071). The ones'-complement sum does not
/// depend on byte order, so words are added as loaded (little-endian) and
/// the result is stored the same way, with no byte swapping at all.
enum Checksum {
    /// Adds `count` bytes to `sum`, four at a time; not yet folded.
    static func add(_ bytes: UnsafeRawPointer, count: Int, to sum: UInt64 = 0) -> UInt64 {
        var total = sum
        var offset = 0
        while offset &+ 4 <= count {
            total &+= UInt64(bytes.loadUnaligned(fromByteOffset: offset, as: UInt32.self))
            offset &+= 4
        }
        if offset &+ 2 <= count {
            total &+= UInt64(bytes.loadUnaligned(fromByteOffset: offset, as: UInt16.self))
            offset &+= 2
        }
        if offset < count {
            total &+= UInt64(bytes.load(fromByteOffset: offset, as: UInt8.self))
        }
        return total
    }

    /// Folds a sum to 16 bits and complements it: the value to store.
    static func finish(_ sum: UInt64) -> UInt16 {
        var total = (sum & 0xffff_ffff) &+ (sum >> 32)
        total = (total & 0xffff) &+ (total >> 16)
        total = (total & 0xffff) &+ (total >> 16)
        total = (total & 0xffff) &+ (total >> 16)
        return ~UInt16(truncatingIfNeeded: total)
    }

    /// The checksum after one 16-bit word of the data changed from `old`
    /// to `new` (RFC 1624, eqn. 3), without touching the rest.
    static func update(_ checksum: UInt16, old: UInt16, new: UInt16) -> UInt16 {
        finish(UInt64(~checksum) &+ UInt64(~old) &+ UInt64(new))
    }
}
