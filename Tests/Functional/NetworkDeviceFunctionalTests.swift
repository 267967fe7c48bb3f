import QMPWire
import TestKit
import Testing

/// The VMM's side of networking, observable without a guest driver: TAP queues opened,
/// the NIC on the PCI bus, netdevs and devices added over QMP, bad netdevs refused.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces, .usesProcessResources)
struct NetworkDeviceFunctionalTests {
    static func nicArguments(queues: Int, mq: Bool = true, ifname: String = "tap0") -> [String] {
        ["-netdev", "tap,id=n0,ifname=\(ifname),queues=\(queues),script=no,downscript=no",
         "-device", "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:56,mq=\(mq ? "on" : "off")"]
    }

    static func nicInfo(_ qmp: QMPClient, id: String = "nic0") async throws -> JSON {
        let buses = try await qmp.execute("query-pci")
        let devices = buses.arrayValue?.first?["devices"]?.arrayValue ?? []
        return try #require(devices.first { $0["qdev_id"] == .string(id) }, "\(id) missing from query-pci: \(buses.serialized)")
    }

    @Test(arguments: [1, 4])
    func opensEveryQueueOfAMultiQueueTap(queues: Int) async throws {
        try await NetworkNamespace.with { ns in
            _ = try await ns.createTap("tap0", queues: queues, multiQueue: true)
            var options = MachineOptions.bundledGuest(arguments: Self.nicArguments(queues: queues))
            options.namespace = ns
            try await Machine.with(options) { vm in
                try await vm.console.waitForPrompt(timeout: .seconds(20))
                let info = try await ns.withRoute { try $0.tunInfo("tap0") }
                #expect(info.queues == queues)
                let nic = try await Self.nicInfo(vm.qmp)
                #expect(nic["id"]?["vendor"] == 0x1AF4 && nic["id"]?["device"] == 0x1041)
                #expect(nic["x-virtio-net"]?["max-queue-pairs"]?.intValue == Int64(queues))
                #expect(nic["x-virtio-net"]?["queues"]?.intValue == Int64(2 * queues + 1))
                let bar = try #require(nic["regions"]?.arrayValue?.first)
                #expect(bar["type"] == "memory" && bar["size"] == 0x8000)
                try await vm.qmp.execute("quit")
                _ = try await vm.wait(timeout: .seconds(10))
            }
            // The VMM's queue fds are gone with it.
            #expect(try await ns.withRoute { try $0.tunInfo("tap0") }.queues == 0)
        }
    }

    @Test func netdevAndDeviceAddedOverQMPBeforeStartWithPassedFDs() async throws {
        try await NetworkNamespace.with { ns in
            _ = try await ns.createTap("tap0", queues: 2, multiQueue: true)
            var options = MachineOptions.bundledGuest(startPaused: true)
            options.namespace = ns
            try await Machine.with(options) { vm in
                let queues = try await ns.run { try TapDevice.openQueues(name: "tap0", count: 2, multiQueue: true, vnetHeader: true) }
                defer { queues.close() }
                let fds = queues.descriptors
                try await vm.qmp.execute("getfd", arguments: ["fdname": "q0"], passing: [fds[0]])
                try await vm.qmp.execute("getfd", arguments: ["fdname": "q1"], passing: [fds[1]])
                await #expect(throws: QMPError.self) { try await vm.qmp.execute("getfd", arguments: ["fdname": "none"]) }
                try await vm.qmp.execute("netdev_add", arguments: ["type": "tap", "id": "n0", "fds": "q0:q1", "vnet_hdr": true])
                // Named fds were consumed by the netdev.
                await #expect(throws: QMPError.self) { try await vm.qmp.execute("closefd", arguments: ["fdname": "q0"]) }
                try await vm.qmp.execute("device_add", arguments: ["driver": "virtio-net-pci", "netdev": "n0", "id": "nic0", "mq": "on"])
                let nic = try await Self.nicInfo(vm.qmp)
                #expect(nic["x-virtio-net"]?["max-queue-pairs"] == 2)
                // The VMM holds copies of our fds: the same two kernel queues.
                #expect(try await ns.withRoute { try $0.tunInfo("tap0") }.queues == 2)
                try await vm.qmp.execute("cont")
                try await vm.console.waitForPrompt(timeout: .seconds(20))
                do {
                    try await vm.qmp.execute("device_add", arguments: ["driver": "virtio-net-pci", "netdev": "n0"])
                    Issue.record("device_add after start was accepted")
                } catch QMPError.commandFailed(_, let desc, _) {
                    #expect(desc.contains("no hotplug"))
                }
            }
        }
    }

    @Test(arguments: [
        (["-netdev", "tap,id=n0,ifname=tapS,script=/etc/qemu-ifup", "-device", "virtio-net-pci,netdev=n0"], "script=/etc/qemu-ifup is not supported"),
        (["-netdev", "tap,id=n0,ifname=tap1q,queues=2,script=no,downscript=no", "-device", "virtio-net-pci,netdev=n0,mq=on"], "without multi_queue"),
    ])
    func refusesNetdevsItCannotUse(arguments: [String], fragment: String) async throws {
        try await NetworkNamespace.with { ns in
            _ = try await ns.createTap("tap1q", queues: 1, multiQueue: false)
            let vmm = try VMMBinary.resolve()
            let command = try ns.commandPrefix() + [vmm.path, "-nodefaults", "-kernel", BundledGuest.image] + arguments
            let result = try await runProcess(command[0], Array(command.dropFirst()))
            #expect(result.status == 1)
            #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
            #expect(result.stderr.contains(fragment), "\(result.stderr)")
        }
    }
}
