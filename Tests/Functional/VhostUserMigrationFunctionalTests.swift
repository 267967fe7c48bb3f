import Foundation
import Glibc
import QMPWire
import Synchronization
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// Migration of a guest whose NIC runs on the bundled vhost-user backend: normal (the
    /// backend's writes during pre-copy reach the target through vhost's dirty log) and
    /// local (the backend connection itself travels in the stream: same backend process,
    /// no reconnect), and a local migration that fails after the handover.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct VhostUserMigrationFunctionalTests {
        /// `-chardev` + `-netdev vhost-user` on `backend`'s socket, and the NIC.
        static func nicArguments(_ network: GuestNetwork, socket: String) -> [String] {
            ["-chardev", "socket,id=c0,path=\(socket)", "-netdev", "vhost-user,id=\(network.netdevID),chardev=c0,queues=\(network.queues)"]
                + network.deviceArguments
        }

        static func launch(_ name: String, _ arguments: [String], memory: String = "64M", namespace: NetworkNamespace,
                           in artifacts: ArtifactDirectory) async throws -> Machine {
            var options = MachineOptions.bundledGuest(memory: memory, arguments: arguments, name: name)
            options.namespace = namespace
            return try await Machine.launch(options, in: artifacts)
        }

        static func logDirectory(_ artifacts: ArtifactDirectory, _ name: String) throws -> String {
            let path = (artifacts.path as NSString).appendingPathComponent(name)
            try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
            return path
        }

        /// Normal migration, target on its own backend and TAP. During pre-copy only the
        /// source's backend writes the NIC's pages: the guest is busy in `scribble` (which
        /// never looks at its rings) while frames are sent into the source's TAP, after
        /// pre-copy's first pass went past the rings. The guest finishes `scribble` on the
        /// target and only then takes the frames: it counts every one, so the used ring and
        /// the buffers the backend filled came along (before the dirty log, none did).
        @Test func framesTheBackendWroteDuringPrecopyReachTheTarget() async throws {
            let network = GuestNetwork(queues: 1)
            let frames = 30
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await network.createTap(in: namespace, name: "tap1", address: false)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: 1, in: namespace,
                                                           logDirectory: try Self.logDirectory(artifacts, "backend-source")) { sourceBackend in
                    try await VhostUserBackendProcess.with(tap: "tap1", queues: 1, in: namespace,
                                                           logDirectory: try Self.logDirectory(artifacts, "backend-target")) { targetBackend in
                        let source = try await Self.launch("source", Self.nicArguments(network, socket: sourceBackend.socketPath),
                                                           namespace: namespace, in: artifacts)
                        let target = try await Self.launch("target", Self.nicArguments(network, socket: targetBackend.socketPath) + ["-incoming", "defer"],
                                                           namespace: namespace, in: artifacts)
                        for machine in [source, target] { try await MigrationPair.prepare(machine, for: .normal) }
                        try await source.console.waitForPrompt(timeout: .seconds(20))
                        try await source.guest.configureNetwork(address: network.guestCIDR)
                        #expect(try await source.guest.ping(network.hostAddress, count: 1, waitSeconds: 2).received == 1)
                        // Rounds make the scribble area non-zero, so the first pass copies it, and
                        // time how long one takes: the long run below must outlast pre-copy (a few
                        // seconds at the bandwidth below) wherever it runs (~1.4 ms a round under
                        // this host's PVM, far less on bare KVM).
                        let calibration = ContinuousClock.now
                        try await source.guest.scribble(rounds: 500)
                        let perRound = (ContinuousClock.now - calibration) / 500
                        let rounds = max(2000, Int(Duration.seconds(30) / perRound))
                        let before = try await source.guest.stats()
                        // A slow first pass (the guest's ~300 pages take seconds), and one pass only:
                        // whatever is dirty then fits the downtime limit.
                        try await source.qmp.execute("migrate-set-parameters", arguments: ["max-bandwidth": 262_144, "downtime-limit": 60000])
                        // About 30 s: it runs through the migration and ends on the target.
                        let consoleBefore = try source.console.transcript.count
                        try source.console.send("scribble \(rounds)\r")
                        try await source.console.waitFor("scribble \(rounds)")
                        let uri = "unix:" + (try artifacts.socketPath("migration.sock"))
                        try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                        try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                        // The rings and RX buffers lie in the guest image's .bss (its ~40 touched pages
                        // below 2 MiB go first); the pass goes up by address to the scribble area at
                        // 16 MiB (256 pages), and is inside it past 400 kB.
                        var progress = JSON.null
                        for _ in 0..<400 {
                            progress = try await source.qmp.execute("query-migrate")
                            if (progress["ram"]?["transferred"]?.intValue ?? 0) > 400_000 || !["setup", "active"].contains(progress["status"]) { break }
                            try await Task.sleep(for: .milliseconds(25))
                        }
                        #expect(progress["status"] == "active", "pre-copy ended before the frames were sent: \(progress.serialized)")
                        let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(5), count: frames)
                        try pinger.start()
                        _ = await pinger.finish(timeout: .seconds(1))
                        let during = try await source.qmp.execute("query-migrate")
                        #expect(during["status"] == "active", "pre-copy ended before every frame was sent: \(during.serialized)")
                        try await MigrationWaiter.waitForFinish(source: source, target: target, timeout: .seconds(120))
                        let sourceConsole = try source.console.transcript.dropFirst(consoleBefore)
                        #expect(!sourceConsole.contains("scribble ok"), "the guest took the frames on the source already: \(sourceConsole)")
                        try await namespace.moveHostAddress(network.hostCIDR, mac: network.hostMAC, from: network.tap, to: "tap1")
                        try await target.qmp.execute("cont")
                        try await target.console.waitFor(.regex(#"scribble ok, round \d+\r?\n"#), timeout: .seconds(120))
                        try await target.console.waitForPrompt()
                        let after = try await target.guest.stats()
                        #expect(after.received >= before.received + UInt64(frames),
                                "before \(before), after \(after); source backend: \(sourceBackend.log)")
                        #expect(after.bad == 0, "\(after)")
                        let info = try await source.qmp.execute("query-migrate")
                        #expect((info["ram"]?["normal"]?.intValue ?? 0) > 0, "RAM was copied: \(info.serialized)")
                        #expect(try await target.guest.ping(network.hostAddress, count: 1, waitSeconds: 2).received == 1)
                    }
                    }
                }
            }
        }

        /// QEMU 7.2 as the front-end migrates a guest whose NIC runs on the bundled backend
        /// (source and target each on their own backend and TAP): QEMU sends SET_LOG_BASE
        /// with its log memfd and LOG_ALL at pre-copy start and aborts if a backend refuses
        /// them; the migration completes and the target answers pings through its backend.
        @Test(.requiresBinary("qemu-system-x86_64"))
        func qemuMigratesAGuestOnTheBundledBackend() async throws {
            let network = GuestNetwork(queues: 2)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await network.createTap(in: namespace, name: "tap1", address: false)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: 2, in: namespace,
                                                           logDirectory: try Self.logDirectory(artifacts, "backend-source")) { sourceBackend in
                    try await VhostUserBackendProcess.with(tap: "tap1", queues: 2, in: namespace,
                                                           logDirectory: try Self.logDirectory(artifacts, "backend-target")) { targetBackend in
                        func qemu(_ name: String, socket: String, incoming: Bool) async throws -> Machine {
                            var options = MachineOptions.bundledGuest(memory: "256M", name: name)
                            options.binary = try VMMBinary.named("qemu-system-x86_64")
                            options.namespace = namespace
                            options.arguments = [
                                "-machine", "q35", "-accel", "kvm", "-nodefaults", "-display", "none",
                                "-object", "memory-backend-memfd,id=m,size=256M,share=on", "-machine", "memory-backend=m",
                                "-chardev", "socket,id=c,path=\(socket)",
                                "-netdev", "vhost-user,id=\(network.netdevID),chardev=c,queues=\(network.queues)",
                            ] + network.deviceArguments + (incoming ? ["-S", "-incoming", "defer"] : [])
                            return try await Machine.launch(options, in: artifacts)
                        }
                        let source = try await qemu("qemu-source", socket: sourceBackend.socketPath, incoming: false)
                        let target = try await qemu("qemu-target", socket: targetBackend.socketPath, incoming: true)
                        for machine in [source, target] { try await MigrationWaiter.enableEvents(on: machine) }
                        try await source.console.waitForPrompt(timeout: .seconds(30))
                        try await source.guest.configureNetwork(address: network.guestCIDR)
                        #expect(try await source.guest.ping(network.hostAddress, count: 1, waitSeconds: 2).received == 1)
                        let uri = "unix:" + (try artifacts.socketPath("migration.sock"))
                        try await MigrationPair.migrate(from: source, to: target, uri: uri, timeout: .seconds(60))
                        try await namespace.moveHostAddress(network.hostCIDR, mac: network.hostMAC, from: network.tap, to: "tap1")
                        try await target.qmp.execute("cont")
                        let fromGuest = try await target.guest.ping(network.hostAddress, count: 3, waitSeconds: 2)
                        #expect(fromGuest.received == 3, "\(fromGuest)\ntarget backend: \(targetBackend.log)")
                        #expect(!sourceBackend.log.contains("closing the connection"), "\(sourceBackend.log)")
                        _ = await source.shutdown()
                    }
                    }
                }
            }
        }

        /// `-netdev vhost-user,...,incoming-fds=on`: a local migration target's netdev.
        static func incomingNICArguments(_ network: GuestNetwork) -> [String] {
            ["-netdev", "vhost-user,id=\(network.netdevID),queues=\(network.queues),incoming-fds=on"] + network.deviceArguments
        }

        /// Local migration: the backend connection travels in the stream (named fd
        /// `netdev/n0/vhost-user`) with the RAM memfd. The same backend process serves
        /// the target on the same connection, with no reconnect, and with two queue pairs
        /// under a pinger no ping is lost. The target's netdev comes from the command line
        /// or from `netdev_add` (then the NIC from `device_add`).
        @Test(arguments: [false, true])
        func localMigrationHandsTheBackendConnectionOver(targetNICOverQMP: Bool) async throws {
            let network = GuestNetwork(queues: 2)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: network.queues, in: namespace,
                                                           logDirectory: artifacts.path) { backend in
                        let pid = backend.pid
                        let source = try await Self.launch("source", Self.nicArguments(network, socket: backend.socketPath),
                                                           namespace: namespace, in: artifacts)
                        let target = try await Self.launch("target", (targetNICOverQMP ? [] : Self.incomingNICArguments(network)) + ["-incoming", "defer"],
                                                           namespace: namespace, in: artifacts)
                        if targetNICOverQMP {
                            try await target.qmp.execute("netdev_add", arguments: [
                                "type": "vhost-user", "id": .string(network.netdevID), "queues": .int(Int64(network.queues)), "incoming-fds": true,
                            ])
                            try await target.qmp.execute("device_add", arguments: [
                                "driver": "virtio-net-pci", "id": .string(network.deviceID), "netdev": .string(network.netdevID),
                                "mac": .string(network.guestMAC), "mq": "on",
                            ])
                        }
                        for machine in [source, target] { try await MigrationPair.prepare(machine, for: .local) }
                        try await source.console.waitForPrompt(timeout: .seconds(20))
                        try await source.guest.configureNetwork(address: network.guestCIDR)
                        #expect(try await source.guest.ping(network.hostAddress, count: 1, waitSeconds: 2).received == 1)
                        let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(2))
                        try pinger.start()
                        try await pinger.waitForReplies(50, timeout: .seconds(10))

                        var freeze = FreezeWindow.begin()
                        let uri = "unix:" + (try artifacts.socketPath("migration.sock"))
                        try await MigrationPair.migrate(from: source, to: target, uri: uri)
                        try await target.qmp.execute("cont")
                        freeze.close()
                        let info = try await source.qmp.execute("query-migrate")
                        _ = await source.shutdown()

                        #expect(try await target.guest.ping(network.hostAddress, count: 1, waitSeconds: 2).received == 1)
                        try await Task.sleep(for: .milliseconds(300))
                        pinger.stop()
                        let report = await pinger.finish(timeout: .seconds(10))
                        try report.checkLoss(inside: freeze, maximumLost: 0)
                        #expect(report.received > 100, "\(report)")
                        #expect(info["ram"]?["normal"]?.intValue == 0, "no RAM copied: \(info.serialized)")
                        // One backend process, one connection: no reconnect, no restart.
                        #expect(backend.isRunning && backend.pid == pid)
                        let log = backend.log
                        #expect(log.components(separatedBy: "front-end connected").count == 2, "\(log)")
                        #expect(!log.contains("front-end gone") && !log.contains("closing the connection"), "\(log)")
                        let nic = try await NetworkDeviceFunctionalTests.nicInfo(target.qmp)
                        #expect(nic["x-virtio-net"]?["datapath"] == "vhost-user", "\(nic.serialized)")
                        #expect(nic["x-virtio-net"]?["queue-pairs"]?.intValue == 2, "\(nic.serialized)")
                    }
                }
            }
        }

        /// A local migration that fails after the handover (the target took the stream,
        /// the connection's fd with it, and died before acknowledging): the source takes
        /// its connection back and resumes, and the guest answers pings through the same
        /// backend, which never saw another front-end.
        @Test func sourceResumesOnTheConnectionWhenTheTargetDiesAfterTheHandover() async throws {
            let network = GuestNetwork(queues: 2)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: network.queues, in: namespace,
                                                           logDirectory: artifacts.path) { backend in
                        let pid = backend.pid
                        let source = try await Self.launch("source", Self.nicArguments(network, socket: backend.socketPath),
                                                           namespace: namespace, in: artifacts)
                        try await MigrationPair.prepare(source, for: .local)
                        try await source.console.waitForPrompt(timeout: .seconds(20))
                        try await source.guest.configureNetwork(address: network.guestCIDR)
                        let path = try artifacts.socketPath("migration.sock")
                        let target = try DyingTarget(path: path)
                        try await source.qmp.execute("migrate", arguments: ["uri": .string("unix:\(path)")])
                        _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(30))
                        target.peer.join()
                        #expect(target.fdNames.contains("netdev/n0/vhost-user"), "the stream carried the connection")
                        #expect(try await source.qmp.execute("query-status")["status"] == "running")
                        let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(20), count: 50)
                        try pinger.start()
                        let report = await pinger.finish(timeout: .seconds(30))
                        #expect(report.received == 50, "\(report)\nbackend: \(backend.log)")
                        #expect(try await source.guest.ping(network.hostAddress, count: 1, waitSeconds: 2).received == 1)
                        #expect(backend.isRunning && backend.pid == pid)
                        let log = backend.log
                        #expect(log.components(separatedBy: "front-end connected").count == 2, "\(log)")
                        #expect(!log.contains("closing the connection"), "\(log)")
                    }
                }
            }
        }
    }
}

