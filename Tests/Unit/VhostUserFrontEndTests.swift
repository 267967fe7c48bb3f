import Foundation
import Glibc
import Logging
import QMPWire
import Synchronization
import Testing
@testable import VMMCore

/// The VMM's side of vhost-user (`VhostUserNetdev`) against the in-process backend on a
/// unix socket (the end-to-end case with guest traffic is VhostUserFrontEndFunctionalTests).
@Suite struct VhostUserFrontEndTests {
    /// The in-process backend on a unix socket, serving one front-end after another on a
    /// thread of its own. `dropFrontEnd` closes the backend's end of the current
    /// connection, as a backend that dies does.
    final class Served: @unchecked Sendable {
        let path: String
        let directory: String
        let backend: VhostUserNetBackend
        var thread: OSThread?
        let tapPeer: Int32
        let listener: FileDescriptor
        /// A duplicate of the current connection's fd, to shut it down from the test.
        let current = Mutex<Int32>(-1)
        let accepted = Atomic<Int>(0)
        let stopping = Atomic<Bool>(false)
        /// `directory`: serve in this (existing) directory instead of a new one.
        init(queuePairs: Int, directory: String? = nil) throws {
            self.directory = directory ?? FileManager.default.temporaryDirectory.appendingPathComponent("vu-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
            try FileManager.default.createDirectory(atPath: self.directory, withIntermediateDirectories: true)
            path = self.directory + "/vu.sock"
            var taps: [FileDescriptor] = []
            var peer: Int32 = -1
            for _ in 0..<queuePairs {
                var pair: [Int32] = [0, 0]
                socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &pair)
                taps.append(FileDescriptor(adopting: pair[0], label: "tap"))
                if peer >= 0 { close(pair[1]) } else { peer = pair[1] }
            }
            tapPeer = peer
            let backend = try VhostUserNetBackend(queuePairs: queuePairs, tapFDs: taps, tapVnetHeader: true)
            self.backend = backend
            try backend.start()
            let listener = FileDescriptor(adopting: try UnixSocket.listen(path: path), label: "listener")
            self.listener = listener
            thread = try OSThread(name: "vu-front-test") { [self] in
                while let fd = listener.withRaw({ UnixSocket.accept($0) }), !stopping.load(ordering: .relaxed) {
                    let connection = VhostUserConnection(socket: FileDescriptor(adopting: fd, label: "conn"))
                    current.withLock { $0 = dup(fd) }
                    accepted.add(1, ordering: .relaxed)
                    backend.serve(connection)
                    current.withLock { c in
                        close(c)
                        c = -1
                    }
                }
            }
        }
        func dropFrontEnd() {
            current.withLock { c in if c >= 0 { Glibc.shutdown(c, Int32(SHUT_RDWR)) } }
        }
        func finish() {
            stopping.store(true, ordering: .relaxed)
            dropFrontEnd()
            if let fd = try? UnixSocket.connect(path: path) { close(fd) }
            thread?.join()
            backend.shutdown()
            close(tapPeer)
            try? FileManager.default.removeItem(atPath: directory)
        }
    }

    /// An event loop on a thread of its own, as the VMM's control thread; netdevs are made
    /// before it runs (they watch their socket on it).
    final class LoopThread: @unchecked Sendable {
        let loop: EventLoop
        var thread: OSThread?
        init() throws { loop = try EventLoop() }
        func run() throws { thread = try OSThread(name: "vu-test-loop") { [loop] in _ = loop.run() } }
        /// Runs `work` on the loop and waits for it.
        func sync(_ work: @escaping @Sendable () -> Void) {
            let done = ConditionLock(false)
            loop.post {
                work()
                done.update { $0 = true }
            }
            _ = done.wait(until: { $0 }, timeoutMilliseconds: 5000) { _ in }
        }
        func finish() {
            loop.post { [loop] in loop.stop(exitStatus: 0) }
            thread?.join()
        }
    }

