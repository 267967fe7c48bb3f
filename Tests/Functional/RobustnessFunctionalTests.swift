import Foundation
import QMPWire
import TestKit
import Testing

/// The reliability issue's load and fault figures (docs/reliability.md): many clients,
/// huge input, repeated boots and migrations that leave nothing behind, and signals that
/// end a VMM cleanly whatever it is doing.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct RobustnessFunctionalTests {
    /// A VMM with a second QMP server socket at `PATH/q.sock` beside TestKit's connection.
    static func withServerSocket(_ body: (Machine, String) async throws -> Void) async throws {
        let directory = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/q.sock"
        try await Machine.with(.bundledGuest(arguments: ["-qmp", "unix:\(path),server=on,wait=off"])) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            try await body(vm, path)
        }
    }

    @Test func fiftyClientsAtOnceAreAllAnswered() async throws {
        try await Self.withServerSocket { vm, path in
            let clients = try await withThrowingTaskGroup(of: QMPClient.self) { group in
                for _ in 0..<50 { group.addTask { try await QMPClient.connect(path: path, timeout: .seconds(20)) } }
                return try await group.reduce(into: [QMPClient]()) { $0.append($1) }
            }
            defer { clients.forEach { $0.close() } }
            let states = try await withThrowingTaskGroup(of: JSON?.self) { group in
                for client in clients { group.addTask { try await client.execute("query-status", timeout: .seconds(20))["status"] } }
                return try await group.reduce(into: [JSON?]()) { $0.append($1) }
            }
            #expect(states.count == 50 && states.allSatisfy { $0 == "running" }, "\(states)")
            #expect(try await vm.qmp.execute("query-status")["status"] == "running")
        }
    }

    /// A 10 MB message is refused with an error, not buffered without bound or answered
    /// with a crash; the same client and the others are served afterwards.
    @Test func tenMegabyteMessageIsRefusedAndTheVMMServesOn() async throws {
        try await Self.withServerSocket { vm, path in
            let client = try await QMPClient.connect(path: path)
            defer { client.close() }
            let huge = #"{"execute": "query-status", "arguments": {"x": ""# + String(repeating: "a", count: 10 << 20) + #""}}"#
            try client.sendRaw(huge)
            let reply = try await client.readRawReply(timeout: .seconds(30))
            #expect(reply["error"]?["desc"]?.stringValue?.contains("longer than") == true, "\(reply)")
            #expect(try await client.execute("query-status")["status"] == "running")
            try await vm.console.run("echo still here", expect: "still here")
        }
    }

    @Test(arguments: [SIGTERM, SIGINT, SIGHUP])
    func signalEndsARunningVMMAndRemovesItsSockets(signal: Int32) async throws {
        try await Self.withServerSocket { vm, path in
            #expect(vm.kill(signal))
            #expect(try await vm.wait(timeout: .seconds(10)) == .exited(0))
            let shutdown = try await vm.qmp.waitForEvent("SHUTDOWN", timeout: .seconds(5))
            #expect(shutdown.data["reason"] == "host-signal", "\(shutdown.data)")
            #expect(access(path, F_OK) != 0, "\(path) left behind")
        }
    }
}

