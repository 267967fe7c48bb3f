import Glibc
import Synchronization
import Testing
@testable import VMMCore

/// The vhost-user-net backend driven by a test front-end over a socketpair, with guest RAM
/// in a shared memfd (as QEMU's memory-backend-memfd,share=on) and a SOCK_SEQPACKET pair
/// standing in for the TAP queue (frames keep their boundaries, with the 12-byte header).
@Suite struct VhostUserNetBackendTests {
    static let frame: [UInt8] = [UInt8](repeating: 0xFF, count: 6) + [0x52, 0x54, 0, 1, 2, 3, 0x08, 0x06] + Array(0..<46)
    // Ring layout in guest physical memory (ring 0 RX, ring 1 TX), 16 entries each.
    static let ringSize: UInt32 = 16
    static func desc(_ ring: Int) -> UInt64 { 0x10000 + UInt64(ring) * 0x1000 }
    static func avail(_ ring: Int) -> UInt64 { 0x20000 + UInt64(ring) * 0x1000 }
    static func used(_ ring: Int) -> UInt64 { 0x30000 + UInt64(ring) * 0x1000 }

    final class Rig: @unchecked Sendable {
        let memory: GuestMemory
        let backend: VhostUserNetBackend
        var front: VhostUserConnection
        let tapPeer: Int32
        var server: OSThread
        final class Lines: Sendable { let lines = Mutex<[String]>([]) }
        let log = Lines()
        let kicks: [EventFD]
        let calls: [EventFD]

