import Glibc

/// The migration stream: a header, then self-describing sections, each framed with its
/// length and a CRC, each naming the file descriptors (SCM_RIGHTS on a unix channel)
/// that arrived with it; an end section closes it.
public enum MigrationStream {
    public static let magic: [UInt8] = Array("SVMMIGR".utf8) + [0]
    /// 2: CRC-32C frames, zero-page RAM records, the shared-RAM section.
    /// 3: fds by name; one section per device, each state with its own version.
    public static let version: UInt32 = 3
    /// Streams this build reads: v2 through `LegacyStreamV2`.
    public static let readableVersions: ClosedRange<UInt32> = 2...3
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
        /// cpr-transfer: what the target needs before it builds its devices (the RAM
        /// memfd, `cpr=on` netdevs' fds), carried only on the cpr channel, before the
        /// main channel's stream. Empty until cpr-transfer defines its contents.
        case cprState = 7
        case end = 0xFF
    }

    public struct Section: Sendable, Equatable {
        public var kind: Kind
        /// Which device or vCPU, e.g. "net0", "cpu0"; empty for machine-wide sections.
        public var name: String
        public var payload: [UInt8]
        /// The names of the fds that arrived with this section, in arrival order (v2
        /// streams: as many empty names, which `LegacyStreamV2` fills in).
        public var fdNames: [String]

        public init(kind: Kind, name: String = "", payload: [UInt8] = [], fdNames: [String] = []) {
            self.kind = kind
            self.name = name
            self.payload = payload
            self.fdNames = fdNames
        }

        public var label: String { name.isEmpty ? "\(kind)" : "\(kind) '\(name)'" }
    }

    public static func header() -> [UInt8] {
        var w = StreamWriter()
        w.raw(magic)
        w.u32(version)
        return w.bytes
    }

    /// Checks the first bytes and returns the stream's version; the error tells a QEMU
    /// stream or a version skew apart.
    @discardableResult
    public static func checkHeader(_ bytes: [UInt8]) throws -> UInt32 {
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
        guard readableVersions.contains(v) else {
            throw StreamError("migration stream version \(v) is not supported (this VMM reads \(readableVersions.lowerBound)...\(readableVersions.upperBound))")
        }
        return v
    }

    /// One section as it goes on the wire: a u32 frame length, then the frame. Built in
    /// one buffer: RAM sections are a MiB each, and every extra copy shows in the downtime.
    public static func encode(_ section: Section) -> [UInt8] {
        var w = StreamWriter(reservingCapacity: section.payload.count + section.name.utf8.count + 20)
        w.u32(0)
        w.u8(section.kind.rawValue)
        w.string(section.name)
        w.u16(UInt16(section.fdNames.count))
        for name in section.fdNames { w.string(name) }
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

    /// Decodes one frame (without its length prefix) of a stream of `version`,
    /// verifying the CRC first.
    public static func decode(frame: [UInt8], version: UInt32 = version) throws -> Section {
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
        let fdNames = version == 2
            ? Array(repeating: "", count: fdCount)
            : try (0..<fdCount).map { _ in try r.string("fd name") }
        let payload = try r.blob("payload", limit: maxFrameLength)
        try r.finish()
        return Section(kind: kind, name: name, payload: payload, fdNames: fdNames)
    }

    /// Splits a whole stream held in memory (tests, files) into sections; the end
    /// section must be last.
    public static func decodeAll(_ bytes: [UInt8]) throws -> [Section] {
        let version = try checkHeader(bytes)
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
            let section = try decode(frame: Array(bytes[offset + 4..<offset + 4 + length]), version: version)
            offset += 4 + length
            sections.append(section)
            if section.kind == .end {
                guard offset == bytes.count else { throw StreamError("\(bytes.count - offset) bytes after the end section") }
                return sections
            }
        }
    }
}

/// File descriptors received on a migration channel. Each section binds the fds that
/// arrived with it to the names it lists; a device claims its fds by name. Owns every fd
/// until it is claimed; `closeUnclaimed` closes the rest and names them.
public final class ReceivedFDs {
    /// Arrived, not yet bound to a name, in arrival order.
    private var unbound: [FileDescriptor] = []
    private var bound: [(name: String, fd: FileDescriptor)] = []

    public init() {}

    public var count: Int { unbound.count + bound.count }

    public func append(_ received: [FileDescriptor]) { unbound += received }

    /// Binds the next fds, in arrival order, to `names` (from `section`'s frame).
    public func bind(_ names: [String], for section: String) throws {
        guard names.count <= unbound.count else {
            throw StreamError("\(section) names \(names.count) file descriptor(s) but only \(unbound.count) arrived")
        }
        for name in names {
            guard !bound.contains(where: { $0.name == name }) else { throw StreamError("\(section) names file descriptor \(name) a second time") }
            bound.append((name, unbound.removeFirst().take(label: "received \(name)")))
        }
    }

    /// The fd named `name`, now owned by the caller (`claimant`, for the message).
    public func claim(_ name: String, by claimant: String) throws -> FileDescriptor {
        guard let index = bound.firstIndex(where: { $0.name == name }) else {
            throw StreamError("\(claimant) expects \(name), which the stream did not carry")
        }
        return bound.remove(at: index).fd
    }

    /// Whether the fd named `name` arrived and is still unclaimed.
    public func holds(_ name: String) -> Bool { bound.contains { $0.name == name } }

    /// Closes what no device claimed; returns the names (an fd no section named counts
    /// as "unnamed").
    @discardableResult
    public func closeUnclaimed() -> [String] {
        let names = bound.map(\.name) + unbound.map { _ in "unnamed" }
        bound.forEach { $0.fd.close() }
        unbound.forEach { $0.close() }
        bound.removeAll()
        unbound.removeAll()
        return names
    }
}
