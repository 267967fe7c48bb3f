import Foundation
import Glibc
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
}
