import Foundation
import QMPWire
import TestKit
import Testing

// Kernel vhost's pings and the seed's `test_tap_fd_migration_vhost` /
// `test_tap_new_tap_migration_vhost` are the `.vhostKernel` cases of the Datapath-
// parameterized DatapathFunctionalTests and TapMigrationFunctionalTests: they need
// /dev/vhost-net and are cancelled with the reason where it is missing.

/// Where /dev/vhost-net is missing (this project's machines), vhost=on is an error naming
/// the netdev and the errno: exit 1 from the command line, an error reply from netdev_add
/// with the VMM running on; never a silent fall back to the userspace datapath.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces,
       .usesProcessResources,
       .enabled(if: HostRequirement.vhostNetUnavailable() != nil, "this host has /dev/vhost-net, so vhost=on cannot fail for its absence"))
struct VhostKernelUnavailableFunctionalTests {
    /// What opening the device fails with here (ENOENT's text on this project's machines).
    static var reason: String {
        let fd = open("/dev/vhost-net", O_RDWR | O_CLOEXEC)
        guard fd < 0 else { close(fd); return "(it opened)" }
        return String(cString: strerror(errno))
    }

    @Test func commandLineVhostOnFailsWithOneLineNamingNetdevAndErrno() async throws {
        try await NetworkNamespace.with { ns in
            let vmm = try VMMBinary.resolve()
            let netdev = "tap,id=n1,ifname=tapvh,vhost=on,script=no,downscript=no"
            let command = try ns.commandPrefix() + [vmm.path, "-nodefaults", "-kernel", BundledGuest.image,
                                                    "-netdev", netdev, "-device", "virtio-net-pci,netdev=n1"]
            let result = try await runProcess(command[0], Array(command.dropFirst()))
            #expect(result.status == 1)
            #expect(result.stderr == "vmm: -netdev \(netdev): cannot open /dev/vhost-net for netdev 'n1': \(Self.reason)\n", "\(result.stderr)")
            // The vhost device is opened first: no TAP was created for nothing.
            let links = try await ns.withRoute { try $0.links().map(\.name) }
            #expect(!links.contains("tapvh"), "\(links)")
        }
    }

    @Test func netdevAddVhostOnIsAnErrorReplyAndTheVMMRunsOn() async throws {
        try await NetworkNamespace.with { ns in
            _ = try await ns.createTap("tap0", queues: 1, multiQueue: false)
            var options = MachineOptions.bundledGuest(startPaused: true)
            options.namespace = ns
            try await Machine.with(options) { vm in
                do {
                    try await vm.qmp.execute("netdev_add", arguments: [
                        "type": "tap", "id": "n1", "ifname": "tap0", "vhost": true, "script": "no", "downscript": "no",
                    ])
                    Issue.record("netdev_add with vhost=on was accepted without /dev/vhost-net")
                } catch QMPError.commandFailed(let errorClass, let desc, _) {
                    #expect(errorClass == "GenericError")
                    #expect(desc == "netdev_add tap,id=n1,ifname=tap0,vhost=on,script=no,downscript=no: cannot open /dev/vhost-net for netdev 'n1': \(Self.reason)")
                }
                // vhostforce alone turns vhost on too (QEMU's rule): the same refusal.
                await #expect(throws: QMPError.self) {
                    try await vm.qmp.execute("netdev_add", arguments: ["type": "tap", "id": "n1", "ifname": "tap0", "vhostforce": true])
                }
                // Nothing half-made: the id is free and the VMM answers.
                try await vm.qmp.execute("netdev_add", arguments: ["type": "tap", "id": "n1", "ifname": "tap0", "script": "no", "downscript": "no"])
                try await vm.qmp.execute("device_add", arguments: ["driver": "virtio-net-pci", "netdev": "n1", "id": "nic0"])
                let nic = try await NetworkDeviceFunctionalTests.nicInfo(vm.qmp)
                #expect(nic["x-virtio-net"]?["datapath"] == "userspace")
                let status = try await vm.qmp.execute("query-status")
                #expect(status["status"] == "prelaunch", "\(status.serialized)")
            }
        }
    }
}

/// `vhostfd=`/`vhostfds=` over QMP: getfd names resolve like `fd=`'s, and the VMM drives
/// the fd it was given (here one that is no vhost device, so SET_OWNER fails, named).
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces,
       .usesProcessResources)
struct VhostKernelFDFunctionalTests {
    @Test func passedVhostFDsAreUsedAndCheckedPerQueue() async throws {
        try await NetworkNamespace.with { ns in
            _ = try await ns.createTap("tap0", queues: 2, multiQueue: true)
            var options = MachineOptions.bundledGuest(startPaused: true)
            options.namespace = ns
            try await Machine.with(options) { vm in
                let notVhost = open("/dev/null", O_RDWR | O_CLOEXEC)
                defer { close(notVhost) }
                try await vm.qmp.execute("getfd", arguments: ["fdname": "v0"], passing: [notVhost])
                do {
                    try await vm.qmp.execute("netdev_add", arguments: ["type": "tap", "id": "n2", "ifname": "tap0", "queues": 2, "vhostfds": "v0"])
                    Issue.record("one vhost fd for two queues was accepted")
                } catch QMPError.commandFailed(_, let desc, _) {
                    #expect(desc.hasSuffix("gives 1 vhost-net fd for netdev 'n2', which has 2 queues (one per queue)"), "\(desc)")
                    #expect(desc.hasPrefix("netdev_add tap,id=n2,ifname=tap0,queues=2,vhostfds="), "\(desc)")
                }
                do {
                    try await vm.qmp.execute("netdev_add", arguments: ["type": "tap", "id": "n2", "ifname": "tap0", "queues": 2, "vhostfds": "v0:v0"])
                    Issue.record("a vhost fd that is /dev/null was accepted")
                } catch QMPError.commandFailed(_, let desc, _) {
                    #expect(desc.hasSuffix(": netdev 'n2': vhost-net queue pair 0: VHOST_SET_OWNER: Inappropriate ioctl for device"), "\(desc)")
                }
                // Nothing kept: the TAP's queues the attempt opened are closed again.
                #expect(try await ns.withRoute { try $0.tunInfo("tap0") }.queues == 0)
                let status = try await vm.qmp.execute("query-status")
                #expect(status["status"] == "prelaunch")
            }
        }
    }
}
