import Foundation
import Glibc
import QMPWire
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
                        // Round 1 makes the scribble area non-zero, so the first pass copies it.
                        try await source.guest.scribble(rounds: 1)
                        let before = try await source.guest.stats()
                        // A slow first pass (the guest's ~300 pages take seconds), and one pass only:
                        // whatever is dirty then fits the downtime limit.
                        try await source.qmp.execute("migrate-set-parameters", arguments: ["max-bandwidth": 262_144, "downtime-limit": 60000])
                        // About 1.4 ms a round here: it runs through the migration and ends on the target.
                        let consoleBefore = try source.console.transcript.count
                        try source.console.send("scribble 20000\r")
                        try await source.console.waitFor("scribble 20000")
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
    }
}