extension SerializedNetworkSuites {
    /// Signals in mid-migration, and many boots and hops that must leave nothing behind.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct MigrationRobustnessFunctionalTests {
        /// A normal migration slowed to 500 kB/s after the guest dirtied 1 MiB, so a signal
        /// lands while it runs. The signalled side exits 0 and removes its listening
        /// socket; the other side notices: a source goes back to running, a target fails.
        @Test(arguments: ["source", "target"])
        func signalInMidMigrationEndsThatSideCleanly(side: String) async throws {
            try await MigrationPair.with(mode: .normal, configureGuest: false) { pair in
                try await pair.source.guest.scribble(rounds: 1)
                try await pair.source.qmp.execute("migrate-set-parameters", arguments: ["max-bandwidth": 500_000])
                try await pair.target.qmp.execute("migrate-incoming", arguments: ["uri": .string(pair.uri)])
                try await pair.source.qmp.execute("migrate", arguments: ["uri": .string(pair.uri)])
                _ = try await pair.source.qmp.waitForEvent("MIGRATION", matching: ["status": "active"], timeout: .seconds(10))
                let (signalled, other) = side == "source" ? (pair.source, pair.target) : (pair.target, pair.source)
                #expect(signalled.kill(SIGTERM))
                #expect(try await signalled.wait(timeout: .seconds(10)) == .exited(0), "\(signalled.stderrTail())")
                if side == "target" {
                    _ = try await other.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(30))
                    #expect(try await other.qmp.execute("query-status")["status"] == "running")
                    try await other.console.run("echo alive", expect: "alive")
                } else {
                    // The stream broke off: the target fails and, with QEMU's default
                    // exit-on-error, exits 1 saying why.
                    #expect(try await other.wait(timeout: .seconds(30)) == .exited(1))
                    #expect(!other.stderrTail().isEmpty)
                }
                // The target's -incoming listener (migration.sock) is gone with either side's end.
                let socket = String(pair.uri.dropFirst("unix:".count))
                #expect(access(socket, F_OK) != 0 || side == "source", "\(socket) left behind")
            }
        }

        /// Twenty local hops: every VMM holds the same fds and threads as the first, its
        /// resident memory stays within 8 MiB of the first's, and no /dev/shm file or
        /// namespace is left.
        @Test func twentyLocalMigrationsLeakNothing() async throws {
            let shmBefore = Set((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? [])
            try await MigrationPair.with(mode: .local) { pair in
                try await pair.migrate()
                let first = try #require(ProcessSnapshot(pid: pair.target.pid))
                var current = pair.target
                _ = await pair.source.shutdown()
                try await withArtifacts { artifacts in
                    for hop in 2...20 {
                        var options = MachineOptions.bundledGuest(arguments: pair.network.incomingArguments + ["-incoming", "defer"], name: "hop\(hop)")
                        options.namespace = pair.namespace
                        let next = try await Machine.launch(options, in: artifacts)
                        try await MigrationPair.prepare(next, for: .local)
                        try await MigrationPair.migrate(from: current, to: next, uri: pair.uri)
                        try await next.qmp.execute("cont")
                        #expect(await current.shutdown() == .exited(0))
                        current = next
                        let now = try #require(ProcessSnapshot(pid: current.pid))
                        #expect(now.fileDescriptors == first.fileDescriptors,
                                "hop \(hop): \(now) vs \(first): \(ProcessSnapshot.describeFileDescriptors(of: current.pid))")
                        #expect(now.threads == first.threads, "hop \(hop): \(now) vs \(first)")
                        #expect(now.residentBytes <= first.residentBytes + 8 << 20, "hop \(hop): \(now) vs \(first)")
                    }
                    let ping = try await current.guest.ping(pair.network.hostAddress)
                    #expect(ping.received > 0, "the guest after the last hop: \(ping)")
                    _ = await current.shutdown()
                }
            }
            let shmAfter = Set((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm")) ?? [])
            #expect(shmAfter.subtracting(shmBefore).isEmpty, "left in /dev/shm: \(shmAfter.subtracting(shmBefore))")
        }
    }
}

/// Boot/quit cycles against this test process: TestKit must give back the fds and
/// threads it took for each machine, and the host keeps no /dev/shm file.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .countsProcessResources)
struct BootCycleLeakFunctionalTests {
    @Test func twentyBootQuitCyclesLeakNothing() async throws {
        func cycle() async throws {
            try await Machine.with(.bundledGuest()) { vm in
                try await vm.console.waitForPrompt(timeout: .seconds(20))
                try await vm.console.run("echo up", expect: "up")
                try await vm.qmp.execute("quit")
                #expect(try await vm.wait(timeout: .seconds(10)) == .exited(0))
            }
        }
        try await cycle()  // first-use allocations (thread pools, caches) are not leaks
        let before = try #require(ProcessSnapshot.current())
        let shmBefore = (try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm").count) ?? -1
        for _ in 0..<20 { try await cycle() }
        // Unit tests that hold no lock may open a few fds or threads meanwhile; a leak of
        // one per machine would show as 20 or more.
        let slack = 5
        // TestKit's reader and reaper threads end right after the machine; give them a moment.
        var after = try #require(ProcessSnapshot.current())
        for _ in 0..<50 where after.fileDescriptors > before.fileDescriptors + slack || after.threads > before.threads + slack {
            try await Task.sleep(for: .milliseconds(20))
            after = try #require(ProcessSnapshot.current())
        }
        #expect(after.fileDescriptors <= before.fileDescriptors + slack, "\(before) -> \(after)")
        #expect(after.threads <= before.threads + slack, "\(before) -> \(after)")
        #expect(after.residentBytes <= before.residentBytes + 16 << 20, "\(before) -> \(after)")
        #expect(((try? FileManager.default.contentsOfDirectory(atPath: "/dev/shm").count) ?? -1) == shmBefore)
    }
}
