import Foundation
import QMPWire
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// Live pre-copy under a guest that keeps writing, and a guest moved ten times in a row.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct MigrationRoundTripFunctionalTests {
        typealias Pair = MigrationFunctionalTests

        /// The guest rewrites 1 MiB of RAM round after round, checking every page still holds
        /// the previous round: a page dirtied during pre-copy and not sent again shows up on
        /// the target as a page one round behind. A 1 ms downtime limit forces several passes.
        @Test func precopySendsAgainWhatTheGuestWritesMeanwhile() async throws {
            try await Pair.withMigrationPair(
                taps: [("tap0", 1), ("tap1", 1)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap0"),
                target: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap1"),
                configureGuest: false
            ) { _, source, target, uri in
                try await Pair.enableEvents(source, target)
                try await source.qmp.execute("migrate-set-parameters", arguments: ["downtime-limit": 1])
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                try source.console.send("scribble 2000\n")
                try await source.console.waitFor("scribble 2000", timeout: .seconds(5))
                try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                try await MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .seconds(60))
                let info = try await source.qmp.execute("query-migrate")
                let syncs = info["ram"]?["dirty-sync-count"]?.intValue ?? 0
                #expect(syncs >= 2, "pre-copy made \(syncs) dirty-log passes: \(info.serialized)")
                try await target.qmp.execute("cont")
                try await target.console.waitFor("scribble ok, round 2000", failure: "holds round", timeout: .seconds(60))
            }
        }

        /// Pre-copy while the NIC writes into guest RAM (a pinger runs throughout; a 1 ms
        /// downtime limit forces several passes): the frames both VMMs put into the RX ring
        /// equal the frames the guest took, and any loss lies inside the freeze window. The
        /// bundled guest keeps each ring in a page it also writes itself, so this does not
        /// isolate the VMM-side dirty map (MigrationTransferTests does); disabling that map
        /// still passes here.
        @Test func precopyWithTrafficLosesNoFrameInRAM() async throws {
            try await Pair.withMigrationPair(
                taps: [("tap0", 1), ("tap1", 1)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap0"),
                target: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap1")
            ) { ns, source, target, uri in
                try await Pair.enableEvents(source, target)
                try await source.qmp.execute("migrate-set-parameters", arguments: ["downtime-limit": 1])
                let pinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(2))
                try pinger.start()
                try await pinger.waitForReplies(20, timeout: .seconds(10))
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                var freeze = FreezeWindow.begin()
                try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                try await MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .seconds(30))
                let mac = try #require(try await ns.withRoute { try $0.link("tap0") }.mac)
                try await ns.moveHostAddress("192.168.100.1/24", mac: mac, from: "tap0", to: "tap1")
                try await target.qmp.execute("cont")
                freeze.close()
                try await pinger.waitForReplies(pinger.report().received + 50, timeout: .seconds(10))
                pinger.stop()
                let report = await pinger.finish(timeout: .seconds(10))
                try report.checkLoss(inside: freeze)
                let info = try await source.qmp.execute("query-migrate")
                #expect((info["ram"]?["dirty-sync-count"]?.intValue ?? 0) >= 2, "\(info.serialized)")
                let delivered = try await Self.framesDelivered(source) + Self.framesDelivered(target)
                let stats = try await target.console.run("stats", expect: " send drops")
                #expect(stats.contains("total: rx \(delivered) packets"), "VMMs delivered \(delivered) frames; guest: \(stats)")
            }
        }

        /// Frames a VMM put into its NIC's RX queues (query-pci's per-queue counters).
        static func framesDelivered(_ vm: Machine) async throws -> Int64 {
            let nic = try await NetworkDeviceFunctionalTests.nicInfo(vm.qmp)
            return (nic["x-virtio-net"]?["rx-packets"]?.arrayValue ?? []).compactMap(\.intValue).reduce(0, +)
        }

        /// Local migration, RAM in a shared memfd that travels as an fd, TAP queues handed
        /// over: ten hops to fresh processes with a pinger running throughout. Nothing may be
        /// lost, and every hop must leave the same fds and TAP queues behind.
        @Test func tenLocalHopsLoseNothingAndLeakNothing() async throws {
            let queues = 2
            let memory = ["-object", "memory-backend-memfd,id=ram0,size=64M,share=on", "-machine", "memory-backend=ram0"]
            try await Pair.withMigrationPair(
                taps: [("tap0", queues)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: queues, ifname: "tap0") + memory,
                target: Pair.incomingTapArguments(queues) + memory
            ) { ns, first, firstTarget, uri in
                func prepare(_ vm: Machine) async throws {
                    try await vm.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [
                        ["capability": "events", "state": true], ["capability": "x-ignore-shared", "state": true],
                    ]])
                    try await vm.qmp.execute("migrate-set-parameters", arguments: ["local": true])
                }
                try await prepare(first)
                let fdsWhenRunning = openFileDescriptors(first.pid)
                let ticksBefore = try await first.guest.ticks()
                let pinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(2))
                try pinger.start()
                try await pinger.waitForReplies(20, timeout: .seconds(10))

                var current = first
                var next: Machine? = firstTarget
                var downtimes: [Int64] = []
                try await withArtifacts { artifacts in
                    for hop in 1...10 {
                        let target: Machine
                        if let next {
                            target = next
                        } else {
                            var options = MachineOptions.bundledGuest(arguments: Pair.incomingTapArguments(queues) + memory + ["-incoming", "defer"])
                            options.name = "hop\(hop)"
                            options.namespace = ns
                            target = try await Machine.launch(options, in: artifacts)
                        }
                        next = nil
                        try await prepare(target)
                        try await MigrationPair.migrate(from: current, to: target, uri: uri, timeout: .seconds(30))
                        try await target.qmp.execute("cont")
                        let info = try await current.qmp.execute("query-migrate")
                        downtimes.append(info["x-downtime-us"]?.intValue ?? -1)
                        #expect(info["ram"]?["normal"]?.intValue == 0, "hop \(hop) copied RAM: \(info.serialized)")
                        #expect(await current.shutdown() == .exited(0))
                        current = target
                        #expect(openFileDescriptors(current.pid) == fdsWhenRunning,
                                "hop \(hop): \(describeFileDescriptors(current.pid))")
                        #expect(try await ns.withRoute { try $0.tunInfo("tap0") }.queues == queues)
                    }
                    pinger.stop()
                    let report = await pinger.finish(timeout: .seconds(10))
                    if report.lost > 0 {
                        // Where did they go: the guest's own frame counters tell RX from TX trouble.
                        let stats = try await current.console.run("stats")
                        Issue.record("lost \(report.lost) over ten hops (downtimes \(downtimes) us); guest stats: \(stats)\n\(report)")
                    }
                    #expect(try await current.guest.ticks(after: .milliseconds(100)) > ticksBefore)
                    try await current.console.run("ip addr", expect: "inet 192.168.100.2/24")
                    _ = await current.shutdown()
                }
                print("ten local hops: downtimes (us) \(downtimes)")
            }
        }
    }
}