    static func chardev(_ path: String, reconnect: Int = 0) throws -> SocketChardev {
        try SocketChardev(id: "c", path: path, reconnect: reconnect, context: "test")
    }

    static func netdev(_ path: String, queues: Int = 1, reconnect: Int = 0, loop: EventLoop, logger: Logger = Logger(label: "test"),
                       replyTimeout: Duration = .seconds(5)) throws -> VhostUserNetdev {
        try VhostUserNetdev(id: "n0", chardev: chardev(path, reconnect: reconnect), queues: queues, loop: loop, logger: logger,
                            replyTimeout: replyTimeout)
    }

    /// Waits up to 10 s for `condition`.
    static func eventually(_ condition: () -> Bool) -> Bool {
        let deadline = monotonicNanoseconds() + 10_000_000_000
        while !condition() {
            guard monotonicNanoseconds() < deadline else { return false }
            usleep(2000)
        }
        return true
    }

    @Test func privateRAMIsRefusedNamingTheMemoryBackend() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish() }
        let loop = try EventLoop()
        let netdev = try Self.netdev(served.path, loop: loop)
        defer { netdev.shutdown() }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: false)
        #expect {
            _ = try netdev.makeDatapath(pairs: 1, memory: ram, memoryBackend: "ram0")
        } throws: { error in
            "\(error)" == "netdev n0: vhost-user needs shared guest RAM, but memory backend 'ram0' has share=off (use memory-backend-memfd or share=on)"
        }
    }

    @Test func moreQueuesThanTheBackendServesIsAnError() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish() }
        let loop = try EventLoop()
        // With reconnect= too: a backend that answers but does not fit is no reason to wait.
        for reconnect in [0, 1] {
            #expect {
                _ = try Self.netdev(served.path, queues: 2, reconnect: reconnect, loop: loop)
            } throws: { error in
                "\(error)" == "netdev n0: chardev 'c' (unix:\(served.path)): queues=2 but the vhost-user backend serves 1 queue pair"
            }
        }
    }

    /// A backend that accepts (here: its listen queue does) but never answers: the VMM's
    /// startup ends with an error naming the netdev and the chardev, not a hang.
    @Test func aBackendThatNeverAnswersIsAnErrorNotAHang() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vu-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let listener = try UnixSocket.listen(path: directory + "/vu.sock")
        defer { close(listener) }
        let loop = try EventLoop()
        #expect {
            _ = try Self.netdev(directory + "/vu.sock", loop: loop, replyTimeout: .milliseconds(200))
        } throws: { error in
            "\(error)".hasPrefix("netdev n0: chardev 'c' (unix:\(directory)/vu.sock): the vhost-user backend did not answer GET_FEATURES within 0.2 seconds")
        }
    }

    /// Two rings of 8 entries at 1 MiB in shared RAM, as a device hands them to its datapath.
    static func rings(_ memory: GuestMemory) throws -> [Int: RingHandoff] {
        var rings: [Int: RingHandoff] = [:]
        for index in 0..<2 {
            var queue = Virtqueue(maxSize: 256)
            queue.size = 8
            queue.ready = true
            queue.descriptorTable = 0x10_0000 + UInt64(index) * 0x1000
            queue.driverArea = queue.descriptorTable + 0x200
            queue.deviceArea = queue.descriptorTable + 0x400
            rings[index] = RingHandoff(queue: queue, kick: try EventFD(label: "kick \(index)"), call: try EventFD(label: "call \(index)"))
        }
        return rings
    }

    /// The backend goes away while the rings run: the link goes down, the rings count as
    /// stopped at the used index in guest RAM, and with reconnect=1 the netdev connects
    /// again on the loop and sends the rings with that base; the link is up again.
    @Test func aLostBackendTakesTheLinkDownAndReconnectRestoresTheRings() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish() }
        let logs = Mutex<[String]>.Box([])
        let logger = Logger(label: "test") { _ in CapturingLogHandler(messages: logs) }
        let loop = try LoopThread()
        let netdev = try Self.netdev(served.path, reconnect: 1, loop: loop.loop, logger: logger)
        try loop.run()
        defer {
            loop.sync { netdev.shutdown() }
            loop.finish()
        }
        let memory = try GuestMemory(size: 4 << 20, shared: true)
        let datapath = try netdev.makeDatapath(pairs: 1, memory: memory, memoryBackend: nil)
        let failures = Mutex<[String]>.Box([])
        let context = DatapathContext(memory: memory, ringFailed: { _, message in failures.value.withLock { $0.append(message) } },
                                      attachDoorbell: { _, _ in }, detachDoorbells: {})
        #expect(datapath.linkUp)
        datapath.start(try Self.rings(memory), activePairs: 1, context: context)
        #expect(Self.eventually { served.backend.state.withLock { $0.rings[1].queue != nil } })
        // The guest had posted 5 TX buffers and seen them used when the backend died.
        try memory.store(UInt16(5), at: 0x10_1200 + 2)
        try memory.store(UInt16(5), at: 0x10_1400 + 2)
        served.dropFrontEnd()
        #expect(Self.eventually { !netdev.linkUp })
        #expect(!datapath.linkUp)
        #expect(Self.eventually { netdev.linkUp }, "\(logs.value.withLock { $0 })")
        #expect(served.accepted.load(ordering: .relaxed) == 2)
        #expect(Self.eventually { served.backend.state.withLock { $0.rings[1].queue?.lastAvailable } == 5 })
        let stopped = datapath.stop()
        #expect(stopped[1]?.lastAvailable == 5 && stopped[1]?.usedIndex == 5)
        #expect(failures.value.withLock { $0 }.isEmpty)
        let lines = logs.value.withLock { $0 }
        #expect(lines.contains("warning netdev n0: chardev 'c' (unix:\(served.path)): the vhost-user backend closed the connection; link down (2 rings stopped at the used index in guest RAM); reconnecting every 1 s (reconnect=1)"), "\(lines)")
        #expect(lines.contains("info netdev n0: chardev 'c' (unix:\(served.path)): reconnected to the vhost-user backend; link up (2 rings restored)"), "\(lines)")
    }

    /// Without reconnect= the link stays down, and the log says so, naming the chardev.
    @Test func withoutReconnectTheLinkStaysDownAndTheLogSaysSo() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish() }
        let logs = Mutex<[String]>.Box([])
        let logger = Logger(label: "test") { _ in CapturingLogHandler(messages: logs) }
        let loop = try LoopThread()
        let netdev = try Self.netdev(served.path, loop: loop.loop, logger: logger)
        try loop.run()
        defer {
            loop.sync { netdev.shutdown() }
            loop.finish()
        }
        served.dropFrontEnd()
        #expect(Self.eventually { !netdev.linkUp })
        #expect(Self.eventually { logs.value.withLock { $0 }.contains {
            $0 == "error netdev n0: chardev 'c' (unix:\(served.path)): the vhost-user backend closed the connection; link down; it stays down: the chardev has no reconnect= (-chardev socket,...,reconnect=SECONDS)"
        } }, "\(logs.value.withLock { $0 })")
        usleep(300_000)
        #expect(!netdev.linkUp)
        #expect(served.accepted.load(ordering: .relaxed) == 1)
    }

    /// With reconnect= a backend that is not there yet is no start-up error: the link
    /// starts down and comes up once the backend listens.
    @Test func withReconnectTheBackendMayComeAfterTheVMM() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vu-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        let loop = try LoopThread()
        let netdev = try Self.netdev(directory + "/vu.sock", reconnect: 1, loop: loop.loop)
        #expect(!netdev.linkUp)
        try loop.run()
        defer {
            loop.sync { netdev.shutdown() }
            loop.finish()
        }
        let served = try Served(queuePairs: 1, directory: directory)
        defer { served.finish() }
        #expect(Self.eventually { netdev.linkUp })
    }

    /// A backend that accepts but never answers, met by a reconnect: each attempt ends
    /// after the reply timeout (logged once, naming the chardev), the link stays down and
    /// the loop goes on; a real backend on the path is then picked up.
    @Test func aReconnectToABackendThatNeverAnswersIsBoundedAndRetried() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vu-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        let path = directory + "/vu.sock"
        let logs = Mutex<[String]>.Box([])
        let logger = Logger(label: "test") { _ in CapturingLogHandler(messages: logs) }
        let loop = try LoopThread()
        let netdev = try Self.netdev(path, reconnect: 1, loop: loop.loop, logger: logger, replyTimeout: .milliseconds(200))
        try loop.run()
        defer {
            loop.sync { netdev.shutdown() }
            loop.finish()
        }
        // Its listen queue takes the connection; nobody reads it.
        let mute = try UnixSocket.listen(path: path)
        let expected = "warning netdev n0: chardev 'c' (unix:\(path)): the vhost-user backend did not answer GET_FEATURES within 0.2 seconds (is it serving another front-end?); retrying every 1 s"
        #expect(Self.eventually { logs.value.withLock { $0 }.contains(expected) }, "\(logs.value.withLock { $0 })")
        // The loop still runs its work between attempts.
        let answered = Mutex<Bool>.Box(false)
        loop.sync { answered.value.withLock { $0 = true } }
        #expect(answered.value.withLock { $0 })
        #expect(!netdev.linkUp)
        close(mute)
        let served = try Served(queuePairs: 1, directory: directory)
        defer { served.finish() }
        #expect(Self.eventually { netdev.linkUp }, "\(logs.value.withLock { $0 })")
    }

    /// `chardev-add`'s socket backend in QEMU's argument shape: members checked with
    /// QAPI's wording and full names, unsupported choices named with their value.
    @Test func chardevAddArgumentsAreCheckedAsQAPIDoes() throws {
        func backend(_ data: JSON, type: String = "socket") -> JSONObject { ["type": .string(type), "data": data] }
        func unix(_ path: String) -> JSON { ["type": "unix", "data": ["path": .string(path)]] }
        let good = try Machine.socketChardev(id: "c", backend: backend(["addr": unix("/run/vu.sock"), "server": false, "reconnect": 2]))
        #expect(good == (try SocketChardev(id: "c", path: "/run/vu.sock", reconnect: 2, context: "")))
        #expect(try Machine.socketChardev(id: "c", backend: backend(["addr": unix("/p")])).reconnect == 0)
        let bad: [(JSONObject, String)] = [
            (backend(["addr": unix("/p")], type: "file"), "chardev-add 'c': backend type 'file' is not supported (only 'socket', a unix socket the VMM connects to)"),
            (["type": "socket"], "Parameter 'backend.data' is missing"),
            (backend(["server": false]), "Parameter 'backend.data.addr' is missing"),
            (backend(["addr": unix("/p"), "reconnect": "1"]), "Invalid parameter type for 'backend.data.reconnect', expected: integer"),
            (backend(["addr": unix("/p"), "server": "no"]), "Invalid parameter type for 'backend.data.server', expected: boolean"),
            (backend(["addr": unix("/p"), "telnet": true]), "Parameter 'backend.data.telnet' is unexpected"),
            (backend(["addr": ["type": "unix", "data": [:]]]), "Parameter 'backend.data.addr.data.path' is missing"),
            (backend(["addr": ["type": "inet", "data": ["host": "h", "port": "1"]]]), "chardev-add 'c': address type 'inet' is not supported (only 'unix')"),
            (backend(["addr": unix("/p"), "server": true]), "chardev-add 'c': server=true is not supported (the VMM connects to the backend)"),
            (backend(["addr": unix("/p"), "reconnect": -1]), "chardev-add 'c': reconnect=-1 must be 0..86400 seconds (0: never)"),
            (backend(["addr": unix("")]), "chardev-add 'c': the socket path is empty"),
        ]
        for (arguments, expected) in bad {
            #expect { _ = try Machine.socketChardev(id: "c", backend: arguments) } throws: { "\($0)" == expected }
        }
    }

    @Test func commandLineSpellsItAsQEMUDoes() throws {
        let config = try VMMConfiguration.parse(["-kernel", "k", "-chardev", "socket,id=c,path=/tmp/vu.sock",
                                                 "-netdev", "vhost-user,id=n0,chardev=c,queues=2"])
        let reconnecting = try VMMConfiguration.parse(["-kernel", "k", "-chardev", "socket,id=c,path=/tmp/vu.sock,reconnect=3"])
        #expect(reconnecting.socketChardevs["c"]?.reconnect == 3)
        #expect(config.socketChardevs == ["c": try Self.chardev("/tmp/vu.sock")])
        #expect(config.netdevs.first?.vhostUserChardev == "c")
        #expect(config.netdevs.first?.queues == 2)
        // A local migration target's netdev: the connection comes with the stream.
        let incoming = try VMMConfiguration.parse(["-kernel", "k", "-netdev", "vhost-user,id=n0,queues=2,incoming-fds=on"])
        #expect(incoming.netdevs.first?.incomingFDs == true && incoming.netdevs.first?.vhostUser == true)
        #expect(incoming.netdevs.first?.vhostUserChardev == nil && incoming.netdevs.first?.queues == 2)
        let bad: [([String], String)] = [
            (["-chardev", "socket,id=c,path=/p,server=on"], "server=on is not supported"),
            (["-chardev", "file,id=c,path=/p"], "unsupported chardev backend 'file'"),
            (["-chardev", "socket,id=c"], "path"),
            (["-chardev", "socket,id=c,path=/a", "-chardev", "socket,id=c,path=/b"], "duplicate chardev id 'c'"),
            (["-chardev", "socket,id=c,path=/p,reconnect=-1"], "-chardev socket,id=c,path=/p,reconnect=-1: reconnect=-1 is not a number of seconds (0 or more)"),
            (["-chardev", "socket,id=c,path=/p,reconnect=x"], "reconnect=x is not a number of seconds"),
            (["-chardev", "socket,id=c,path=/p,reconnect=86401"], "-chardev socket,id=c,path=/p,reconnect=86401: reconnect=86401 must be 0..86400 seconds (0: never)"),
            (["-chardev", "socket,id=c,path=/" + String(repeating: "x", count: 120)], "UNIX socket path '/xxx"),
            (["-netdev", "vhost-user,id=n0"], "chardev"),
            (["-netdev", "vhost-user,id=n0,chardev=c,ifname=tap0"], "ifname"),
            (["-netdev", "vhost-user,id=n0,chardev=c,queues=0"], "queues=0 must be 1..128"),
            (["-netdev", "vhost-user,id=n0,chardev=c,incoming-fds=on"],
             "incoming-fds is incompatible with chardev= (the backend connection comes from the migration source)"),
        ]
        for (arguments, expected) in bad {
            #expect { _ = try VMMConfiguration.parse(["-kernel", "k"] + arguments) } throws: { "\($0)".contains(expected) }
        }
    }

    /// Pre-copy's log through the front-end: rings running, `startDirtyLog` sends the log,
    /// LOG_ALL and the rings' used-ring logging; an RX frame the backend then writes shows
    /// in `collectDirty` as the buffer's and the used ring's pages, and one before does not.
    @Test func backendWritesReachCollectDirtyOnceLogging() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish() }
        let loop = try EventLoop()
        let netdev = try Self.netdev(served.path, loop: loop)
        defer { netdev.shutdown() }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let datapath = try netdev.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        var rings: [Int: RingHandoff] = [:]
        for index in 0..<2 {
            var q = Virtqueue(maxSize: 256)
            q.size = 16
            q.ready = true
            q.descriptorTable = 0x10000 + UInt64(index) * 0x1000
            q.driverArea = 0x20000 + UInt64(index) * 0x1000
            q.deviceArea = 0x30000 + UInt64(index) * 0x1000
            rings[index] = RingHandoff(queue: q, kick: try EventFD(label: "kick"), call: try EventFD(label: "call"))
        }
        let failures = Mutex<[String]>([])
        datapath.start(rings, activePairs: 1, context: DatapathContext(
            memory: ram, ringFailed: { _, m in failures.withLock { $0.append(m) } }, attachDoorbell: { _, _ in }, detachDoorbells: {}))
        let frame = [UInt8](repeating: 0, count: 12) + [UInt8](repeating: 0xFF, count: 6) + Array(0..<54)
        func receiveOne(slot: UInt16) throws -> [Int] {
            let d = 0x10000 + 16 * UInt64(slot)
            try ram.store(0x60000 + 0x1000 * UInt64(slot), at: d)
            try ram.store(UInt32(2048), at: d + 8)
            try ram.store(UInt16(2), at: d + 12)
            try ram.store(slot, at: 0x20000 + 4 + 2 * UInt64(slot))
            try ram.store(slot + 1, at: 0x20000 + 2)
            rings[0]!.kick!.signal()
            #expect(send(served.tapPeer, frame, frame.count, 0) == frame.count)
            for _ in 0..<400 where try ram.load(UInt16.self, at: 0x30002) != slot + 1 { usleep(5000) }
            #expect(try ram.load(UInt16.self, at: 0x30002) == slot + 1)
            var bitmap = [UInt64](repeating: 0, count: ram.deviceDirty.wordCount)
            datapath.collectDirty(into: &bitmap)
            return bitmap.enumerated().flatMap { i, w in (0..<64).filter { w >> UInt64($0) & 1 != 0 }.map { i * 64 + $0 } }
        }
        #expect(try receiveOne(slot: 0) == [], "not logging yet")
        try datapath.startDirtyLog()
        #expect(try receiveOne(slot: 1) == [0x30, 0x61], "the used ring's page and the buffer's")
        datapath.stopDirtyLog()
        #expect(try receiveOne(slot: 2) == [])
        let stopped = datapath.stop()
        #expect(stopped[0]?.lastAvailable == 3 && stopped[0]?.usedIndex == 3)
        #expect(failures.withLock { $0 } == [])
    }

    /// Two rings (RX 0, TX 1) of 16 entries in `ram`, handed to a datapath as the device does.
    final class Rings: @unchecked Sendable {
        let ram: GuestMemory
        var queues: [Int: Virtqueue] = [:]
        let failures = Mutex<[String]>([])
        init(ram: GuestMemory) {
            self.ram = ram
            for index in 0..<2 {
                var q = Virtqueue(maxSize: 256)
                q.size = 16
                q.ready = true
                q.descriptorTable = 0x10000 + UInt64(index) * 0x1000
                q.driverArea = 0x20000 + UInt64(index) * 0x1000
                q.deviceArea = 0x30000 + UInt64(index) * 0x1000
                queues[index] = q
            }
        }
        /// Starts `datapath` on the rings as they are now (with fresh kick/call eventfds).
        func start(_ datapath: NetDatapath) throws -> [Int: RingHandoff] {
            let rings = try queues.mapValues { RingHandoff(queue: $0, kick: try EventFD(label: "kick"), call: try EventFD(label: "call")) }
            datapath.start(rings, activePairs: 1, context: DatapathContext(
                memory: ram, ringFailed: { [self] _, m in failures.withLock { $0.append(m) } }, attachDoorbell: { _, _ in }, detachDoorbells: {}))
            return rings
        }
        /// Posts RX buffer `slot`, sends a frame into the TAP and waits for its used entry.
        func receive(slot: UInt16, tapPeer: Int32, kick: EventFD?) throws -> Bool {
            let d = 0x10000 + 16 * UInt64(slot)
            try ram.store(0x60000 + 0x1000 * UInt64(slot), at: d)
            try ram.store(UInt32(2048), at: d + 8)
            try ram.store(UInt16(2), at: d + 12)
            try ram.store(slot, at: 0x20000 + 4 + 2 * UInt64(slot))
            try ram.store(slot + 1, at: 0x20000 + 2)
            kick?.signal()
            let frame = [UInt8](repeating: 0, count: 12) + [UInt8](repeating: 0xFF, count: 6) + Array(0..<54)
            guard send(tapPeer, frame, frame.count, 0) == frame.count else { return false }
            for _ in 0..<400 where try ram.load(UInt16.self, at: 0x30002) != slot + 1 { usleep(5000) }
            return try ram.load(UInt16.self, at: 0x30002) == slot + 1
        }
    }

    /// A local migration's handover in one process: the source stops its rings, its
    /// connection goes (as `netdev/n0/vhost-user`) to an `incoming-fds=on` netdev, which
    /// stays silent until it starts, then negotiates without SET_OWNER and resumes the
    /// rings where the source stopped them; the backend served one connection throughout.
    @Test func targetAdoptsTheSourcesConnectionAndResumesTheRings() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish() }
        let loop = try EventLoop()
        let source = try Self.netdev(served.path, loop: loop)
        defer { source.shutdown() }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let rings = Rings(ram: ram)
        let sourcePath = try source.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        var handed = try rings.start(sourcePath)
        #expect(try rings.receive(slot: 0, tapPeer: served.tapPeer, kick: handed[0]?.kick))
        rings.queues = sourcePath.stop()
        #expect(rings.queues[0]?.lastAvailable == 1)
        let fds = sourcePath.handedOverFDs()
        #expect(fds.map(\.name) == ["netdev/n0/vhost-user"])

        let target = VhostUserNetdev(id: "n0", incomingQueues: 1, loop: loop, logger: Logger(label: "test"))
        let targetPath = try target.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        #expect(targetPath.awaitsIncomingFDs)
        try targetPath.adoptIncoming([try fds[0].fd.duplicate()], vnetHeader: true)
        #expect(!targetPath.awaitsIncomingFDs)
        handed = try rings.start(targetPath)
        #expect(try rings.receive(slot: 1, tapPeer: served.tapPeer, kick: handed[0]?.kick), "the target's rings run in the same backend")
        rings.queues = targetPath.stop()
        #expect(rings.queues[0]?.lastAvailable == 2 && rings.queues[0]?.usedIndex == 2)
        #expect(rings.failures.withLock { $0 } == [])
        target.shutdown()
    }

    /// The handover failed after the fd went out (the target never ran): the source's
    /// rings start again on its own reference to the connection.
    @Test func sourceResumesOnItsConnectionAfterAFailedHandover() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish() }
        let loop = try EventLoop()
        let source = try Self.netdev(served.path, loop: loop)
        defer { source.shutdown() }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let rings = Rings(ram: ram)
        let datapath = try source.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        _ = try rings.start(datapath)
        rings.queues = datapath.stop()
        do {
            // A target took the fd and died: its copy closes, the connection lives on.
            let target = VhostUserNetdev(id: "n0", incomingQueues: 1, loop: loop, logger: Logger(label: "test"))
            try target.adoptIncoming([try datapath.handedOverFDs()[0].fd.duplicate()], vnetHeader: true)
        }
        let handed = try rings.start(datapath)
        #expect(try rings.receive(slot: 0, tapPeer: served.tapPeer, kick: handed[0]?.kick))
        #expect(rings.failures.withLock { $0 } == [])
    }

    /// After the handover the socket is shared with the target: a link the source then
    /// loses (its watch reporting a hang-up) is only closed on its side, never shut down,
    /// and the source does not reconnect (reconnect=1): the target's rings go on in the
    /// backend on the one connection it accepted.
    @Test func afterAHandoverTheSourceOnlyClosesItsCopy() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish() }
        let logs = Mutex<[String]>.Box([])
        let loop = try LoopThread()
        let source = try Self.netdev(served.path, reconnect: 1, loop: loop.loop,
                                     logger: Logger(label: "test") { _ in CapturingLogHandler(messages: logs) })
        let target = VhostUserNetdev(id: "n0", incomingQueues: 1, loop: loop.loop, logger: Logger(label: "test"))
        try loop.run()
        defer {
            loop.sync { source.shutdown(); target.shutdown() }
            loop.finish()
        }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let rings = Rings(ram: ram)
        let sourcePath = try source.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        _ = try rings.start(sourcePath)
        rings.queues = sourcePath.stop()
        let targetPath = try target.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        try targetPath.adoptIncoming([try sourcePath.handedOverFDs()[0].fd.duplicate()], vnetHeader: true)
        let handed = try rings.start(targetPath)
        #expect(try rings.receive(slot: 0, tapPeer: served.tapPeer, kick: handed[0]?.kick))
        source.hungUp()
        #expect(Self.eventually { logs.value.withLock { $0 }.contains {
            $0 == "warning netdev n0: chardev 'c' (unix:\(served.path)): the vhost-user backend closed the connection; link down; the connection was handed over to a migration target, so this netdev does not reconnect unless its rings start here again"
        } }, "\(logs.value.withLock { $0 })")
        #expect(!source.linkUp && target.linkUp)
        #expect(try rings.receive(slot: 1, tapPeer: served.tapPeer, kick: handed[0]?.kick), "the target's link still works")
        usleep(1_500_000)
        #expect(served.accepted.load(ordering: .relaxed) == 1, "the source did not reconnect")
        #expect(rings.failures.withLock { $0 } == [])
    }

    /// A backend that comes back during pre-copy gets the log again with the rings
    /// (SET_LOG_BASE, LOG_ALL, the rings' used-ring logging): its RX writes after the
    /// reconnect reach `collectDirty`.
    @Test func aReconnectDuringPreCopySendsTheLogAgain() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish() }
        let loop = try LoopThread()
        let netdev = try Self.netdev(served.path, reconnect: 1, loop: loop.loop)
        try loop.run()
        defer {
            loop.sync { netdev.shutdown() }
            loop.finish()
        }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let rings = Rings(ram: ram)
        let datapath = try netdev.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        let handed = try rings.start(datapath)
        try datapath.startDirtyLog()
        served.dropFrontEnd()
        #expect(Self.eventually { !netdev.linkUp })
        #expect(Self.eventually { netdev.linkUp && served.backend.state.withLock { $0.rings[0].queue != nil } })
        #expect(try rings.receive(slot: 0, tapPeer: served.tapPeer, kick: handed[0]?.kick))
        var bitmap = [UInt64](repeating: 0, count: ram.deviceDirty.wordCount)
        datapath.collectDirty(into: &bitmap)
        let pages = bitmap.enumerated().flatMap { i, w in (0..<64).filter { w >> UInt64($0) & 1 != 0 }.map { i * 64 + $0 } }
        #expect(pages == [0x30, 0x60], "the used ring's page and the buffer's")
        datapath.stopDirtyLog()
        _ = datapath.stop()
        #expect(rings.failures.withLock { $0 } == [])
    }

    /// The stream's descriptor for a vhost-user connection: kind 2, one fd by name.
    @Test func handoverDescriptorNamesTheConnection() throws {
        let descriptor = VirtioNet.DatapathDescriptor(kind: VirtioNet.DatapathDescriptor.kindVhostUserConnection, netdev: "n0",
                                                      queuePairs: 2, vnetHeader: true)
        #expect(descriptor.fdNames == ["netdev/n0/vhost-user"])
        let state = VirtioNet.SavedState(activePairs: 2, handover: descriptor)
        #expect(try VirtioNet.SavedState.decode(state.encoded(), owner: "nic0") == state)
        let tap = VirtioNet.DatapathDescriptor(kind: VirtioNet.DatapathDescriptor.kindTapQueues, netdev: "n0", queuePairs: 2, vnetHeader: true)
        #expect(tap.fdNames == ["netdev/n0/tap.0", "netdev/n0/tap.1"])
    }
}
