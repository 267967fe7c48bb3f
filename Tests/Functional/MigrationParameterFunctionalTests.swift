import Foundation
import QMPWire
import TestKit
import Testing

/// Migration parameters over QMP, as a management tool sets them: the defaults, QEMU's
/// range checks when a value is set, and that no accepted value can bring the VMM down.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct MigrationParameterFunctionalTests {
    /// The error text of a refused command, or nil when it succeeded.
    static func refusal(_ qmp: QMPClient, _ command: String, _ arguments: JSONObject) async -> String? {
        do {
            _ = try await qmp.execute(command, arguments: arguments)
            return nil
        } catch {
            return "\(error)"
        }
    }

    @Test func defaultsAsQueryMigrateParametersReportsThem() async throws {
        try await Machine.with(MachineOptions.bundledGuest(startPaused: true)) { vm in
            let parameters = try await vm.qmp.execute("query-migrate-parameters")
            // `local` is off until asked for, as in the series (an older peer knows nothing of it).
            #expect(parameters["local"] == false, "\(parameters.serialized)")
            #expect(parameters["downtime-limit"] == 300)
            #expect(parameters["max-bandwidth"] == 134_217_728)
            #expect(parameters["mode"] == "normal")
            try await vm.qmp.execute("migrate-set-parameters", arguments: ["local": true, "downtime-limit": 2_000_000, "max-bandwidth": 0])
            let updated = try await vm.qmp.execute("query-migrate-parameters")
            #expect(updated["local"] == true && updated["downtime-limit"] == 2_000_000 && updated["max-bandwidth"] == 0, "\(updated.serialized)")
        }
    }

    /// issue 8 §5: `downtime-limit` 9223372036855 was accepted and `migrate` then trapped on
    /// `× 1_000_000`. QEMU refuses anything outside 0..2000000 ms when it is set.
    @Test(arguments: [
        ("downtime-limit", JSON.int(9_223_372_036_855), "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms, not 9223372036855"),
        ("downtime-limit", JSON.double(1e13), "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms, not 10000000000000"),
        ("downtime-limit", JSON.int(1 << 62), "not 4611686018427387904"),
        ("downtime-limit", JSON.int(2_000_001), "not 2000001"),
        ("downtime-limit", JSON.int(-1), "Parameter 'downtime_limit' expects an integer in the range of 0 to 2000000 ms, not -1"),
        ("max-bandwidth", JSON.int(-1), "Parameter 'max_bandwidth' expects an integer in the range of 0 to 9223372036854775807 bytes/second, not -1"),
    ])
    func outOfRangeValuesAreRefusedWhenSet(parameter: String, value: JSON, message: String) async throws {
        try await Machine.with(MachineOptions.bundledGuest(startPaused: true)) { vm in
            let qmp = try vm.qmp
            let before = try await qmp.execute("query-migrate-parameters")
            let error = await Self.refusal(qmp, "migrate-set-parameters", [parameter: value])
            #expect(error?.contains(message) == true, "\(error ?? "accepted")")
            // Nothing of a refused command applies, not even its valid members.
            let mixed = await Self.refusal(qmp, "migrate-set-parameters", ["local": true, parameter: value])
            #expect(mixed != nil)
            #expect(try await vm.qmp.execute("query-migrate-parameters") == before)
            // And `migrate` runs with what was kept: it fails on the absent peer, the VMM lives.
            try await vm.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [["capability": "events", "state": true]]])
            try await vm.qmp.execute("migrate", arguments: ["uri": "unix:/nonexistent/vmm-migration.sock"])
            _ = try await vm.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
            #expect(try await vm.qmp.execute("query-status")["status"] == "prelaunch")
        }
    }

    /// The largest accepted values go through `migrate` without a trap.
    @Test func largestAcceptedValuesMigrateWithoutATrap() async throws {
        try await Machine.with(MachineOptions.bundledGuest(startPaused: true)) { vm in
            try await vm.qmp.execute("migrate-set-parameters", arguments: ["downtime-limit": 2_000_000, "max-bandwidth": .int(Int64.max)])
            try await vm.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [["capability": "events", "state": true]]])
            try await vm.qmp.execute("migrate", arguments: ["uri": "unix:/nonexistent/vmm-migration.sock"])
            _ = try await vm.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
            #expect(try await vm.qmp.execute("query-status")["status"] == "prelaunch")
        }
    }
}

