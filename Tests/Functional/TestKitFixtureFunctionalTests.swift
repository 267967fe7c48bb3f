import Glibc
import QMPWire
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// TestKit's public fixtures against the bundled VMM: what docs/testkit.md promises a
    /// VMM developer who writes their own tests with them.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct TestKitFixtureFunctionalTests {
        @Test func networkedGuestAnswersPingsOnEveryQueue() async throws {
            try await NetworkedGuest.with(GuestNetwork(queues: 4)) { guest in
                let reply = try await guest.machine.guest.ping(guest.network.hostAddress)
                #expect(reply == GuestPingResult(transmitted: 1, received: 1))
                let pinger = try guest.pinger(interval: .milliseconds(2), count: 300)
                try pinger.start()
                let report = await pinger.finish(timeout: .seconds(20))
                #expect(report.lost == 0, "\(report)")
                let stats = try await guest.machine.guest.stats()
                #expect(stats.queues.count == 4, "\(stats)")
                #expect(stats.received >= 300, "\(stats)")
                #expect(try await guest.namespace.withRoute { try $0.tunInfo("tap0") }.queues == 4)
            }
        }

        @Test(arguments: MigrationMode.allCases)
        func migrationPairMovesTheGuestWithPingsAnswered(mode: MigrationMode) async throws {
            try await MigrationPair.with(mode: mode, network: GuestNetwork(queues: 2)) { pair in
                let ticks = try await pair.source.guest.ticks()
                let round = try await pair.source.guest.scribble(rounds: 3)
                let pinger = try pair.pinger()
                try pinger.start()
                try await pinger.waitForReplies(20, timeout: .seconds(10))
                let result = try await pair.migrate()
                try await pinger.waitForReplies(pinger.report().received + 20, timeout: .seconds(10))
                pinger.stop()
                let report = await pinger.finish(timeout: .seconds(10))
                try report.checkLoss(inside: result.freeze, maximumLost: mode == .local ? 0 : nil)
                if mode == .local { #expect(result.info["ram"]?["normal"]?.intValue == 0, "\(result.info)") }
                #expect(try await pair.target.guest.ticks(after: .milliseconds(100)) > ticks)
                // RAM came along: the scratch area continues from the source's round.
                #expect(try await pair.target.guest.scribble(rounds: 1) == round + 1)
                #expect(try await pair.target.guest.ping(pair.network.hostAddress).received == 1)
            }
        }

        /// `local` on the source only: the target refuses the stream and exits; the waiter's
        /// error says why, from the target's stderr, instead of "connection closed".
        @Test func migrationWaiterNamesTheTargetsReason() async throws {
            try await MigrationPair.with(mode: .local, configureGuest: false) { pair in
                try await pair.target.qmp.execute("migrate-set-parameters", arguments: ["local": false])
                try await pair.target.qmp.execute("migrate-incoming", arguments: ["uri": .string(pair.uri)])
                try await pair.source.qmp.execute("migrate", arguments: ["uri": .string(pair.uri)])
                let error = await #expect(throws: MigrationWaitError.self) {
                    try await MigrationWaiter.waitForFinish(source: pair.source, target: pair.target, timeout: .seconds(30))
                }
                let text = error.map { "\($0)" } ?? ""
                #expect(text.contains("property 'local' is on on the source but off on the target"), "\(text)")
                #expect(error?.outcome.sourceStatus == "failed", "\(text)")
            }
        }

        /// Without the `events` capability no MIGRATION event comes: the QMP-client waiter
        /// says so, and the machine waiter polls and succeeds.
        @Test func waitersWithoutTheEventsCapability() async throws {
            try await MigrationPair.with(mode: .normal, configureGuest: false) { pair in
                for machine in [pair.source, pair.target] {
                    try await machine.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [["capability": "events", "state": false]]])
                }
                try await pair.target.qmp.execute("migrate-incoming", arguments: ["uri": .string(pair.uri)])
                try await pair.source.qmp.execute("migrate", arguments: ["uri": .string(pair.uri)])
                let outcome = try await MigrationWaiter.waitForFinish(source: pair.source, target: pair.target, timeout: .seconds(30))
                #expect(outcome.sourceStatus == "completed" && outcome.targetStatus == "completed", "\(outcome)")
                let error = await #expect(throws: MigrationWaitError.self) {
                    try await MigrationWaiter.waitForFinish(source: pair.source.qmp, target: pair.target.qmp, timeout: .seconds(1))
                }
                #expect("\(error.map { "\($0)" } ?? "")".contains("enable the events capability"))
            }
        }

        /// A TAP queue the test opened reaches the VMM as fd 3 (`-netdev tap,fd=3`), as
        /// QEMU's `add_fd` allows; the test still holds its own fd afterwards.
        @Test func inheritedTapFDCarriesTheGuestsTraffic() async throws {
            let network = GuestNetwork()
            try await NetworkNamespace.with { ns in
                try await network.createTap(in: ns)
                let queues = try await ns.run { try TapDevice.openQueues(name: network.tap, count: 1, multiQueue: true) }
                defer { queues.close() }
                var options = MachineOptions.bundledGuest(arguments: [
                    "-netdev", "tap,id=n0,fd=\(MachineOptions.inheritedNumber(of: 0))",
                    "-device", "virtio-net-pci,netdev=n0,id=nic0,mac=\(network.guestMAC)",
                ])
                options.namespace = ns
                options.inheritedFDs = queues.descriptors
                try await Machine.with(options) { vm in
                    try await vm.console.waitForPrompt(timeout: .seconds(20))
                    try await vm.guest.configureNetwork(address: network.guestCIDR)
                    #expect(try await vm.guest.ping(network.hostAddress).received == 1)
                }
                #expect(fcntl(queues.descriptors[0], F_GETFD) >= 0)
            }
        }

        @Test func launchingOutsideTheNamespaceScopeIsRefused() async throws {
            try await NetworkNamespace.with { ns in
                // Refused inside the scope, so the artifact directory sees no failure and goes.
                _ = try await withArtifacts { artifacts in
                    await #expect {
                        _ = try await Machine.launch(.bundledGuest(), in: artifacts)
                    } throws: { "\($0)".contains("launched outside \(ns)") }
                }
                var options = MachineOptions.bundledGuest()
                options.outsideNamespaceScope = true
                try await Machine.with(options) { vm in
                    try await vm.console.waitForPrompt(timeout: .seconds(20))
                    let ticks = try await vm.guest.ticks()
                    #expect(ticks < UInt64.max)
                }
            }
        }
    }
}
