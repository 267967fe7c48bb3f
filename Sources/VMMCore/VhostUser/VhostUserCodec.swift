/// A malformed or unexpected vhost-user message; the text names the message.
public struct VhostUserError: Error, CustomStringConvertible, Sendable, Equatable {
    public let description: String
    /// The header of the message at fault, when it was read (for an error reply).
    public var header: VhostUserHeader?
    public init(_ description: String, header: VhostUserHeader? = nil) { (self.description, self.header) = (description, header) }
}

/// The 12-byte header every message starts with (host-endian, which is little-endian here).
public struct VhostUserHeader: Sendable, Equatable {
    public var request: UInt32
    public var flags: VhostUserFlags
    public var size: UInt32
    public init(request: UInt32, flags: VhostUserFlags, size: UInt32) { (self.request, self.flags, self.size) = (request, flags, size) }

    /// "SET_MEM_TABLE", or "request 99" for one we do not know.
    public var requestName: String { VhostUserRequest(rawValue: request)?.name ?? "request \(request)" }
}

/// A decoded message with the fds that came with it (their order is the payload's: one
/// per memory region, or the ring's eventfd, or the log).
public struct VhostUserReceived: Sendable {
    public var flags: VhostUserFlags
    public var message: VhostUserMessage
    public var fds: [FileDescriptor]
}

/// Encoding and decoding of vhost-user messages, for the front-end and the backend alike.
/// Decoding trusts nothing: the header's version and size (at most `maxPayload`), the
/// payload size each request must have exactly, the number of fds (extras are closed),
/// and the memory table's internal consistency (what the fds really hold is the mapper's job).
public enum VhostUserCodec {
    public static let headerSize = 12
    /// Larger than any message we decode (a full memory table is 264 bytes).
    public static let maxPayload = 4096
    /// VHOST_MEMORY_BASELINE_NREGIONS: SET_MEM_TABLE's region limit, and so the most fds.
    public static let maxRegions = 8
    public static let maxFDs = 8
    /// VIRTIO_QUEUE_MAX: no device has more rings, so no ring index is this large.
    public static let maxRings: UInt32 = 1024
    static let regionSize = 32

    // MARK: encode

    /// Header and payload, ready for one sendmsg with `message.fdCount` fds.
    public static func encode(_ message: VhostUserMessage, flags extra: VhostUserFlags = []) -> [UInt8] {
        var payload = VhostUserBytesOut()
        switch message {
        case .getFeatures, .setOwner, .resetOwner, .setLogFD, .getProtocolFeatures, .getQueueNum, .resetDevice:
            break
        case .setFeatures(let v), .setProtocolFeatures(let v), .reply(_, let v):
            payload.u64(v)
        case .setMemTable(let regions):
            payload.u32(UInt32(regions.count))
            payload.u32(0)
            for r in regions {
                payload.u64(r.guestAddress)
                payload.u64(r.size)
                payload.u64(r.userAddress)
                payload.u64(r.mmapOffset)
            }
        case .setLogBase(let size, let offset):
            payload.u64(size)
            payload.u64(offset)
        case .setVringNum(let s), .setVringBase(let s), .getVringBase(let s), .setVringEnable(let s), .vringBaseReply(let s):
            payload.u32(s.index)
            payload.u32(s.num)
        case .setVringAddr(let a):
            payload.u32(a.index)
            payload.u32(a.flags)
            payload.u64(a.descriptor)
            payload.u64(a.used)
            payload.u64(a.available)
            payload.u64(a.log)
        case .setVringKick(let f), .setVringCall(let f), .setVringErr(let f):
            payload.u64(UInt64(f.index) | (f.hasFD ? 0 : VhostUserVringFile.noFDBit))
        }
        var flags = extra.union(.version1)
        if message.isReply { flags.insert(.reply) }
        var out = VhostUserBytesOut()
        out.u32(message.request.rawValue)
        out.u32(flags.rawValue)
        out.u32(UInt32(payload.bytes.count))
        return out.bytes + payload.bytes
    }

    // MARK: decode

