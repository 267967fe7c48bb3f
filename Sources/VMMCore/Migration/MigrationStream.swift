import Glibc

/// The migration stream: a header, then self-describing sections, each framed with its
/// length and a CRC, each naming how many of the file descriptors received so far
/// (SCM_RIGHTS on a unix channel) it claims; an end section closes it.
public enum MigrationStream {
    public static let magic: [UInt8] = Array("SVMMIGR".utf8) + [0]
    /// 2: CRC-32C frames, zero-page RAM records, the shared-RAM section.
    public static let version: UInt32 = 2
    public static let headerSize = 12
    /// Larger frames are refused before any allocation: a corrupted length cannot make
    /// the target allocate gigabytes.
    public static let maxFrameLength = 64 << 20

    public enum Kind: UInt8, Sendable {
        case configuration = 1
        case ram = 2
        case vcpu = 3
        case device = 4
        /// x-ignore-shared: how the target finds the RAM that is not sent.
        case sharedRAM = 5
        /// The source is about to stop the guest: the target answers once it has taken in
        /// everything before and polls for what follows.
        case switchover = 6
        case end = 0xFF
    }

    public struct Section: Sendable, Equatable {
        public var kind: Kind
        /// Which device or vCPU, e.g. "net0", "cpu0"; empty for machine-wide sections.
        public var name: String
        public var payload: [UInt8]
        /// How many of the received fds this section takes, in arrival order.
        public var fdCount: Int

        public init(kind: Kind, name: String = "", payload: [UInt8] = [], fdCount: Int = 0) {
            self.kind = kind
            self.name = name
            self.payload = payload
            self.fdCount = fdCount
        }

        public var label: String { name.isEmpty ? "\(kind)" : "\(kind) '\(name)'" }
    }

    public static func header() -> [UInt8] {
        var w = StreamWriter()
        w.raw(magic)
        w.u32(version)
        return w.bytes
    }

    /// Checks the first bytes; the error tells a QEMU stream or a version skew apart.
    public static func checkHeader(_ bytes: [UInt8]) throws {
        guard bytes.count >= headerSize else {
            throw StreamError("migration stream header truncated: \(bytes.count) of \(headerSize) bytes")
        }
        guard Array(bytes.prefix(8)) == magic else {
            if Array(bytes.prefix(4)) == Array("QEVM".utf8) {
                throw StreamError("the peer sent a QEMU migration stream; this VMM only speaks its own format")
            }
            throw StreamError("not a swift-vmm migration stream (magic \(bytes.prefix(8).map { String($0, radix: 16) }.joined(separator: " ")))")
        }
        var r = StreamReader(Array(bytes[8..<12]), context: "migration stream header")
        let v = try r.u32("version")
        guard v == version else { throw StreamError("migration stream version \(v) is not supported (this VMM speaks \(version))") }
    }

    /// One section as it goes on the wire: a u32 frame length, then the frame. Built in
    /// one buffer: RAM sections are a MiB each, and every extra copy shows in the downtime.
    public static func encode(_ section: Section) -> [UInt8] {
        var w = StreamWriter(reservingCapacity: section.payload.count + section.name.utf8.count + 20)
        w.u32(0)
        w.u8(section.kind.rawValue)
        w.string(section.name)
        w.u16(UInt16(section.fdCount))
        w.blob(section.payload)
        let crc = w.bytes.withUnsafeBytes { CRC32C.checksum(UnsafeRawBufferPointer(rebasing: $0[4...])) }
        w.u32(crc)
        w.patch(u32: UInt32(w.bytes.count - 4), at: 0)
        return w.bytes
    }

    /// The frame length from the 4 bytes that precede every section.
    public static func frameLength(_ prefix: [UInt8]) throws -> Int {
        var r = StreamReader(prefix, context: "section frame")
        let length = Int(try r.u32("frame length"))
        guard length >= 12, length <= maxFrameLength else {
            throw StreamError("section frame length \(length) is outside 12...\(maxFrameLength): the stream is corrupt")
        }
        return length
    }

    /// Decodes one frame (without its length prefix), verifying the CRC first.
    public static func decode(frame: [UInt8]) throws -> Section {
        guard frame.count >= 4 else { throw StreamError("section frame of \(frame.count) bytes is too short") }
        let body = frame.dropLast(4)
        var crcReader = StreamReader(Array(frame.suffix(4)), context: "section frame")
        let expected = try crcReader.u32("checksum")
        let actual = CRC32C.checksum(body)
        guard expected == actual else {
            throw StreamError("section checksum mismatch (0x\(String(actual, radix: 16)) != 0x\(String(expected, radix: 16))): the stream is corrupt")
        }
        var r = StreamReader(Array(body), context: "section")
        let rawKind = try r.u8("kind")
        guard let kind = Kind(rawValue: rawKind) else { throw StreamError("unknown section kind \(rawKind)") }
        let name = try r.string("name")
        let fdCount = Int(try r.u16("fd count"))
        let payload = try r.blob("payload", limit: maxFrameLength)
        try r.finish()
        return Section(kind: kind, name: name, payload: payload, fdCount: fdCount)
    }

    /// Splits a whole stream held in memory (tests, files) into sections; the end
    /// section must be last.
    public static func decodeAll(_ bytes: [UInt8]) throws -> [Section] {
        try checkHeader(bytes)
        var offset = headerSize
        var sections: [Section] = []
        while true {
            guard offset + 4 <= bytes.count else {
                throw StreamError("migration stream ends after \(sections.last.map { $0.label } ?? "the header") without an end section")
            }
            let length = try frameLength(Array(bytes[offset..<offset + 4]))
            guard offset + 4 + length <= bytes.count else {
                throw StreamError("migration stream truncated inside a section: need \(length) bytes, have \(bytes.count - offset - 4)")
            }
            let section = try decode(frame: Array(bytes[offset + 4..<offset + 4 + length]))
            offset += 4 + length
            sections.append(section)
            if section.kind == .end {
                guard offset == bytes.count else { throw StreamError("\(bytes.count - offset) bytes after the end section") }
                return sections
            }
        }
    }
}

/// File descriptors received on a migration channel, waiting for the sections that
/// claim them. Owns every fd until it is claimed; `closeUnclaimed` closes the rest.
public final class ReceivedFDs {
    private var fds: [FileDescriptor] = []

    public init() {}

    public var count: Int { fds.count }

    public func append(_ received: [FileDescriptor]) { fds += received }

    /// Takes the next `count` fds for `section`; the caller owns them afterwards.
    public func claim(_ count: Int, for section: String) throws -> [FileDescriptor] {
        guard count <= fds.count else {
            throw StreamError("\(section) claims \(count) file descriptor(s) but only \(fds.count) arrived")
        }
        defer { fds.removeFirst(count) }
        return Array(fds.prefix(count))
    }

    /// Closes what no section claimed; returns how many that were.
    @discardableResult
    public func closeUnclaimed() -> Int {
        let n = fds.count
        fds.forEach { $0.close() }
        fds.removeAll()
        return n
    }
}
