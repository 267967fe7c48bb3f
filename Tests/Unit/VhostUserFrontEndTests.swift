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
        ]
        for (arguments, expected) in bad {
            #expect { _ = try VMMConfiguration.parse(["-kernel", "k"] + arguments) } throws: { "\($0)".contains(expected) }
        }
    }
}
