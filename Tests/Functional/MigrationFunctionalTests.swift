import Foundation
import QMPWire
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// Normal migration (stop-and-copy for now) to a second VMM process with its own TAP,
    /// the first step of the seed's tapNewTapMigration.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct MigrationFunctionalTests {
        /// For the tests that give the two sides different NICs on purpose (mismatches,
        /// failures): the TAPs, a source on `source` arguments and an `-incoming defer`
        /// target on `target` arguments, in one namespace, built from TestKit's pieces. The
        /// source's eth0 is 192.168.100.2/24 when `configureGuest`. Tests whose sides agree
        /// use `MigrationPair.with(mode:)`.
        static func withMigrationPair(
            taps: [(name: String, queues: Int)], source sourceArguments: [String], target targetArguments: [String],
            configureGuest: Bool = true,
            _ body: (NetworkNamespace, Machine, Machine, String) async throws -> Void
        ) async throws {
            let network = GuestNetwork(tap: taps[0].name, queues: taps[0].queues)
            try await NetworkNamespace.with { ns in
                try await network.createTap(in: ns)
                for tap in taps.dropFirst() {
                    var other = network
                    other.queues = tap.queues
                    try await other.createTap(in: ns, name: tap.name, address: false)
                }
                try await withArtifacts { artifacts in
                    var sourceOptions = MachineOptions.bundledGuest(arguments: sourceArguments, name: "source")
                    sourceOptions.namespace = ns
                    var targetOptions = MachineOptions.bundledGuest(arguments: targetArguments + ["-incoming", "defer"], name: "target")
                    targetOptions.namespace = ns
                    let source = try await Machine.launch(sourceOptions, in: artifacts)
                    let target = try await Machine.launch(targetOptions, in: artifacts)
                    try await source.console.waitForPrompt(timeout: .seconds(20))
                    if configureGuest { try await source.guest.configureNetwork(address: network.guestCIDR) }
                    try await body(ns, source, target, "unix:" + (try artifacts.socketPath("migration.sock")))
                }
            }
        }

        /// The `events` capability, without which no MIGRATION event is sent.
        static func enableEvents(_ vms: Machine...) async throws {
            for vm in vms { try await MigrationWaiter.enableEvents(on: vm) }
        }

        /// A migration target's NIC whose TAP queues come with the stream.
        static func incomingTapArguments(_ queues: Int) -> [String] {
            ["-netdev", "tap,id=n0,incoming-fds=on,queues=\(queues),script=no,downscript=no",
             "-device", "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:56,mq=on"]
        }

        @Test func normalMigrationMovesTheGuestToANewProcessAndTap() async throws {
            try await Self.withMigrationPair(
                taps: [("tap0", 2), ("tap1", 2)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 2, ifname: "tap0"),
                target: NetworkDeviceFunctionalTests.nicArguments(queues: 2, ifname: "tap1")
            ) { ns, source, target, uri in
                    try await source.console.run("ping -c 1 -W 2 192.168.100.1", expect: "1 packets received", failure: "0 packets received", timeout: .seconds(20))
                    let ticksBefore = try await source.guest.ticks()

                    #expect(try await target.qmp.execute("query-status")["status"] == "inmigrate")
                    try await Self.enableEvents(source, target)
                    try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                    try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                    for status in ["setup", "active", "device", "completed"] {
                        _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": .string(status)], timeout: .seconds(30))
                    }
                    _ = try await target.qmp.waitForEvent("MIGRATION", matching: ["status": "completed"], timeout: .seconds(30))
                    #expect(try await source.qmp.execute("query-status")["status"] == "postmigrate")
                    #expect(try await target.qmp.execute("query-status")["status"] == "paused")
                    let info = try await source.qmp.execute("query-migrate")
                    #expect(info["status"] == "completed")
                    #expect(info["ram"]?["total"]?.intValue == 64 << 20)
                    #expect(info["downtime"]?.intValue != nil)

                    try await target.qmp.execute("cont")
                    _ = try await target.qmp.waitForEvent("RESUME", timeout: .seconds(5))
                    let ticksAfter = try await target.guest.ticks(after: .milliseconds(100))
                    #expect(ticksAfter > ticksBefore, "guest RAM did not carry over: ticks \(ticksBefore) -> \(ticksAfter)")
                    // Like the seed's switch_network_to_tap2: the host address moves to the target's TAP.
                    try await ns.withRoute { route in
                        try route.removeAddress("192.168.100.1/24", from: "tap0")
                        try route.addAddress("192.168.100.1/24", to: "tap1")
                    }
                    try await target.console.run("ip addr", expect: "inet 192.168.100.2/24")
                    let pinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(2), count: 200)
                    try pinger.start()
                    let report = await pinger.finish(timeout: .seconds(20))
                    #expect(report.lost == 0, "\(report)")
                    // The host's pings made the guest learn tap1's MAC; now the guest reaches the host too.
                    try await target.console.run("ping -c 2 -W 2 192.168.100.1", expect: "2 packets received", failure: "0 packets received", timeout: .seconds(20))
                    await #expect(throws: QMPError.self) { try await source.qmp.execute("cont") }
            }
        }

        /// The reviewers' `8 != 101 ... max_queue_pairs`: a target with fewer queue pairs must
        /// refuse the stream with a message naming the device, the property and both values,
        /// and the source must go back to running with its network working.
        @Test func queuePairMismatchIsRefusedAndTheSourceKeepsRunning() async throws {
            try await Self.withMigrationPair(
                taps: [("tap0", 4), ("tap1", 4)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 4, ifname: "tap0"),
                target: NetworkDeviceFunctionalTests.nicArguments(queues: 2, ifname: "tap1")
            ) { ns, source, target, uri in
                    try await Self.enableEvents(source)
                    try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                    try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                    _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(30))
                    #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
                    let targetLog = target.stderrTail(20).joined(separator: "\n")
                    #expect(targetLog.contains("device 'nic0' (virtio-net-pci): property 'max_queue_pairs' is 4 on the source but 2 on the target"), "\(targetLog)")
                    let info = try await source.qmp.execute("query-migrate")
                    #expect(info["status"] == "failed")
                    #expect(info["error-desc"]?.stringValue != nil)
                    #expect(try await source.qmp.execute("query-status")["status"] == "running")
                    let pinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(2), count: 100)
                    try pinger.start()
                    #expect(await pinger.finish(timeout: .seconds(20)).lost == 0)
                    try await source.console.run("echo still here", expect: "still here")
            }
        }

        /// The seed's tapFdMigration: with migration parameter `local` on both sides and a
        /// target netdev with `incoming-fds=on`, the source hands its TAP queue fds over in
        /// the stream; frames sent during the switch wait in the TAP, so nothing is lost.
        @Test func localMigrationHandsOverTheTapAndLosesNoPacket() async throws {
            try await Self.withMigrationPair(
                taps: [("tap0", 4)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 4, ifname: "tap0"),
                target: Self.incomingTapArguments(4)
            ) { ns, source, target, uri in
                    try await Self.enableEvents(source, target)
                    for vm in [source, target] { try await vm.qmp.execute("migrate-set-parameters", arguments: ["local": true]) }
                    let pinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(2), count: 1000)
                    try pinger.start()
                    try await pinger.waitForReplies(20, timeout: .seconds(10))
                    try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                    try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                    _ = try await target.qmp.waitForEvent("MIGRATION", matching: ["status": "completed"], timeout: .seconds(30))
                    _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "completed"], timeout: .seconds(30))
                    try await target.qmp.execute("cont")
                    let report = await pinger.finish(timeout: .seconds(30))
                    #expect(report.sent == 1000)
                    #expect(report.lost == 0, "\(report)")
                    // The target reads the very TAP queues the source opened.
                    #expect(try await ns.withRoute { try $0.tunInfo("tap0") }.queues == 4)
                    try await target.console.run("echo on the target", expect: "on the target")
            }
        }

        /// tcp: within the test's namespace, the target armed with the `channels` form.
        @Test func normalMigrationOverTCP() async throws {
            try await Self.withMigrationPair(
                taps: [("tap0", 1), ("tap1", 1)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap0"),
                target: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap1"), configureGuest: false
            ) { _, source, target, _ in
                let ticksBefore = try await source.guest.ticks()
                try await Self.enableEvents(source, target)
                try await target.qmp.execute("migrate-incoming", arguments: ["channels": [[
                    "channel-type": "main", "addr": ["transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"],
                ]]])
                try await source.qmp.execute("migrate", arguments: ["uri": "tcp:127.0.0.1:4444"])
                try await MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .seconds(30))
                try await target.qmp.execute("cont")
                #expect(try await target.guest.ticks(after: .milliseconds(100)) > ticksBefore)
            }
        }

        @Test func localOnOneSideOnlyIsRefused() async throws {
            try await Self.withMigrationPair(
                taps: [("tap0", 1)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap0"),
                target: Self.incomingTapArguments(1), configureGuest: false
            ) { _, source, target, uri in
                    try await source.qmp.execute("migrate-set-parameters", arguments: ["local": true])
                    try await Self.enableEvents(source)
                    try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                    try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                    #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
                    let log = target.stderrTail(20).joined(separator: "\n")
                    #expect(log.contains("machine: property 'local' is on on the source but off on the target"), "\(log)")
                    // The source learns of the failure from the closed channel, asynchronously.
                    _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                    #expect(try await source.qmp.execute("query-status")["status"] == "running")
                    try await source.console.run("echo source alive", expect: "source alive")
            }
        }
    }
}
