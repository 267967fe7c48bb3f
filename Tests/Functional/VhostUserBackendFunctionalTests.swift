import Foundation
import Glibc
import QMPWire
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// The bundled `vhost-user-net` backend and our front-end across connection changes:
    /// a front-end that quits while pings flow and the next one on the same TAP, two
    /// front-ends racing for one socket (one owner of the rings), and a backend killed
    /// under a running VMM (link down, then back with `reconnect=`).
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct VhostUserBackendFunctionalTests {
        static func options(_ network: GuestNetwork, socket: String, reconnect: Int? = nil, name: String,
                            in namespace: NetworkNamespace) -> MachineOptions {
            var options = MachineOptions.bundledGuest(name: name)
            options.namespace = namespace
            options.arguments = [
                "-chardev", "socket,id=c,path=\(socket)" + (reconnect.map { ",reconnect=\($0)" } ?? ""),
                "-netdev", "vhost-user,id=\(network.netdevID),chardev=c,queues=\(network.queues)",
            ] + network.deviceArguments
            return options
        }

        /// query-pci's `link` for the NIC: "up" or "down".
        static func link(_ vm: Machine) async throws -> String? {
            try await NetworkDeviceFunctionalTests.nicInfo(vm.qmp)["x-virtio-net"]?["link"]?.stringValue
        }

        /// Polls query-pci until the NIC's link is `state` (the reconnect timer runs in seconds).
        static func waitForLink(_ vm: Machine, _ state: String, timeout: Duration = .seconds(20)) async throws {
            let deadline = ContinuousClock.now + timeout
            while try await link(vm) != state {
                guard ContinuousClock.now < deadline else {
                    Issue.record("\(vm.name): link not \(state) within \(timeout); stderr:\n\(vm.stderrTail().joined(separator: "\n"))")
                    throw CancellationError()
                }
                try await Task.sleep(for: .milliseconds(50))
            }
        }

        static func chardevFilename(_ vm: Machine) async throws -> String? {
            try await vm.qmp.execute("query-chardev").arrayValue?.first { $0["label"] == "c" }?["filename"]?.stringValue
        }

        /// The refusal's text, or nil when the command succeeded.
        static func refusal(_ vm: Machine, _ command: String, _ arguments: JSONObject) async throws -> String? {
            do {
                _ = try await vm.qmp.execute(command, arguments: arguments)
                return nil
            } catch QMPError.commandFailed(_, let desc, _) {
                return desc
            }
        }

        /// The vhost-user NIC built over QMP as QEMU's scripts do (chardev-add, netdev_add
        /// type vhost-user, device_add, cont) carries pings; the errors name the chardev,
        /// the netdev and the value, and a chardev in use cannot be removed.
        @Test func qmpAddsTheChardevAndTheNetdevAndKeepsABusyChardev() async throws {
            let network = GuestNetwork(queues: 1)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: 1, in: namespace,
                                                           logDirectory: artifacts.path) { backend in
                        var options = MachineOptions.bundledGuest(startPaused: true)
                        options.namespace = namespace
                        let vm = try await Machine.launch(options, in: artifacts)
                        func socket(_ path: String, reconnect: Int? = nil) -> JSONObject {
                            var data: JSONObject = ["addr": ["type": "unix", "data": ["path": .string(path)]], "server": false]
                            if let reconnect { data["reconnect"] = .int(Int64(reconnect)) }
                            return ["type": "socket", "data": .object(data)]
                        }
                        let missing = artifacts.path + "/nobody.sock"
                        #expect(try await Self.refusal(vm, "chardev-add", ["id": "c", "backend": .object(socket(backend.socketPath, reconnect: 1))]) == nil)
                        #expect(try await Self.refusal(vm, "chardev-add", ["id": "c", "backend": .object(socket(missing))])
                                == "Chardev 'c' already exists (unix:\(backend.socketPath))")
                        #expect(try await Self.refusal(vm, "chardev-add", ["id": "gone", "backend": .object(socket(missing))]) == nil)
                        #expect(try await Self.refusal(vm, "netdev_add", ["type": "vhost-user", "id": "n1", "chardev": "nope"])
                                == "netdev n1: chardev 'nope' not found (add it with -chardev socket,id=nope,path=PATH or chardev-add)")
                        let unreachable = try await Self.refusal(vm, "netdev_add", ["type": "vhost-user", "id": "n1", "chardev": "gone"])
                        #expect(unreachable?.hasPrefix("netdev n1: chardev 'gone' (unix:\(missing)): cannot connect to the vhost-user backend: connect \(missing)") == true,
                                "\(unreachable ?? "accepted")")
                        #expect(try await Self.refusal(vm, "netdev_add", ["type": "vhost-user", "id": "n0", "chardev": "c", "queues": 0])
                                == "netdev_add vhost-user,id=n0,chardev=c,queues=0: queues=0 must be 1..128")
                        #expect(try await Self.refusal(vm, "netdev_add", ["type": "vhost-user", "id": "n0", "chardev": "c", "ifname": "tap0"])
                                == "netdev_add vhost-user,id=n0,chardev=c,ifname=tap0: unknown parameter 'ifname'")
                        #expect(try await Self.refusal(vm, "netdev_add", ["type": "vhost-user", "id": "n0", "chardev": "c", "queues": 1]) == nil)
                        #expect(try await Self.refusal(vm, "netdev_add", ["type": "vhost-user", "id": "n2", "chardev": "c"])
                                == "netdev n2: chardev 'c' is already used by netdev 'n0'")
                        #expect(try await Self.refusal(vm, "chardev-remove", ["id": "c"]) == "Chardev 'c' is busy: netdev 'n0' uses it (netdev_del it first)")
                        #expect(try await Self.refusal(vm, "chardev-remove", ["id": "nope"]) == "Chardev 'nope' not found")
                        #expect(try await Self.refusal(vm, "chardev-remove", ["id": "gone"]) == nil)
                        let chardevs = try await vm.qmp.execute("query-chardev")
                        #expect(chardevs == [["label": "c", "filename": .string("unix:\(backend.socketPath)"), "frontend-open": true]], "\(chardevs)")
                        _ = try await vm.qmp.execute("device_add", arguments: [
                            "driver": "virtio-net-pci", "netdev": "n0", "id": .string(network.deviceID), "mac": .string(network.guestMAC),
                        ])
                        _ = try await vm.qmp.execute("cont")
                        try await vm.console.waitForPrompt(timeout: .seconds(30))
                        try await vm.guest.configureNetwork(address: network.guestCIDR)
                        let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(20), count: 20)
                        try pinger.start()
                        let report = await pinger.finish(timeout: .seconds(30))
                        #expect(report.received == 20, "\(report)\nbackend: \(backend.log)")
                        #expect(try await Self.link(vm) == "up")
                    }
                }
            }
        }

        /// Front-end 1 quits while the host pings the guest; front-end 2 boots on the same
        /// backend (and TAP) and the same pinger's replies resume.
        @Test func theNextFrontEndTakesOverWhilePingsFlow() async throws {
            let network = GuestNetwork(queues: 2)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: network.queues, in: namespace,
                                                           logDirectory: artifacts.path) { backend in
                        let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(20))
                        let first = try await Machine.launch(Self.options(network, socket: backend.socketPath, name: "front-end-1", in: namespace),
                                                             in: artifacts)
                        try await first.console.waitForPrompt(timeout: .seconds(30))
                        try await first.guest.configureNetwork(address: network.guestCIDR)
                        try pinger.start()
                        try await pinger.waitForReplies(20, timeout: .seconds(30))
                        #expect(await first.shutdown() == .exited(0))
                        let answeredByFirst = pinger.report().received

                        let second = try await Machine.launch(Self.options(network, socket: backend.socketPath, name: "front-end-2", in: namespace),
                                                              in: artifacts)
                        try await second.console.waitForPrompt(timeout: .seconds(30))
                        try await second.guest.configureNetwork(address: network.guestCIDR)
                        try await pinger.waitForReplies(answeredByFirst + 50, timeout: .seconds(30))
                        pinger.stop()
                        let report = await pinger.finish(timeout: .seconds(10))
                        #expect(report.received >= answeredByFirst + 50, "\(report)\nbackend: \(backend.log)")
                        let fromGuest = try await second.guest.ping(network.hostAddress, count: 3, waitSeconds: 2)
                        #expect(fromGuest.received == 3, "guest -> host: \(fromGuest)\nbackend: \(backend.log)")
                        #expect(try await Self.link(second) == "up")
                        #expect(backend.isRunning)
                        #expect(backend.log.contains("front-end connected (#1)") && backend.log.contains("front-end gone (#1")
                                && backend.log.contains("front-end connected (#2)"), "\(backend.log)")
                        #expect(!backend.log.contains("refusing"), "\(backend.log)")
                    }
                }
            }
        }

        /// Two VMMs start at once on one backend socket: exactly one owns the rings and its
        /// pings work; the other's link is down (its log names the chardev) and it retries
        /// (reconnect=1) until the winner quits, then takes over. A VMM without reconnect=
        /// that meets a busy backend exits 1 naming the chardev.
        @Test func twoFrontEndsRacingForTheSocketGetOneOwner() async throws {
            let network = GuestNetwork(queues: 1)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: 1, in: namespace,
                                                           logDirectory: artifacts.path) { backend in
                        let socket = backend.socketPath
                        async let a = Machine.launch(Self.options(network, socket: socket, reconnect: 1, name: "racer-a", in: namespace), in: artifacts)
                        async let b = Machine.launch(Self.options(network, socket: socket, reconnect: 1, name: "racer-b", in: namespace), in: artifacts)
                        let racers = try await [a, b]
                        for vm in racers { try await vm.console.waitForPrompt(timeout: .seconds(30)) }
                        var links: [String?] = []
                        for vm in racers { links.append(try await Self.link(vm)) }
                        #expect(links.sorted { ($0 ?? "") < ($1 ?? "") } == ["down", "up"], "links: \(links)\nbackend: \(backend.log)")
                        guard let winnerIndex = links.firstIndex(of: "up"), links.filter({ $0 == "up" }).count == 1 else { return }
                        let winner = racers[winnerIndex]
                        let loser = racers[1 - winnerIndex]
                        #expect(backend.log.contains("refusing a front-end: another one owns the rings"), "\(backend.log)")
                        #expect(try await Self.chardevFilename(loser) == "disconnected:unix:\(socket)")
                        #expect(try await Self.chardevFilename(winner) == "unix:\(socket)")
                        let loserLog = loser.stderrTail(50).joined(separator: "\n")
                        #expect(loserLog.contains("netdev n0: chardev 'c' (unix:\(socket)): the vhost-user backend closed the connection before answering GET_FEATURES"),
                                "\(loserLog)")

                        try await winner.guest.configureNetwork(address: network.guestCIDR)
                        let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(20), count: 20)
                        try pinger.start()
                        let report = await pinger.finish(timeout: .seconds(30))
                        #expect(report.received == 20, "winner: \(report)\nbackend: \(backend.log)")

                        // A third front-end, without reconnect=, while the backend is busy.
                        var third = Self.options(network, socket: socket, name: "no-reconnect", in: namespace)
                        third.connectQMP = false
                        third.connectConsole = false
                        let refused = try await Machine.launch(third, in: artifacts)
                        #expect(try await refused.wait(timeout: .seconds(20)) == .exited(1))
                        let refusedLog = refused.stderrTail().joined(separator: "\n")
                        #expect(refusedLog.contains("netdev n0: chardev 'c' (unix:\(socket)): the vhost-user backend closed the connection before answering GET_FEATURES"),
                                "\(refusedLog)")

                        // The winner leaves: the loser's next attempt gets the rings.
                        #expect(await winner.shutdown() == .exited(0))
                        try await Self.waitForLink(loser, "up")
                        #expect(try await Self.chardevFilename(loser) == "unix:\(socket)")
                        try await loser.guest.configureNetwork(address: network.guestCIDR)
                        let after = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(20), count: 20)
                        try after.start()
                        let afterReport = await after.finish(timeout: .seconds(30))
                        #expect(afterReport.received == 20, "loser after the winner quit: \(afterReport)\nbackend: \(backend.log)")
                    }
                }
            }
        }

        /// The backend is killed while the host pings the guest: the VMM runs on, reports
        /// link down (query-pci, query-chardev, its log), and once a new backend listens
        /// on the same socket (reconnect=1) the link is up and the pings are answered again.
        @Test func aKilledBackendTakesTheLinkDownAndANewOneBringsItBack() async throws {
            let network = GuestNetwork(queues: 2)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: network.queues, in: namespace,
                                                           logDirectory: artifacts.path) { first in
                        let socket = first.socketPath
                        let vm = try await Machine.launch(Self.options(network, socket: socket, reconnect: 1, name: "vm", in: namespace),
                                                          in: artifacts)
                        try await vm.console.waitForPrompt(timeout: .seconds(30))
                        try await vm.guest.configureNetwork(address: network.guestCIDR)
                        #expect(try await Self.link(vm) == "up")
                        let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(20))
                        try pinger.start()
                        try await pinger.waitForReplies(20, timeout: .seconds(30))

                        try await first.kill()
                        try await Self.waitForLink(vm, "down")
                        #expect(try await vm.qmp.execute("query-status")["status"] == "running")
                        #expect(try await Self.chardevFilename(vm) == "disconnected:unix:\(socket)")
                        // The guest sees the carrier go (config status without LINK_UP).
                        let down = try await vm.console.run("ip addr show dev eth0")
                        #expect(down.contains("<BROADCAST,MULTICAST,UP>"), "\(down)")
                        let log = vm.stderrTail(50).joined(separator: "\n")
                        #expect(log.contains("netdev n0: chardev 'c' (unix:\(socket)): the vhost-user backend closed the connection; link down (4 rings stopped at the used index in guest RAM); reconnecting every 1 s (reconnect=1)"),
                                "\(log)")
                        let answeredBefore = pinger.report().received

                        try await VhostUserBackendProcess.with(tap: network.tap, queues: network.queues, in: namespace,
                                                               logDirectory: artifacts.path, replacing: first) { second in
                            try await Self.waitForLink(vm, "up")
                            #expect(try await Self.chardevFilename(vm) == "unix:\(socket)")
                            let up = try await vm.console.run("ip addr show dev eth0")
                            #expect(up.contains("<BROADCAST,MULTICAST,UP,LOWER_UP>"), "\(up)")
                            try await pinger.waitForReplies(answeredBefore + 50, timeout: .seconds(30))
                            pinger.stop()
                            let report = await pinger.finish(timeout: .seconds(10))
                            #expect(report.received >= answeredBefore + 50, "\(report)\nbackend: \(second.log)")
                            let fromGuest = try await vm.guest.ping(network.hostAddress, count: 3, waitSeconds: 2)
                            #expect(fromGuest.received == 3, "guest -> host: \(fromGuest)\nbackend: \(second.log)")
                            let reconnected = vm.stderrTail(50).joined(separator: "\n")
                            #expect(reconnected.contains("netdev n0: chardev 'c' (unix:\(socket)): reconnected to the vhost-user backend; link up (4 rings restored)"),
                                    "\(reconnected)")
                        }
                        #expect(vm.isRunning)
                    }
                }
            }
        }
    }
}