        init() throws {
            memory = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true, name: "vu-test")
            var tap: [Int32] = [0, 0]
            socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &tap)
            _ = fcntl(tap[0], F_SETFL, O_NONBLOCK)
            tapPeer = tap[1]
            let log = self.log
            backend = try VhostUserNetBackend(queuePairs: 1, tapFDs: [FileDescriptor(adopting: tap[0], label: "tap")], tapVnetHeader: true,
                                              log: { line in log.lines.withLock { $0.append(line) } })
            try backend.start()
            var pair: [Int32] = [-1, -1]
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair)
            front = VhostUserConnection(socket: FileDescriptor(adopting: pair[0], label: "front-end"))
            let back = VhostUserConnection(socket: FileDescriptor(adopting: pair[1], label: "backend"))
            let backend = self.backend
            server = try OSThread(name: "vu-test serve") { backend.serve(back) }
            kicks = try [EventFD(label: "kick 0"), EventFD(label: "kick 1")]
            calls = try [EventFD(label: "call 0"), EventFD(label: "call 1")]
        }

        /// The current front-end leaves (its socket closes) and a new one connects.
        func nextFrontEnd() throws {
            front.socket.close()
            server.join()
            var pair: [Int32] = [-1, -1]
            socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair)
            front = VhostUserConnection(socket: FileDescriptor(adopting: pair[0], label: "next front-end"))
            let back = VhostUserConnection(socket: FileDescriptor(adopting: pair[1], label: "backend"))
            let backend = self.backend
            server = try OSThread(name: "vu-test serve") { backend.serve(back) }
        }

        func finish() {
            front.socket.close()
            server.join()
            backend.shutdown()
            close(tapPeer)
        }

        var userBase: UInt64 { UInt64(UInt(bitPattern: memory.hostAddress(of: memory.regions[0]))) }
        var region: VhostUserMemoryRegion {
            VhostUserMemoryRegion(guestAddress: 0, size: memory.size, userAddress: userBase, mmapOffset: 0)
        }

        /// Sends with NEED_REPLY and returns the reply's u64 (0 = success).
        @discardableResult
        func request(_ m: VhostUserMessage, fds: [FileDescriptor] = []) throws -> VhostUserMessage? {
            try front.send(m, flags: .needReply, fds: fds)
            return try front.receive()?.message
        }

        /// QEMU's start sequence for both rings.
        /// `kickFDs: false`: SET_VRING_KICK with NOFD (the front-end asks the backend to poll).
        /// `logSHMFD`: negotiates LOG_SHMFD (SET_LOG_BASE with an fd); LOG_ALL is left to the test.
        func setUp(kickFDs: Bool = true, logSHMFD: Bool = false) throws {
            #expect(try request(.getFeatures) == .reply(.getFeatures, VhostUserNetBackend.features))
            try request(.setFeatures(VhostUserNetBackend.features & ~VhostUserFeature.logAll))
            try request(.setProtocolFeatures(VhostUserProtocolFeature.mq | VhostUserProtocolFeature.replyAck
                | (logSHMFD ? VhostUserProtocolFeature.logSHMFD : 0)))
            #expect(try request(.getQueueNum) == .reply(.getQueueNum, 1))
            try request(.setOwner)
            #expect(try request(.setMemTable([region]), fds: [memory.fd.duplicate()]) == .reply(.setMemTable, 0))
            for ring in 0..<2 {
                try request(.setVringNum(VhostUserVringState(index: UInt32(ring), num: VhostUserNetBackendTests.ringSize)))
                try request(.setVringBase(VhostUserVringState(index: UInt32(ring), num: 0)))
                #expect(try request(.setVringAddr(VhostUserVringAddress(index: UInt32(ring), descriptor: userBase + desc(ring),
                                                                         used: userBase + used(ring), available: userBase + avail(ring))))
                        == .reply(.setVringAddr, 0))
                try request(.setVringKick(VhostUserVringFile(index: UInt8(ring), hasFD: kickFDs)), fds: kickFDs ? [kicks[ring].fd] : [])
                try request(.setVringCall(VhostUserVringFile(index: UInt8(ring), hasFD: true)), fds: [calls[ring].fd])
                #expect(try request(.setVringEnable(VhostUserVringState(index: UInt32(ring), num: 1))) == .reply(.setVringEnable, 0))
            }
        }

        /// Makes one buffer available on `ring` (descriptor `slot`, avail entry `slot`).
        func post(ring: Int, slot: UInt16, address: UInt64, length: UInt32, writable: Bool) throws {
            let d = desc(ring) + 16 * UInt64(slot)
            try memory.store(address, at: d)
            try memory.store(length, at: d + 8)
            try memory.store(UInt16(writable ? 2 : 0), at: d + 12)
            try memory.store(slot, at: avail(ring) + 4 + 2 * UInt64(slot))
            try memory.store(slot + 1, at: avail(ring) + 2)
        }

        func waitForUsed(ring: Int, count: UInt16) throws -> Bool {
            for _ in 0..<200 {
                if try memory.load(UInt16.self, at: used(ring) + 2) == count { return true }
                usleep(5000)
            }
            return false
        }
    }


    @Test func transmitsAKickedFrameToTheTAPAndCalls() throws {
        let rig = try Rig()
        defer { rig.finish() }
        try rig.setUp()
        try rig.memory.write([UInt8](repeating: 0, count: 12) + Self.frame, at: 0x50000)
        try rig.post(ring: 1, slot: 0, address: 0x50000, length: UInt32(12 + Self.frame.count), writable: false)
        rig.kicks[1].signal()
        #expect(try rig.waitForUsed(ring: 1, count: 1))
        var buffer = [UInt8](repeating: 0, count: 2048)
        let n = recv(rig.tapPeer, &buffer, buffer.count, 0)
        #expect(Array(buffer.prefix(max(n, 0))) == [UInt8](repeating: 0, count: 12) + Self.frame)
        #expect(rig.calls[1].drain(), "the call eventfd was signalled after the used entry")
    }

    /// A frame posted before the ring started goes out with no kick: at start (the kick
    /// eventfd never signalled), and in polling mode (NOFD, no kick eventfd at all).
    @Test(arguments: [true, false])
    func framePostedBeforeTheStartGoesOutWithoutAKick(kickFDs: Bool) throws {
        let rig = try Rig()
        defer { rig.finish() }
        try rig.memory.write([UInt8](repeating: 0, count: 12) + Self.frame, at: 0x50000)
        try rig.post(ring: 1, slot: 0, address: 0x50000, length: UInt32(12 + Self.frame.count), writable: false)
        try rig.setUp(kickFDs: kickFDs)
        #expect(try rig.waitForUsed(ring: 1, count: 1))
        var buffer = [UInt8](repeating: 0, count: 2048)
        #expect(recv(rig.tapPeer, &buffer, buffer.count, Int32(MSG_DONTWAIT)) == 12 + Self.frame.count)
        // Polling mode keeps going: a second frame, still no kick.
        try rig.post(ring: 1, slot: 1, address: 0x50000, length: UInt32(12 + Self.frame.count), writable: false)
        if !kickFDs { #expect(try rig.waitForUsed(ring: 1, count: 2)) }
    }

    @Test func receivesAFrameIntoAPostedBuffer() throws {
        let rig = try Rig()
        defer { rig.finish() }
        try rig.setUp()
        try rig.post(ring: 0, slot: 0, address: 0x60000, length: 2048, writable: true)
        rig.kicks[0].signal()
        let sent = [UInt8](repeating: 0, count: 12) + Self.frame
        #expect(send(rig.tapPeer, sent, sent.count, 0) == sent.count)
        #expect(try rig.waitForUsed(ring: 0, count: 1))
        #expect(try rig.memory.load(UInt32.self, at: Self.used(0) + 8) == UInt32(sent.count), "used length")
        var expected = sent
        expected[10] = 1  // num_buffers
        #expect(try rig.memory.read(at: 0x60000, count: sent.count) == expected)
        #expect(rig.calls[0].drain())
        // GET_VRING_BASE stops the ring and says where: one entry taken.
        #expect(try rig.request(.getVringBase(VhostUserVringState(index: 0, num: 0))) == .vringBaseReply(VhostUserVringState(index: 0, num: 1)))
    }

    /// A frame that reaches the TAP between two front-ends waits there (no ring runs, so
    /// nothing reads it) and goes to the next front-end's guest.
    @Test func aFrameQueuedInTheTAPBetweenFrontEndsReachesTheNext() throws {
        let rig = try Rig()
        defer { rig.finish() }
        try rig.setUp()
        try rig.nextFrontEnd()
        let sent = [UInt8](repeating: 0, count: 12) + Self.frame
        #expect(send(rig.tapPeer, sent, sent.count, 0) == sent.count)
        usleep(50_000)
        try rig.setUp()
        try rig.post(ring: 0, slot: 0, address: 0x60000, length: 2048, writable: true)
        rig.kicks[0].signal()
        #expect(try rig.waitForUsed(ring: 0, count: 1))
        var expected = sent
        expected[10] = 1  // num_buffers
        #expect(try rig.memory.read(at: 0x60000, count: sent.count) == expected)
    }


    /// Each bad request: an error reply (NEED_REPLY), a log line naming the message, the
    /// connection closed; the backend then serves the next front-end.
    static let rejected: [(String, @Sendable (Rig) -> (VhostUserMessage, [FileDescriptor]), String)] = [
        ("ring out of range", { _ in (.setVringNum(VhostUserVringState(index: 2, num: 16)), []) },
         "SET_VRING_NUM: ring 2 out of range (this backend has 2 rings for 1 queue pairs)"),
        ("ring size not a power of two", { _ in (.setVringNum(VhostUserVringState(index: 0, num: 3)), []) },
         "SET_VRING_NUM: ring 0 size 3 must be a power of two"),
        ("features not offered", { _ in (.setFeatures(1 << 5), []) }, "SET_FEATURES: features 0x20 include 0x20"),
        ("region past the fd's end", { rig in
            var r = rig.region
            r.size = 2 << 20
            return (.setMemTable([r]), [try! rig.memory.fd.duplicate()])
        }, "SET_MEM_TABLE: region 0 (guest 0x0+0x200000): offset 0x0 + size exceeds its fd's 1048576 bytes"),
        ("unaligned mmap offset", { rig in
            var r = rig.region
            r.mmapOffset = 0x10
            r.size = 0x1000
            return (.setMemTable([r]), [try! rig.memory.fd.duplicate()])
        }, "mmap offset 0x10 is not page-aligned"),
        ("an eventfd as RAM", { rig in (.setMemTable([rig.region]), [try! EventFD().fd.take()]) }, "or the fd is not a file"),
        ("log base without LOG_SHMFD", { _ in (.setLogBase(size: 4096, offset: 0), [try! EventFD().fd.take()]) },
         "SET_LOG_BASE: the log comes as an fd only with LOG_SHMFD, which was not negotiated"),
        ("ring outside the table", { rig in
            (.setVringAddr(VhostUserVringAddress(index: 1, descriptor: rig.userBase + (1 << 20) - 8, used: rig.userBase + used(1),
                                                available: rig.userBase + avail(1))), [])
        }, "SET_VRING_ADDR: ring 1's descriptor table at user address"),
    ]

    @Test(arguments: 0..<rejected.count)
    func badRequestGetsAnErrorAndTheNextFrontEndIsServed(_ i: Int) throws {
        let (what, make, expected) = Self.rejected[i]
        let rig = try Rig()
        defer { rig.finish() }
        try rig.setUp()
        let (message, fds) = make(rig)
        #expect(try rig.request(message, fds: fds) == .reply(message.request, 1), "\(what): error reply")
        #expect(try rig.front.receive() == nil, "\(what): the backend closed the connection")
        rig.server.join()
        #expect(rig.log.lines.withLock { $0 }.contains { $0.contains(expected) }, "\(what): \(rig.log.lines.withLock { $0 })")
        // The device reset: a new front-end starts from scratch on the same TAP.
        var pair: [Int32] = [-1, -1]
        socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &pair)
        let next = VhostUserConnection(socket: FileDescriptor(adopting: pair[0], label: "next front-end"))
        let back = VhostUserConnection(socket: FileDescriptor(adopting: pair[1], label: "backend"))
        let backend = rig.backend
        let thread = try OSThread(name: "vu-test serve 2") { backend.serve(back) }
        try next.send(.getQueueNum)
        #expect(try next.receive()?.message == .reply(.getQueueNum, 1))
        next.socket.close()
        thread.join()
    }

    // MARK: dirty log

    /// SET_LOG_BASE answers without NEED_REPLY (QEMU reads that reply).
    static func setLog(_ rig: Rig, _ log: VhostDirtyLog) throws {
        try rig.front.send(.setLogBase(size: log.size, offset: 0), fds: [log.fd!])
        #expect(try rig.front.receive()?.message == .reply(.setLogBase, 0))
    }

    /// With LOG_ALL, an RX frame marks the buffer's page and the used ring's page, and
    /// nothing else; before LOG_ALL, nothing is marked.
    @Test func receivedFrameIsLoggedOnlyWithLogAll() throws {
        let rig = try Rig()
        defer { rig.finish() }
        try rig.setUp(logSHMFD: true)
        let log = try VhostDirtyLog(covering: rig.memory)
        try Self.setLog(rig, log)
        let sent = [UInt8](repeating: 0, count: 12) + Self.frame
        func receiveOne(slot: UInt16) throws -> [Int] {
            try rig.post(ring: 0, slot: slot, address: 0x60000 + 0x1000 * UInt64(slot), length: 2048, writable: true)
            rig.kicks[0].signal()
            #expect(send(rig.tapPeer, sent, sent.count, 0) == sent.count)
            #expect(try rig.waitForUsed(ring: 0, count: slot + 1))
            var bitmap = [UInt64](repeating: 0, count: rig.memory.deviceDirty.wordCount)
            log.collect(into: &bitmap)
            return bitmap.enumerated().flatMap { i, w in (0..<64).filter { w >> UInt64($0) & 1 != 0 }.map { i * 64 + $0 } }
        }
        #expect(try receiveOne(slot: 0) == [], "LOG_ALL not negotiated: no marks")
        try rig.request(.setFeatures(VhostUserNetBackend.features))
        #expect(try receiveOne(slot: 1) == [0x30, 0x61], "the used ring's page and the buffer's")
        try rig.request(.setFeatures(VhostUserNetBackend.features & ~VhostUserFeature.logAll))
        #expect(try receiveOne(slot: 2) == [], "LOG_ALL off again")
    }

    /// Bad logs (LOG_SHMFD negotiated): an error reply naming the value, the connection closed.
    @Test(arguments: [
        ("zero size", UInt64(0), UInt64(0), "SET_LOG_BASE: log size 0 is out of range"),
        ("unaligned offset", UInt64(32), UInt64(8), "SET_LOG_BASE: log offset 0x8 is not page-aligned"),
        ("past the fd", UInt64(64), UInt64(0), "SET_LOG_BASE: log offset 0x0 + size 64 exceeds its fd's 32 bytes"),
        ("smaller than the table", UInt64(16), UInt64(0), "SET_LOG_BASE: the log of 16 bytes covers guest memory up to 0x80000, but the memory table reaches 0x100000"),
    ])
    func badLogIsRefusedNamingIt(_ what: String, size: UInt64, offset: UInt64, expected: String) throws {
        let rig = try Rig()
        defer { rig.finish() }
        try rig.setUp(logSHMFD: true)
        let log = try VhostDirtyLog(covering: rig.memory)
        try rig.front.send(.setLogBase(size: size, offset: offset), flags: .needReply, fds: [log.fd!])
        #expect(try rig.front.receive()?.message == .reply(.setLogBase, 1), "\(what): error reply")
        #expect(try rig.front.receive() == nil, "\(what): the backend closed the connection")
        rig.server.join()
        #expect(rig.log.lines.withLock { $0 }.contains { $0.contains(expected) }, "\(what): \(rig.log.lines.withLock { $0 })")
    }
}
