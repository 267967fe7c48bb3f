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
            netdev?.connection?.socket.close()
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
        // A local migration target's netdev: the connection comes with the stream.
        let incoming = try VMMConfiguration.parse(["-kernel", "k", "-netdev", "vhost-user,id=n0,queues=2,incoming-fds=on"])
        #expect(incoming.netdevs.first?.incomingFDs == true && incoming.netdevs.first?.vhostUser == true)
        #expect(incoming.netdevs.first?.vhostUserChardev == nil && incoming.netdevs.first?.queues == 2)
        let bad: [([String], String)] = [
            (["-chardev", "socket,id=c,path=/p,server=on"], "server=on is not supported"),
            (["-chardev", "file,id=c,path=/p"], "unsupported chardev backend 'file'"),
            (["-chardev", "socket,id=c"], "path"),
            (["-chardev", "socket,id=c,path=/a", "-chardev", "socket,id=c,path=/b"], "duplicate chardev id 'c'"),
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
        let source = try VhostUserNetdev(id: "n0", socketPath: served.path, queues: 1)
        defer { served.finish(source) }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let rings = Rings(ram: ram)
        let sourcePath = try source.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        var handed = try rings.start(sourcePath)
        #expect(try rings.receive(slot: 0, tapPeer: served.tapPeer, kick: handed[0]?.kick))
        rings.queues = sourcePath.stop()
        #expect(rings.queues[0]?.lastAvailable == 1)
        let fds = sourcePath.handedOverFDs()
        #expect(fds.map(\.name) == ["netdev/n0/vhost-user"])

        let target = VhostUserNetdev(id: "n0", incomingQueues: 1)
        let targetPath = try target.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        #expect(targetPath.awaitsIncomingFDs)
        try targetPath.adoptIncoming([try fds[0].fd.duplicate()], vnetHeader: true)
        #expect(!targetPath.awaitsIncomingFDs)
        handed = try rings.start(targetPath)
        #expect(try rings.receive(slot: 1, tapPeer: served.tapPeer, kick: handed[0]?.kick), "the target's rings run in the same backend")
        rings.queues = targetPath.stop()
        #expect(rings.queues[0]?.lastAvailable == 2 && rings.queues[0]?.usedIndex == 2)
        #expect(rings.failures.withLock { $0 } == [])
        target.connection?.socket.close()
    }

    /// The handover failed after the fd went out (the target never ran): the source's
    /// rings start again on its own reference to the connection.
    @Test func sourceResumesOnItsConnectionAfterAFailedHandover() throws {
        let served = try Served(queuePairs: 1)
        let source = try VhostUserNetdev(id: "n0", socketPath: served.path, queues: 1)
        defer { served.finish(source) }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let rings = Rings(ram: ram)
        let datapath = try source.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        _ = try rings.start(datapath)
        rings.queues = datapath.stop()
        do {
            // A target took the fd and died: its copy closes, the connection lives on.
            let target = VhostUserNetdev(id: "n0", incomingQueues: 1)
            try target.adoptIncoming([try datapath.handedOverFDs()[0].fd.duplicate()], vnetHeader: true)
        }
        let handed = try rings.start(datapath)
        #expect(try rings.receive(slot: 0, tapPeer: served.tapPeer, kick: handed[0]?.kick))
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
