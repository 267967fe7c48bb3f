import Foundation
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// The bundled `vhost-user-net` backend with QEMU as the front-end: the proof that the
    /// backend speaks vhost-user as QEMU does (docs/interop/vhost-user.rst), before our own
    /// front-end uses it. QEMU runs the bundled guest on q35 with shared memfd RAM and a
    /// two-pair vhost-user NIC; the backend serves TAP queues in the test's namespace.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces, .requiresBinary("qemu-system-x86_64"))
    struct VhostUserInteropFunctionalTests {
        @Test func qemuFrontEndCarriesPingsThroughTheBundledBackend() async throws {
            let network = GuestNetwork(queues: 2)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: network.queues, in: namespace,
                                                           logDirectory: artifacts.path) { backend in
                        var options = MachineOptions.bundledGuest(memory: "256M", name: "qemu")
                        options.binary = try VMMBinary.named("qemu-system-x86_64")
                        options.namespace = namespace
                        options.arguments = [
                            "-machine", "q35", "-accel", "kvm", "-nodefaults", "-display", "none",
                            "-object", "memory-backend-memfd,id=m,size=256M,share=on", "-machine", "memory-backend=m",
                            "-chardev", "socket,id=c,path=\(backend.socketPath)",
                            "-netdev", "vhost-user,id=\(network.netdevID),chardev=c,queues=\(network.queues)",
                        ] + network.deviceArguments
                        try await Machine.with(options) { vm in
                            try await vm.console.waitForPrompt(timeout: .seconds(30))
                            try await vm.guest.configureNetwork(address: network.guestCIDR)
                            let fromGuest = try await vm.guest.ping(network.hostAddress, count: 3, waitSeconds: 2)
                            #expect(fromGuest.received == 3, "guest -> host: \(fromGuest)\nbackend: \(backend.log)")
                            let pinger = try Pinger(namespace: namespace, destination: network.guestAddress,
                                                    interval: .milliseconds(20), count: 50)
                            try pinger.start()
                            let report = await pinger.finish(timeout: .seconds(30))
                            #expect(report.received == 50, "host -> guest: \(report)\nbackend: \(backend.log)")
                        }
                        // QEMU quit: the backend saw the front-end go and waits for the next.
                        #expect(backend.isRunning)
                        #expect(backend.log.contains("front-end connected"))
                    }
                }
            }
        }
    }
}

extension SerializedNetworkSuites {
    /// Our VMM as the vhost-user front-end of the bundled backend: the rings run in
    /// `vhost-user-net`, the guest's TX notifies reach it as ioeventfd kicks (no exits).
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct VhostUserFrontEndFunctionalTests {
        @Test func pingsFlowThroughTheBundledBackendWithoutTXNotifyExits() async throws {
            let network = GuestNetwork(queues: 2)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: network.queues, in: namespace,
                                                           logDirectory: artifacts.path) { backend in
                        var options = MachineOptions.bundledGuest()
                        options.namespace = namespace
                        options.arguments = [
                            "-chardev", "socket,id=c,path=\(backend.socketPath)",
                            "-netdev", "vhost-user,id=\(network.netdevID),chardev=c,queues=\(network.queues)",
                        ] + network.deviceArguments
                        try await Machine.with(options) { vm in
                            try await vm.console.waitForPrompt(timeout: .seconds(30))
                            try await vm.guest.configureNetwork(address: network.guestCIDR)
                            let fromGuest = try await vm.guest.ping(network.hostAddress, count: 3, waitSeconds: 2)
                            #expect(fromGuest.received == 3, "guest -> host: \(fromGuest)\nbackend: \(backend.log)")
                            let pinger = try Pinger(namespace: namespace, destination: network.guestAddress,
                                                    interval: .milliseconds(20), count: 50)
                            try pinger.start()
                            let report = await pinger.finish(timeout: .seconds(30))
                            #expect(report.received == 50, "host -> guest: \(report)\nbackend: \(backend.log)")
                            let nic = try await NetworkDeviceFunctionalTests.nicInfo(vm.qmp)
                            #expect(nic["x-virtio-net"]?["datapath"] == "vhost-user")
                            let exits = nic["x-virtio-net"]?["notify-exits"]?.arrayValue ?? []
                            // Rings 1 and 3 are the TX rings: their notifies went to the backend's kicks.
                            for tx in [1, 3] where tx < exits.count {
                                #expect(exits[tx] == 0, "TX ring \(tx) notify exits: \(exits)")
                            }
                            #expect(exits.count >= 4, "\(nic)")
                        }
                    }
                }
            }
        }


        /// The backend outlives its front-ends: a second VMM gets the same TAP and pings
        /// flow again; a backend killed under a running VMM leaves the VMM serving QMP
        /// and the console (its NIC just stops moving frames).
        @Test func backendServesTheNextFrontEndAndItsDeathLeavesTheVMMRunning() async throws {
            let network = GuestNetwork(queues: 1)
            try await withArtifacts { artifacts in
                try await NetworkNamespace.with { namespace in
                    try await network.createTap(in: namespace)
                    try await VhostUserBackendProcess.with(tap: network.tap, queues: 1, in: namespace,
                                                           logDirectory: artifacts.path) { backend in
                        for round in 1...2 {
                            var options = MachineOptions.bundledGuest(name: "front-end-\(round)")
                            options.namespace = namespace
                            options.arguments = [
                                "-chardev", "socket,id=c,path=\(backend.socketPath)",
                                "-netdev", "vhost-user,id=\(network.netdevID),chardev=c,queues=1",
                            ] + network.deviceArguments
                            try await Machine.with(options) { vm in
                                try await vm.console.waitForPrompt(timeout: .seconds(30))
                                try await vm.guest.configureNetwork(address: network.guestCIDR)
                                let pinger = try Pinger(namespace: namespace, destination: network.guestAddress,
                                                        interval: .milliseconds(20), count: 20)
                                try pinger.start()
                                let report = await pinger.finish(timeout: .seconds(30))
                                #expect(report.received == 20, "front-end \(round): \(report)\nbackend: \(backend.log)")
                                #expect(backend.log.components(separatedBy: "front-end connected").count - 1 == round, "\(backend.log)")
                                if round == 2 {
                                    backend.stop()
                                    let status = try await vm.qmp.execute("query-status")
                                    #expect(status["status"] == "running")
                                    _ = try await vm.console.run("stats", expect: "total:")
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}