/// A local migration target that dies after the handover: it reads the source's stream
/// (answering the switch-over, so the source stops and sends its devices with their fds),
/// notes the fd names the sections carry, and closes at the end without acknowledging.
/// Reading with read() drops the fds, as a killed target's exit closes them.
final class DyingTarget: @unchecked Sendable {
    final class Names: Sendable { let list = Mutex<[String]>([]) }
    let peer: OneConnectionPeer
    private let names = Names()
    var fdNames: [String] { names.list.withLock { $0 } }

    init(path: String) throws {
        let names = self.names
        peer = try OneConnectionPeer(path: path) { fd in
            func read(_ count: Int) -> [UInt8]? {
                var bytes = [UInt8](repeating: 0, count: count)
                var done = 0
                while done < count {
                    let n = bytes.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress! + done, count - done) }
                    guard n > 0 else { return nil }
                    done += n
                }
                return bytes
            }
            func u32(_ b: ArraySlice<UInt8>) -> Int { b.prefix(4).enumerated().reduce(0) { $0 | Int($1.element) << (8 * $1.offset) } }
            guard read(12) != nil else { return }  // "SVMMIGR\0" version
            while let length = read(4), let frame = read(u32(length[...])) {
                // frame := kind:u8 name:string fd-names:(count:u16 string*) ...
                var at = 1
                at += 4 + u32(frame[at...])
                let count = Int(frame[at]) | Int(frame[at + 1]) << 8
                at += 2
                for _ in 0..<count {
                    let n = u32(frame[at...])
                    names.list.withLock { $0.append(String(decoding: frame[(at + 4)..<(at + 4 + n)], as: UTF8.self)) }
                    at += 4 + n
                }
                switch frame[0] {
                case 6: _ = write(fd, [UInt8(0x05)], 1)  // ready to switch over
                case 0xFF: return  // the end: die instead of acknowledging
                default: continue
                }
            }
        }
    }
}