    /// Checks the header alone, before its payload is read: the version, and a size that
    /// cannot make the reader allocate or wait for more than `maxPayload` bytes.
    public static func decodeHeader(_ bytes: some Collection<UInt8>) throws -> VhostUserHeader {
        guard bytes.count == headerSize else {
            throw VhostUserError("vhost-user message header of \(bytes.count) bytes, expected \(headerSize)")
        }
        var r = VhostUserBytesIn(Array(bytes))
        let header = VhostUserHeader(request: r.u32(), flags: VhostUserFlags(rawValue: r.u32()), size: r.u32())
        let version = header.flags.rawValue & VhostUserFlags.versionMask
        guard version == 1 else {
            throw VhostUserError("vhost-user \(header.requestName): protocol version \(version), expected 1")
        }
        guard header.size <= maxPayload else {
            throw VhostUserError("vhost-user \(header.requestName): payload size \(header.size) exceeds the limit of \(maxPayload) bytes")
        }
        return header
    }

    /// Decodes a message whose header passed `decodeHeader`. Takes `fds`: on success they
    /// are the result's, on error every one is closed.
    public static func decode(header: VhostUserHeader, payload: [UInt8], fds: [FileDescriptor]) throws -> VhostUserReceived {
        do {
            let message = try decodeMessage(header: header, payload: payload)
            let name = header.requestName
            guard fds.count == message.fdCount else {
                throw VhostUserError("vhost-user \(name): \(fds.count) fd\(fds.count == 1 ? "" : "s") attached, expected \(message.fdCount)")
            }
            return VhostUserReceived(flags: header.flags, message: message, fds: fds)
        } catch {
            for fd in fds { fd.close() }
            throw error
        }
    }

    static func decodeMessage(header: VhostUserHeader, payload: [UInt8]) throws -> VhostUserMessage {
        guard let request = VhostUserRequest(rawValue: header.request) else {
            throw VhostUserError("vhost-user request \(header.request) is not supported")
        }
        let name = request.name
        guard payload.count == Int(header.size) else {
            throw VhostUserError("vhost-user \(name): \(payload.count) payload bytes, the header says \(header.size)")
        }
        func expect(_ size: Int, _ what: String) throws {
            guard payload.count == size else {
                throw VhostUserError("vhost-user \(name): payload of \(payload.count) bytes, expected \(size) (\(what))")
            }
        }
        var r = VhostUserBytesIn(payload)
        if header.flags.contains(.reply) {
            switch request {
            case .getVringBase:
                try expect(8, "vring state")
                return .vringBaseReply(VhostUserVringState(index: r.u32(), num: r.u32()))
            default:
                try expect(8, "u64")
                return .reply(request, r.u64())
            }
        }
        switch request {
        case .getFeatures, .setOwner, .resetOwner, .setLogFD, .getProtocolFeatures, .getQueueNum, .resetDevice:
            try expect(0, "none")
            switch request {
            case .getFeatures: return .getFeatures
            case .setOwner: return .setOwner
            case .resetOwner: return .resetOwner
            case .setLogFD: return .setLogFD
            case .getProtocolFeatures: return .getProtocolFeatures
            case .getQueueNum: return .getQueueNum
            default: return .resetDevice
            }
        case .setFeatures:
            try expect(8, "u64")
            return .setFeatures(r.u64())
        case .setProtocolFeatures:
            try expect(8, "u64")
            return .setProtocolFeatures(r.u64())
        case .setMemTable:
            guard payload.count >= 8 else {
                throw VhostUserError("vhost-user \(name): payload of \(payload.count) bytes, expected at least 8 (memory table header)")
            }
            let count = Int(r.u32())
            _ = r.u32()
            guard (1...maxRegions).contains(count) else {
                throw VhostUserError("vhost-user \(name): \(count) regions, expected 1...\(maxRegions)")
            }
            try expect(8 + regionSize * count, "8 + 32 × \(count) regions")
            var regions: [VhostUserMemoryRegion] = []
            for _ in 0..<count {
                regions.append(VhostUserMemoryRegion(guestAddress: r.u64(), size: r.u64(), userAddress: r.u64(), mmapOffset: r.u64()))
            }
            try validate(regions)
            return .setMemTable(regions)
        case .setLogBase:
            try expect(16, "log size and offset")
            return .setLogBase(size: r.u64(), offset: r.u64())
        case .setVringNum, .setVringBase, .getVringBase, .setVringEnable:
            try expect(8, "vring state")
            let s = VhostUserVringState(index: r.u32(), num: r.u32())
            try checkRing(s.index, name)
            switch request {
            case .setVringNum: return .setVringNum(s)
            case .setVringBase: return .setVringBase(s)
            case .getVringBase: return .getVringBase(s)
            default: return .setVringEnable(s)
            }
        case .setVringAddr:
            try expect(40, "vring address")
            let address = VhostUserVringAddress(index: r.u32(), flags: r.u32(), descriptor: r.u64(), used: r.u64(),
                                                available: r.u64(), log: r.u64())
            try checkRing(address.index, name)
            guard address.flags & ~VhostUserVringAddress.logUsed == 0 else {
                throw VhostUserError("vhost-user \(name): ring \(address.index) flags \(hex(address.flags)) has unknown bits")
            }
            return .setVringAddr(address)
        case .setVringKick, .setVringCall, .setVringErr:
            try expect(8, "u64")
            let value = r.u64()
            guard value & ~(0xFF | VhostUserVringFile.noFDBit) == 0 else {
                throw VhostUserError("vhost-user \(name): value \(hex(value)) has bits other than the index (0-7) and NOFD (8)")
            }
            let file = VhostUserVringFile(index: UInt8(value & 0xFF), hasFD: value & VhostUserVringFile.noFDBit == 0)
            switch request {
            case .setVringKick: return .setVringKick(file)
            case .setVringCall: return .setVringCall(file)
            default: return .setVringErr(file)
            }
        }
    }

