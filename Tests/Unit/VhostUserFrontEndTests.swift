import Foundation
import Glibc
import Synchronization
import Testing
@testable import VMMCore

/// The VMM's side of vhost-user (`VhostUserNetdev`) against the in-process backend on a
/// unix socket (the end-to-end case with guest traffic is VhostUserFrontEndFunctionalTests).
@Suite struct VhostUserFrontEndTests {
    final class Served: @unchecked Sendable {
        let path: String
        let directory: String
        let backend: VhostUserNetBackend
        let thread: OSThread
        let tapPeer: Int32
        init(queuePairs: Int) throws {
            directory = FileManager.default.temporaryDirectory.appendingPathComponent("vu-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
            try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
            path = directory + "/vu.sock"
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
            thread = try OSThread(name: "vu-front-test") {
                guard let fd = listener.withRaw({ UnixSocket.accept($0) }) else { return }
                backend.serve(VhostUserConnection(socket: FileDescriptor(adopting: fd, label: "conn")))
            }
        }
        func finish(_ netdev: VhostUserNetdev?) {
            netdev?.connection.socket.close()
            if netdev == nil, let fd = try? UnixSocket.connect(path: path) { close(fd) }
            thread.join()
            backend.shutdown()
            close(tapPeer)
            try? FileManager.default.removeItem(atPath: directory)
        }
    }

    @Test func privateRAMIsRefusedNamingTheMemoryBackend() throws {
        let served = try Served(queuePairs: 1)
        let netdev = try VhostUserNetdev(id: "n0", socketPath: served.path, queues: 1)
        defer { served.finish(netdev) }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: false)
        #expect {
            _ = try netdev.makeDatapath(pairs: 1, memory: ram, memoryBackend: "ram0")
        } throws: { error in
            "\(error)" == "netdev n0: vhost-user needs shared guest RAM, but memory backend 'ram0' has share=off (use memory-backend-memfd or share=on)"
        }
    }

    @Test func moreQueuesThanTheBackendServesIsAnError() throws {
        let served = try Served(queuePairs: 1)
        defer { served.finish(nil) }
        #expect {
            _ = try VhostUserNetdev(id: "n0", socketPath: served.path, queues: 2)
        } throws: { error in
            "\(error)" == "netdev n0: queues=2 but the vhost-user backend serves 1 queue pair"
        }
    }

    /// A backend busy with another front-end leaves the connection in its listen queue:
    /// the VMM's startup ends with an error naming the netdev, not a hang.
    @Test func aBackendThatNeverAnswersIsAnErrorNotAHang() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("vu-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let listener = try UnixSocket.listen(path: directory + "/vu.sock")
        defer { close(listener) }
        #expect {
            _ = try VhostUserNetdev(id: "n0", socketPath: directory + "/vu.sock", queues: 1, replyTimeout: .milliseconds(200))
        } throws: { error in
            "\(error)".hasPrefix("netdev n0: the vhost-user backend at \(directory)/vu.sock did not answer GET_FEATURES within 0.2 seconds")
        }
    }

    @Test func commandLineSpellsItAsQEMUDoes() throws {
        let config = try VMMConfiguration.parse(["-kernel", "k", "-chardev", "socket,id=c,path=/tmp/vu.sock",
                                                 "-netdev", "vhost-user,id=n0,chardev=c,queues=2"])
        #expect(config.socketChardevs == ["c": "/tmp/vu.sock"])
        #expect(config.netdevs.first?.vhostUserChardev == "c")
        #expect(config.netdevs.first?.queues == 2)
        let bad: [([String], String)] = [
            (["-chardev", "socket,id=c,path=/p,server=on"], "server=on is not supported"),
            (["-chardev", "file,id=c,path=/p"], "unsupported chardev backend 'file'"),
            (["-chardev", "socket,id=c"], "path"),
            (["-chardev", "socket,id=c,path=/a", "-chardev", "socket,id=c,path=/b"], "duplicate chardev id 'c'"),
            (["-netdev", "vhost-user,id=n0"], "chardev"),
            (["-netdev", "vhost-user,id=n0,chardev=c,ifname=tap0"], "ifname"),
            (["-netdev", "vhost-user,id=n0,chardev=c,queues=0"], "queues=0 must be 1..128"),
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
        let netdev = try VhostUserNetdev(id: "n0", socketPath: served.path, queues: 1)
        defer { served.finish(netdev) }
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
}
