import Glibc
import Testing
@testable import VMMCore

/// vhost-user messages against bytes written out by hand from qemu's
/// docs/interop/vhost-user.rst ("Message Specification"): a 12-byte little-endian header
/// (request, flags with version 1 in bits 0-1, REPLY bit 2, NEED_REPLY bit 3, payload size),
/// then the payload.
@Suite struct VhostUserCodecTests {
    static func eventFD() throws -> FileDescriptor { try EventFD(label: "test").fd.take() }

    static let fixtures: [(VhostUserMessage, VhostUserFlags, [UInt8])] = [
        // GET_FEATURES request: no payload.
        (.getFeatures, [], [0x01, 0, 0, 0, 0x01, 0, 0, 0, 0x00, 0, 0, 0]),
        // Its reply: REPLY (bit 2) | version 1 = 0x05, u64 VERSION_1 | PROTOCOL_FEATURES (bits 32, 30).
        (.reply(.getFeatures, 0x1_4000_0000), [], [0x01, 0, 0, 0, 0x05, 0, 0, 0, 0x08, 0, 0, 0,
                                                   0x00, 0x00, 0x00, 0x40, 0x01, 0, 0, 0]),
        // SET_FEATURES with NEED_REPLY (bit 3): flags 0x09.
        (.setFeatures(0x1_0000_0020), .needReply, [0x02, 0, 0, 0, 0x09, 0, 0, 0, 0x08, 0, 0, 0,
                                                    0x20, 0, 0, 0, 0x01, 0, 0, 0]),
        (.setOwner, [], [0x03, 0, 0, 0, 0x01, 0, 0, 0, 0x00, 0, 0, 0]),
        // SET_MEM_TABLE, one region: nregions=1, padding, then gpa, size, user addr, mmap offset.
        (.setMemTable([VhostUserMemoryRegion(guestAddress: 0xC0000, size: 0x0FF4_0000, userAddress: 0x7F00_000C_0000, mmapOffset: 0xC0000)]), [],
         [0x05, 0, 0, 0, 0x01, 0, 0, 0, 0x28, 0, 0, 0,
          0x01, 0, 0, 0, 0x00, 0, 0, 0,
          0x00, 0x00, 0x0C, 0x00, 0, 0, 0, 0,
          0x00, 0x00, 0xF4, 0x0F, 0, 0, 0, 0,
          0x00, 0x00, 0x0C, 0x00, 0x00, 0x7F, 0, 0,
          0x00, 0x00, 0x0C, 0x00, 0, 0, 0, 0]),
        // SET_LOG_BASE: mmap size, mmap offset.
        (.setLogBase(size: 0x2000, offset: 0), [], [0x06, 0, 0, 0, 0x01, 0, 0, 0, 0x10, 0, 0, 0,
                                                    0x00, 0x20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        // SET_VRING_NUM ring 1, 256 entries.
        (.setVringNum(VhostUserVringState(index: 1, num: 256)), [], [0x08, 0, 0, 0, 0x01, 0, 0, 0, 0x08, 0, 0, 0,
                                                                      0x01, 0, 0, 0, 0x00, 0x01, 0, 0]),
        // SET_VRING_ADDR: index, flags, desc, used, avail, log (40 bytes).
        (.setVringAddr(VhostUserVringAddress(index: 2, flags: 1, descriptor: 0x7F00_0000_1000, used: 0x7F00_0000_3000,
                                             available: 0x7F00_0000_2000, log: 0x3000)), [],
         [0x09, 0, 0, 0, 0x01, 0, 0, 0, 0x28, 0, 0, 0,
          0x02, 0, 0, 0, 0x01, 0, 0, 0,
          0x00, 0x10, 0, 0, 0x00, 0x7F, 0, 0,
          0x00, 0x30, 0, 0, 0x00, 0x7F, 0, 0,
          0x00, 0x20, 0, 0, 0x00, 0x7F, 0, 0,
          0x00, 0x30, 0, 0, 0, 0, 0, 0]),
        (.setVringBase(VhostUserVringState(index: 3, num: 7)), [], [0x0A, 0, 0, 0, 0x01, 0, 0, 0, 0x08, 0, 0, 0,
                                                                     0x03, 0, 0, 0, 0x07, 0, 0, 0]),
        (.getVringBase(VhostUserVringState(index: 0, num: 0)), [], [0x0B, 0, 0, 0, 0x01, 0, 0, 0, 0x08, 0, 0, 0,
                                                                     0, 0, 0, 0, 0, 0, 0, 0]),
        // Its reply: the ring's next available index.
        (.vringBaseReply(VhostUserVringState(index: 0, num: 0x1234)), [], [0x0B, 0, 0, 0, 0x05, 0, 0, 0, 0x08, 0, 0, 0,
                                                                            0, 0, 0, 0, 0x34, 0x12, 0, 0]),
        // SET_VRING_KICK ring 1 with an fd; SET_VRING_CALL ring 1 without (bit 8, NOFD).
        (.setVringKick(VhostUserVringFile(index: 1, hasFD: true)), [], [0x0C, 0, 0, 0, 0x01, 0, 0, 0, 0x08, 0, 0, 0,
                                                                         0x01, 0, 0, 0, 0, 0, 0, 0]),
        (.setVringCall(VhostUserVringFile(index: 1, hasFD: false)), [], [0x0D, 0, 0, 0, 0x01, 0, 0, 0, 0x08, 0, 0, 0,
                                                                          0x01, 0x01, 0, 0, 0, 0, 0, 0]),
        (.setVringErr(VhostUserVringFile(index: 5, hasFD: true)), [], [0x0E, 0, 0, 0, 0x01, 0, 0, 0, 0x08, 0, 0, 0,
                                                                        0x05, 0, 0, 0, 0, 0, 0, 0]),
        (.getProtocolFeatures, [], [0x0F, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0]),
        // SET_PROTOCOL_FEATURES MQ | REPLY_ACK = 0x9.
        (.setProtocolFeatures(0x9), [], [0x10, 0, 0, 0, 0x01, 0, 0, 0, 0x08, 0, 0, 0, 0x09, 0, 0, 0, 0, 0, 0, 0]),
        (.getQueueNum, [], [0x11, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0]),
        (.reply(.getQueueNum, 2), [], [0x11, 0, 0, 0, 0x05, 0, 0, 0, 0x08, 0, 0, 0, 0x02, 0, 0, 0, 0, 0, 0, 0]),
        (.setVringEnable(VhostUserVringState(index: 1, num: 1)), [], [0x12, 0, 0, 0, 0x01, 0, 0, 0, 0x08, 0, 0, 0,
                                                                       0x01, 0, 0, 0, 0x01, 0, 0, 0]),
        // A REPLY_ACK ack of SET_MEM_TABLE: u64 0 = success.
        (.reply(.setMemTable, 0), [], [0x05, 0, 0, 0, 0x05, 0, 0, 0, 0x08, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]),
        (.resetOwner, [], [0x04, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0]),
        (.resetDevice, [], [0x22, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0]),
        (.setLogFD, [], [0x07, 0, 0, 0, 0x01, 0, 0, 0, 0, 0, 0, 0]),
    ]

    @Test func encodesAndDecodesTheSpecsBytes() throws {
        for (message, flags, bytes) in Self.fixtures {
            #expect(VhostUserCodec.encode(message, flags: flags) == bytes, "\(message)")
            let header = try VhostUserCodec.decodeHeader(bytes[..<12])
            let fds = try (0..<message.fdCount).map { _ in try Self.eventFD() }
            let decoded = try VhostUserCodec.decode(header: header, payload: Array(bytes[12...]), fds: fds)
            #expect(decoded.message == message)
            #expect(decoded.fds.count == message.fdCount)
            #expect(decoded.flags.contains(.needReply) == flags.contains(.needReply))
        }
        #expect(Set(Self.fixtures.map { $0.0.request }) == Set(VhostUserRequest.allCases), "every request has a fixture")
    }

    /// Over a real socket: the fds arrive with the message (SCM_RIGHTS) and are the ones sent.
    @Test func fdsTravelWithTheirMessage() throws {
        var pair: [Int32] = [-1, -1]
        #expect(socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair) == 0)
        let a = VhostUserConnection(socket: FileDescriptor(adopting: pair[0], label: "a"))
        let b = VhostUserConnection(socket: FileDescriptor(adopting: pair[1], label: "b"))
        let kick = try EventFD(label: "kick")
        try a.send(.setVringKick(VhostUserVringFile(index: 1, hasFD: true)), flags: .needReply, fds: [kick.fd])
        let got = try #require(try b.receive())
        #expect(got.message == .setVringKick(VhostUserVringFile(index: 1, hasFD: true)))
        #expect(got.flags.contains(.needReply))
        #expect(got.fds.count == 1)
        // Same open file: a signal on ours is read through theirs.
        kick.signal()
        var value: UInt64 = 0
        #expect(got.fds[0].withRaw { read($0, &value, 8) } == 8 && value == 1)
        try b.send(.reply(.setVringKick, 0))
        #expect(try a.receive()?.message == .reply(.setVringKick, 0))
        b.socket.close()
        #expect(try a.receive() == nil, "a closed peer is the end, not an error")
    }

    /// header bytes, payload, fd count → the message the error must name and a word it must contain.
    static func header(_ request: UInt32, flags: UInt32 = 1, size: Int) -> [UInt8] {
        var w = VhostUserBytesOut()
        w.u32(request); w.u32(flags); w.u32(UInt32(size))
        return w.bytes
    }
    static func table(_ regions: [(UInt64, UInt64, UInt64, UInt64)], count: UInt32? = nil) -> [UInt8] {
        var w = VhostUserBytesOut()
        w.u32(count ?? UInt32(regions.count)); w.u32(0)
        for r in regions { w.u64(r.0); w.u64(r.1); w.u64(r.2); w.u64(r.3) }
        return w.bytes
    }

    static let malformed: [(String, [UInt8], [UInt8], Int, String)] = [
        ("size too large", header(5, size: 5000), [], 0, "SET_MEM_TABLE: payload size 5000 exceeds"),
        ("version 2", header(1, flags: 2, size: 0), [], 0, "GET_FEATURES: protocol version 2"),
        ("version 0", header(3, flags: 0, size: 0), [], 0, "SET_OWNER: protocol version 0"),
        ("unknown request", header(99, size: 0), [], 0, "request 99 is not supported"),
        ("request 0", header(0, size: 0), [], 0, "request 0 is not supported"),
        ("SET_FEATURES short", header(2, size: 4), [1, 0, 0, 0], 0, "SET_FEATURES: payload of 4 bytes, expected 8"),
        ("GET_FEATURES with payload", header(1, size: 8), [UInt8](repeating: 0, count: 8), 0, "GET_FEATURES: payload of 8 bytes, expected 0"),
        ("SET_VRING_ADDR short", header(9, size: 32), [UInt8](repeating: 0, count: 32), 0, "SET_VRING_ADDR: payload of 32 bytes, expected 40"),
        ("SET_VRING_NUM long", header(8, size: 12), [UInt8](repeating: 0, count: 12), 0, "SET_VRING_NUM: payload of 12 bytes, expected 8"),
        ("SET_LOG_BASE short", header(6, size: 8), [UInt8](repeating: 0, count: 8), 1, "SET_LOG_BASE: payload of 8 bytes, expected 16"),
        ("payload shorter than header says", header(2, size: 8), [1, 2, 3], 0, "SET_FEATURES: 3 payload bytes, the header says 8"),
        ("mem table too few bytes", header(5, size: 4), [1, 0, 0, 0], 1, "SET_MEM_TABLE: payload of 4 bytes, expected at least 8"),
        ("mem table 0 regions", header(5, size: 8), table([]), 0, "SET_MEM_TABLE: 0 regions, expected 1...8"),
        ("mem table 9 regions", header(5, size: 8 + 32 * 9), table(Array(repeating: (0, 1, 0, 0), count: 9)), 8, "SET_MEM_TABLE: 9 regions"),
        ("mem table count vs size", header(5, size: 40), table([(0, 0x1000, 0, 0)], count: 2), 2, "SET_MEM_TABLE: payload of 40 bytes, expected 72"),
        ("mem table empty region", header(5, size: 40), table([(0, 0, 0x1000, 0)]), 1, "region 0 (guest 0x0+0x0) is empty"),
        ("mem table gpa overflow", header(5, size: 40), table([(UInt64.max - 0xFFF, 0x2000, 0, 0)]), 1, "wraps past 2^64 in its guest physical range"),
        ("mem table user overflow", header(5, size: 40), table([(0, 0x2000, UInt64.max, 0)]), 1, "wraps past 2^64 in its user range"),
        ("mem table offset overflow", header(5, size: 40), table([(0, 0x2000, 0, UInt64.max - 1)]), 1, "wraps past 2^64 in its mmap offset range"),
        ("mem table gpa overlap", header(5, size: 72), table([(0, 0x2000, 0x10000, 0), (0x1000, 0x1000, 0x20000, 0)]), 2,
         "region 1 (guest 0x1000+0x1000) overlaps region 0 in guest physical"),
        ("mem table user overlap", header(5, size: 72), table([(0, 0x2000, 0x10000, 0), (0x4000, 0x1000, 0x11000, 0)]), 2,
         "overlaps region 0 in user addresses"),
        ("mem table fds missing", header(5, size: 72), table([(0, 0x1000, 0x10000, 0), (0x4000, 0x1000, 0x20000, 0)]), 1,
         "SET_MEM_TABLE: 1 fd attached, expected 2"),
        ("kick without fd", header(12, size: 8), [1, 0, 0, 0, 0, 0, 0, 0], 0, "SET_VRING_KICK: 0 fds attached, expected 1"),
        ("call NOFD with an fd", header(13, size: 8), [1, 1, 0, 0, 0, 0, 0, 0], 1, "SET_VRING_CALL: 1 fd attached, expected 0"),
        ("err with stray bits", header(14, size: 8), [1, 2, 0, 0, 0, 0, 0, 0], 1, "SET_VRING_ERR: value 0x201 has bits other than"),
        ("SET_OWNER with an fd", header(3, size: 0), [], 1, "SET_OWNER: 1 fd attached, expected 0"),
        ("vring index out of range", header(8, size: 8), [0, 4, 0, 0, 0, 1, 0, 0], 0, "SET_VRING_NUM: ring index 1024 out of range"),
        ("vring addr index out of range", header(9, size: 40), [0xFF, 0xFF, 0xFF, 0xFF] + [UInt8](repeating: 0, count: 36), 0,
         "SET_VRING_ADDR: ring index 4294967295 out of range"),
        ("vring addr unknown flags", header(9, size: 40), [0, 0, 0, 0, 2, 0, 0, 0] + [UInt8](repeating: 0, count: 32), 0,
         "SET_VRING_ADDR: ring 0 flags 0x2 has unknown bits"),
        ("reply of wrong size", header(1, flags: 5, size: 4), [0, 0, 0, 0], 0, "GET_FEATURES: payload of 4 bytes, expected 8"),
    ]

    /// Every malformed message is an error naming the message; the fds that came with it are closed.
    @Test(arguments: 0..<malformed.count)
    func malformedMessageIsAnErrorNamingIt(_ i: Int) throws {
        let (what, headerBytes, payload, fdCount, expected) = Self.malformed[i]
        let fds = try (0..<fdCount).map { _ in try Self.eventFD() }
        do {
            let header = try VhostUserCodec.decodeHeader(headerBytes)
            _ = try VhostUserCodec.decode(header: header, payload: payload, fds: fds)
            Issue.record("\(what): decoded")
        } catch let error as VhostUserError {
            #expect(error.description.contains(expected), "\(what): \(error)")
        }
        #expect(fds.allSatisfy { !$0.isOpen }, "\(what): the message's fds are closed")
    }

    /// A truncated header is an error too, never a read past its end.
    @Test func shortHeaderIsAnError() {
        #expect(throws: VhostUserError.self) { try VhostUserCodec.decodeHeader([1, 0, 0, 0, 1]) }
    }
}