    static func checkRing(_ index: UInt32, _ name: String) throws {
        guard index < maxRings else { throw VhostUserError("vhost-user \(name): ring index \(index) out of range 0..<\(maxRings)") }
    }

    /// A table's regions each cover a non-empty range that does not wrap, in guest
    /// physical, front-end virtual and fd-offset terms, and no two overlap (in either
    /// address space): a translation then has exactly one answer.
    static func validate(_ regions: [VhostUserMemoryRegion]) throws {
        for (i, region) in regions.enumerated() {
            let what = "vhost-user SET_MEM_TABLE: region \(i) (guest \(hex(region.guestAddress))+\(hex(region.size)))"
            guard region.size > 0 else { throw VhostUserError("\(what) is empty") }
            for (space, start) in [("guest physical", region.guestAddress), ("user", region.userAddress), ("mmap offset", region.mmapOffset)] {
                guard !start.addingReportingOverflow(region.size).overflow else {
                    throw VhostUserError("\(what) wraps past 2^64 in its \(space) range starting at \(hex(start))")
                }
            }
            for (j, other) in regions[..<i].enumerated() {
                if region.guestAddress < other.guestAddress + other.size && other.guestAddress < region.guestAddress + region.size {
                    throw VhostUserError("\(what) overlaps region \(j) in guest physical addresses")
                }
                if region.userAddress < other.userAddress + other.size && other.userAddress < region.userAddress + region.size {
                    throw VhostUserError("\(what) overlaps region \(j) in user addresses")
                }
            }
        }
    }
}

/// Little-endian fields into a byte array.
struct VhostUserBytesOut {
    var bytes: [UInt8] = []
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
}

/// Little-endian fields out of a byte array whose size the caller checked first.
struct VhostUserBytesIn {
    let bytes: [UInt8]
    var offset = 0
    init(_ bytes: [UInt8]) { self.bytes = bytes }
    mutating func u32() -> UInt32 {
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(bytes[offset + i]) << (8 * UInt32(i)) }
        offset += 4
        return v
    }
    mutating func u64() -> UInt64 {
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(bytes[offset + i]) << (8 * UInt64(i)) }
        offset += 8
        return v
    }
}
