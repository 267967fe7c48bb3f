import Foundation
import QMPWire
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// The QEMU series' `test_tap_migration.py` matrix, ported to TestKit: a guest with a
    /// 4-queue NIC and its RAM in a shared file moves to a new VMM while a pinger runs.
    /// `tapFdMigration` hands the host side over (local: the TAP queues, or the vhost-user
    /// backend's connection); `tapNewTapMigration` gives the target its own TAP (and its own
    /// backend) and moves the host address over afterwards (normal). Each runs with vhost off
    /// (userspace), vhost-user (the bundled backend) and kernel vhost (`vhost=on`, the seed's
    /// `_vhost` variants; skipped without /dev/vhost-net). Both turn on `events` and
    /// `x-ignore-shared` on both sides, as the seed does, so no RAM is copied.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct TapMigrationFunctionalTests {
        static let hostAddress = "192.168.100.1"
        static let guestAddress = "192.168.100.2"
        static let hostMAC = "e6:1d:44:b5:03:5d"
        static let guestMAC = "d6:0d:75:f8:0f:b7"
        static let queues = 4

        @Test(arguments: Datapath.allCases)
        func tapFdMigration(_ datapath: Datapath) async throws {
            try await Self.run(local: true, datapath: datapath)
        }

        @Test(arguments: Datapath.allCases)
        func tapNewTapMigration(_ datapath: Datapath) async throws {
            try await Self.run(local: false, datapath: datapath)
        }

        /// The seed's flow (`_test_tap_migration`), step by step.
        static func run(local: Bool, datapath: Datapath) async throws {
            try datapath.requireAvailable()
            let ramPath = "/dev/shm/vmm-tap-migration-\(getpid())-\(local ? "local" : "normal")"
            defer { unlink(ramPath) }
            try await NetworkNamespace.with { ns in
                // init_tap: tap0 with the host's MAC and address; a normal-mode target gets tap1.
                _ = try await ns.createTap("tap0", queues: queues, multiQueue: true)
                if !local { _ = try await ns.createTap("tap1", queues: queues, multiQueue: true) }
                try await ns.withRoute { route in
                    try route.setMAC(hostMAC, of: "tap0")
                    try route.addAddress("\(hostAddress)/24", to: "tap0")
                    try route.setLink("tap0", up: true)
                }
                let socketDirectory = try ArtifactDirectory.makeShortSocketDirectory()
                defer { try? FileManager.default.removeItem(atPath: socketDirectory) }
                let uri = "unix:\(socketDirectory)/migration.sock"
                try await withArtifacts { artifacts in
                    // vhost-user: a backend per TAP that a VMM connects to (a local target adopts the source's connection).
                    let sourceBackend = try await backend(on: "tap0", datapath, ns: ns, in: artifacts)
                    let targetBackend = local ? nil : try await backend(on: "tap1", datapath, ns: ns, in: artifacts)
                    let source = try await launch("source", ns: ns, ramPath: ramPath, incoming: false, backend: sourceBackend, in: artifacts)
                    try await configure(source, ifname: "tap0", incomingFDs: false, local: local, datapath: datapath)
                    try await expectDatapath(datapath, on: source)
                    try await source.qmp.execute("cont")
                    try await source.console.waitForPrompt(timeout: .seconds(20))
                    try await source.console.run("ip addr add \(guestAddress)/24 dev eth0", failure: "no such device", timeout: .seconds(30))
                    try await source.console.run("ip link set eth0 up")
                    try await onePingFromGuest(source)
                    try await onePingFromHost(ns)
                    let ticksBefore = try await source.guest.ticks()

                    let pinger = try Pinger(namespace: ns, destination: guestAddress, interval: .milliseconds(2))
                    try pinger.start()
                    try await pinger.waitForReplies(50, timeout: .seconds(10))

                    let target = try await launch("target", ns: ns, ramPath: ramPath, incoming: true, backend: targetBackend, in: artifacts)
                    try await configure(target, ifname: "tap1", incomingFDs: local, local: local, datapath: datapath)
                    try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])

                    var freeze = FreezeWindow.begin()
                    try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                    try await MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .seconds(30))
                    if !local { try await ns.moveHostAddress("\(hostAddress)/24", mac: hostMAC, from: "tap0", to: "tap1") }
                    try await target.qmp.execute("cont")
                    freeze.close()
                    let info = try await source.qmp.execute("query-migrate")
                    _ = await source.shutdown()

                    try await onePingFromGuest(target)
                    try await onePingFromHost(ns)
                    try await Task.sleep(for: .milliseconds(300))
                    pinger.stop()
                    let report = await pinger.finish(timeout: .seconds(10))
                    // Local mode loses nothing: frames wait in the TAP during the switch.
                    try report.checkLoss(inside: freeze, maximumLost: local ? 0 : nil)
                    #expect(report.received > 50, "\(report)")
                    // x-ignore-shared with both sides mapping the same file: no page was copied.
                    #expect(info["ram"]?["normal"]?.intValue == 0, "\(info.serialized)")
                    #expect(info["x-downtime-us"]?.intValue != nil, "\(info.serialized)")

                    #expect(try await target.guest.ticks(after: .milliseconds(100)) > ticksBefore)
                    try await target.console.run("ip addr", expect: "inet \(guestAddress)/24")
                    let nic = try await NetworkDeviceFunctionalTests.nicInfo(target.qmp, id: "vnet.1")
                    // The guest's queue-pair setting came along with the device state.
                    #expect(nic["x-virtio-net"]?["queue-pairs"]?.intValue == Int64(queues), "\(nic.serialized)")
                    try await expectDatapath(datapath, on: target)
                    #expect(try await ns.withRoute { try $0.tunInfo(local ? "tap0" : "tap1") }.queues == queues)
                }
            }
        }

        /// Both sides, as the seed starts them: -S, RAM in a shared file, the NIC added over QMP.
        /// `backend`: a vhost-user backend's socket, as `-chardev socket,id=chr0`.
        static func launch(_ name: String, ns: NetworkNamespace, ramPath: String, incoming: Bool, backend: String? = nil,
                           in artifacts: ArtifactDirectory) async throws -> Machine {
            var options = MachineOptions.bundledGuest(startPaused: true, arguments: [
                "-object", "memory-backend-file,id=ram0,size=128M,mem-path=\(ramPath),share=on",
                "-machine", "memory-backend=ram0",
            ] + (incoming ? ["-incoming", "defer"] : []) + (backend.map { ["-chardev", "socket,id=chr0,path=\($0)"] } ?? []))
            options.memory = "128M"
            options.name = name
            options.namespace = ns
            return try await Machine.launch(options, in: artifacts)
        }

        /// The seed's netdev_add/device_add and migration settings; a local target's netdev
        /// waits for the source's queues (without the ifname/vnet_hdr the seed's test still
        /// passed there, which its own v13 check rejects).
        /// vhost-user: the backend's connection (`chardev=chr0`), or on a local target the
        /// source's, which arrives with the stream (`incoming-fds`).
        static func configure(_ vm: Machine, ifname: String, incomingFDs: Bool, local: Bool, datapath: Datapath) async throws {
            var netdev: JSONObject = ["id": "netdev.1", "type": "tap", "queues": .int(Int64(queues)), "script": "no", "downscript": "no"]
            if datapath == .vhostUser {
                netdev = ["id": "netdev.1", "type": "vhost-user", "queues": .int(Int64(queues))]
                if incomingFDs { netdev["incoming-fds"] = true } else { netdev["chardev"] = "chr0" }
            } else if incomingFDs {
                netdev["incoming-fds"] = true
            } else {
                netdev["ifname"] = .string(ifname)
                netdev["vnet_hdr"] = true
            }
            if datapath == .vhostKernel { netdev["vhost"] = true }
            try await vm.qmp.execute("netdev_add", arguments: netdev)
            try await vm.qmp.execute("device_add", arguments: [
                "driver": "virtio-net-pci", "id": "vnet.1", "netdev": "netdev.1", "mq": "on",
                "mac": .string(guestMAC), "local-migration": .string(local ? "on" : "off"),
            ])
            try await vm.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [
                ["capability": "events", "state": true], ["capability": "x-ignore-shared", "state": true],
            ]])
            try await vm.qmp.execute("migrate-set-parameters", arguments: ["local": .bool(local)])
        }

        /// The bundled vhost-user backend on `tap` (stopped after the machines), or nil for the other datapaths.
        static func backend(on tap: String, _ datapath: Datapath, ns: NetworkNamespace, in artifacts: ArtifactDirectory) async throws -> String? {
            try await GuestNetwork(tap: tap, queues: queues, datapath: datapath).startBackend(in: ns, artifacts: artifacts)
        }

        /// query-pci names the datapath that runs the rings, and with vhost the guest's TX
        /// notifies went to the backend's kick eventfds, not through the VMM.
        static func expectDatapath(_ datapath: Datapath, on vm: Machine, nic id: String = "vnet.1") async throws {
            let nic = try await NetworkDeviceFunctionalTests.nicInfo(vm.qmp, id: id)
            #expect(nic["x-virtio-net"]?["datapath"] == .string(datapath.rawValue), "\(vm.name): \(nic.serialized)")
            guard datapath != .userspace else { return }
            let exits = nic["x-virtio-net"]?["notify-exits"]?.arrayValue?.compactMap(\.intValue) ?? []
            let txExits = exits.enumerated().filter { $0.offset % 2 == 1 }.map(\.element)
            #expect(!exits.isEmpty && txExits.allSatisfy { $0 == 0 }, "\(vm.name): TX notifies reached the VMM: \(exits)")
        }

        static func onePingFromGuest(_ vm: Machine) async throws {
            try await vm.console.run("ping -c 1 -W 1 \(hostAddress)", expect: "1 packets transmitted, 1 packets received",
                                     failure: "1 packets transmitted, 0 packets received", timeout: .seconds(20))
            try await vm.console.waitForPrompt(timeout: .seconds(5))
        }

        static func onePingFromHost(_ ns: NetworkNamespace) async throws {
            let pinger = try Pinger(namespace: ns, destination: guestAddress, interval: .milliseconds(100), count: 1)
            try pinger.start()
            let report = await pinger.finish(timeout: .seconds(5))
            #expect(report.received == 1, "\(report)")
        }
    }
}