/// A netdev that waits for its TAP from a migration only makes sense on a migration target.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct IncomingFDsOutsideMigrationFunctionalTests {
    static let message = "Peers wait for incoming, but it's not an incoming migration."

    @Test func netdevAddIsRefusedOnAMachineThatIsNotATarget() async throws {
        try await Machine.with(MachineOptions.bundledGuest(startPaused: true)) { vm in
            let error = await MigrationParameterFunctionalTests.refusal(try vm.qmp, "netdev_add", [
                "type": "tap", "id": "netdev.1", "incoming-fds": true, "queues": 4, "script": "no", "downscript": "no",
            ])
            #expect(error?.contains(Self.message) == true, "\(error ?? "accepted")")
            #expect(try await vm.qmp.execute("query-status")["status"] == "prelaunch")
        }
    }

    @Test func commandLineNetdevIsRefusedWithoutIncoming() async throws {
        let vmm = try VMMBinary.resolve()
        let result = try await runProcess(vmm.path, [
            "-kernel", BundledGuest.image, "-nodefaults", "-netdev", "tap,id=n0,incoming-fds=on,script=no,downscript=no",
        ])
        #expect(result.status == 1)
        #expect(result.stderr.contains(Self.message), "\(result.stderr)")
    }
}

/// The series' QMP calls as written, on a migration target (which needs no TAP):
/// netdev_add with incoming-fds, then its device_add with every property it passes, on
/// the bus of a `-device pcie-pci-bridge` alias. Properties without effect here are
/// accepted and said so at debug level.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct SeedDeviceAddFunctionalTests {
    @Test func seriesDeviceAddIsAcceptedAndItsNoEffectPropertiesAreLogged() async throws {
        var options = MachineOptions.bundledGuest(startPaused: true, arguments: [
            "-d", "-machine", "q35", "-device", "pcie-pci-bridge,id=pci.1,bus=pcie.0", "-incoming", "defer",
        ])
        options.name = "target"
        try await Machine.with(options) { vm in
            try await vm.qmp.execute("netdev_add", arguments: [
                "id": "netdev.1", "vhost": false, "type": "tap", "queues": 4, "incoming-fds": true, "script": "no", "downscript": "no",
            ])
            try await vm.qmp.execute("device_add", arguments: [
                "driver": "virtio-net-pci", "romfile": "", "id": "vnet.1", "netdev": "netdev.1", "mq": true, "vectors": 18,
                "bus": "pci.1", "mac": "d6:0d:75:f8:0f:b7", "disable-legacy": "off", "local-migration": true,
            ])
            let nic = try await NetworkDeviceFunctionalTests.nicInfo(vm.qmp, id: "vnet.1")
            #expect(nic["bus"] == 0 && nic["x-virtio-net"]?["max-queue-pairs"] == 4, "\(nic.serialized)")
            let log = vm.stderrTail(40).joined(separator: "\n")
            for note in ["vnet.1: vectors=18 has no effect", "vnet.1: romfile=\"\" has no effect", "vnet.1: disable-legacy=off has no effect",
                         "vnet.1: bus=pci.1 names a pcie-pci-bridge alias"] {
                #expect(log.contains(note), "\(note) not in: \(log)")
            }
            try await vm.qmp.execute("netdev_add", arguments: [
                "id": "netdev.2", "type": "tap", "incoming-fds": true, "script": "no", "downscript": "no",
            ])
            let missing = await MigrationParameterFunctionalTests.refusal(try vm.qmp, "device_add", [
                "driver": "virtio-net-pci", "id": "vnet.2", "netdev": "netdev.2", "bus": "pci.2",
            ])
            #expect(missing?.contains("Bus 'pci.2' not found") == true, "\(missing ?? "accepted")")
        }
    }
}
