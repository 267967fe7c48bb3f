import CLinux

/// Little-endian primitives of the migration stream. The reader never trusts a length
/// it reads: every read is checked against what is left, so a truncated or corrupted
/// stream becomes an error naming where it broke, never a crash or a misparse.
public struct StreamWriter {
    public private(set) var bytes: [UInt8] = []

    public init(reservingCapacity capacity: Int = 0) { bytes.reserveCapacity(capacity) }

    /// Overwrites 4 bytes written earlier (a length known only at the end).
    public mutating func patch(u32 v: UInt32, at offset: Int) {
        withUnsafeBytes(of: v.littleEndian) { source in
            bytes.withUnsafeMutableBytes { $0.baseAddress!.advanced(by: offset).copyMemory(from: source.baseAddress!, byteCount: 4) }
        }
    }

    public mutating func u8(_ v: UInt8) { bytes.append(v) }
    public mutating func u16(_ v: UInt16) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    public mutating func bool(_ v: Bool) { u8(v ? 1 : 0) }
    public mutating func raw(_ v: some Collection<UInt8>) { bytes += v }

    /// Length-prefixed bytes (u32 length).
    public mutating func blob(_ v: some Collection<UInt8>) {
        u32(UInt32(v.count))
        bytes += v
    }

    public mutating func string(_ v: String) { blob(Array(v.utf8)) }
}

public struct StreamError: Error, CustomStringConvertible, Sendable, Equatable {
    public let description: String
    public init(_ description: String) { self.description = description }
}

public struct StreamReader {
    let bytes: [UInt8]
    public private(set) var offset = 0
    /// Names what is being read, for errors ("section 'cpu0'").
    let context: String

    public init(_ bytes: [UInt8], context: String) {
        self.bytes = bytes
        self.context = context
    }

    public var remaining: Int { bytes.count - offset }
    public var isAtEnd: Bool { offset == bytes.count }

    mutating func take(_ count: Int, _ what: String) throws -> ArraySlice<UInt8> {
        guard count >= 0, count <= remaining else {
            throw StreamError("\(context): truncated reading \(what) at byte \(offset): need \(count), have \(remaining)")
        }
        defer { offset += count }
        return bytes[offset..<offset + count]
    }

    func integer<T: FixedWidthInteger>(_ slice: ArraySlice<UInt8>) -> T {
        slice.reversed().reduce(T.zero) { $0 << 8 | T($1) }
    }

    public mutating func u8(_ what: String) throws -> UInt8 { try take(1, what).first! }
    public mutating func u16(_ what: String) throws -> UInt16 { integer(try take(2, what)) }
    public mutating func u32(_ what: String) throws -> UInt32 { integer(try take(4, what)) }
    public mutating func u64(_ what: String) throws -> UInt64 { integer(try take(8, what)) }

    public mutating func bool(_ what: String) throws -> Bool {
        let v = try u8(what)
        guard v <= 1 else { throw StreamError("\(context): \(what) is \(v), not a boolean") }
        return v == 1
    }

    public mutating func raw(_ count: Int, _ what: String) throws -> [UInt8] { Array(try take(count, what)) }

    /// Like `raw`, straight into `target` (guest RAM) without an intermediate array.
    public mutating func copy(_ count: Int, into target: UnsafeMutableRawBufferPointer, _ what: String) throws {
        precondition(target.count >= count)
        let slice = try take(count, what)
        slice.withUnsafeBytes { target.copyMemory(from: $0) }
    }

    public mutating func blob(_ what: String, limit: Int = 1 << 30) throws -> [UInt8] {
        let count = Int(try u32("\(what) length"))
        guard count <= limit else { throw StreamError("\(context): \(what) claims \(count) bytes, more than \(limit)") }
        return try raw(count, what)
    }

    public mutating func string(_ what: String) throws -> String {
        let bytes = try blob(what, limit: 1 << 16)
        guard let text = String(validating: bytes, as: UTF8.self) else { throw StreamError("\(context): \(what) is not UTF-8") }
        return text
    }

    /// Fails unless everything was consumed, so extra bytes never go unnoticed.
    public func finish() throws {
        guard isAtEnd else { throw StreamError("\(context): \(remaining) unexpected trailing bytes at byte \(offset)") }
    }
}

/// CRC-32C (Castagnoli), guarding each section against corruption in transit; computed
/// in C with SSE4.2 where the host has it (see CLinuxCRC32C.h).
public enum CRC32C {
    public static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt32 {
        cl_crc32c(0, bytes.baseAddress, bytes.count)
    }

    public static func checksum(_ bytes: [UInt8]) -> UInt32 { bytes.withUnsafeBytes { checksum($0) } }
    public static func checksum(_ bytes: ArraySlice<UInt8>) -> UInt32 { bytes.withUnsafeBytes { checksum($0) } }
}
