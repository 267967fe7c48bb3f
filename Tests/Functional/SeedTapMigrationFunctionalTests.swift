import Foundation
import QMPWire
import TestKit
import Testing

/// Why the seed's own test cannot run here, or nil when it can.
let seedTapMigrationUnavailable: String? = {
    if let missing = qemuQMPUnavailable { return missing }
    if VMMBinary.findExecutable("ping") == nil { return "the seed's test pings with iputils' ping, which is not on PATH (ci/setup installs iputils-ping)" }
    return nil
}()

extension SerializedNetworkSuites {
    /// The local-migration series' `test_tap_migration.py`, run against `vmm` through
    /// Python's qemu.qmp: the seed's code with the guest image and its login lines
    /// swapped, and the few further changes listed at the top of
    /// Resources/test_tap_migration.py (no `&&` in the bundled guest's shell; the series'
    /// own incoming-fds check; late-but-answered pings on a loaded host). The vhost
    /// variants (kernel vhost-net) run where /dev/vhost-net exists and skip elsewhere.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct SeedTapMigrationFunctionalTests {
        static let script = URL(fileURLWithPath: #filePath).deletingLastPathComponent()
            .appendingPathComponent("Resources/test_tap_migration.py").path

        @Test(.enabled(if: seedTapMigrationUnavailable == nil, Comment(rawValue: seedTapMigrationUnavailable ?? "")),
              arguments: ["test_tap_fd_migration", "test_tap_new_tap_migration"])
        func seedTestRunsThroughQemuQMP(test: String) async throws {
            try await Self.runSeed(test)
        }

        @Test(.requiresVhostNet, .enabled(if: seedTapMigrationUnavailable == nil, Comment(rawValue: seedTapMigrationUnavailable ?? "")),
              arguments: ["test_tap_fd_migration_vhost", "test_tap_new_tap_migration_vhost"])
        func seedVhostTestRunsThroughQemuQMP(test: String) async throws {
            try await Self.runSeed(test)
        }

        static func runSeed(_ test: String) async throws {
            let python = try #require(VMMBinary.findExecutable("python3"))
            let process = Process()
            process.executableURL = URL(fileURLWithPath: python)
            process.arguments = [Self.script, "TAPFdMigrationOnThisHost.\(test)"]
            var environment = ProcessInfo.processInfo.environment
            environment["VMM_BINARY"] = try VMMBinary.resolve().path
            environment["VMM_GUEST_KERNEL"] = BundledGuest.image
            process.environment = environment
            let output = Pipe()
            process.standardOutput = output
            process.standardError = output
            process.standardInput = FileHandle.nullDevice
            try process.run()
            let pid = process.processIdentifier
            // Whatever happens to the script, nothing it made outlives the test.
            defer {
                if process.isRunning { kill(pid, SIGKILL) }
                process.waitUntilExit()
                unlink("/dev/shm/qemu_test_\(pid)")
                _ = try? Process.run(URL(fileURLWithPath: "/usr/sbin/ip"), arguments: ["netns", "del", "qemu_test_ns_\(pid)"]).waitUntilExit()
            }
            let collected = Task.detached { output.fileHandleForReading.readDataToEndOfFile() }
            let deadline = ContinuousClock.now + .seconds(300)
            while process.isRunning && ContinuousClock.now < deadline { try await Task.sleep(for: .milliseconds(50)) }
            if process.isRunning { kill(pid, SIGKILL) }
            let text = String(decoding: await collected.value, as: UTF8.self)
            process.waitUntilExit()
            #expect(process.terminationStatus == 0, "\(text)")
            #expect(text.contains("\nOK"), "\(text)")
            #expect(!text.contains("skipped"), "\(text)")
            if let note = text.split(separator: "\n").first(where: { $0.hasPrefix("seed's ping check:") }) {
                print("\(test): \(note)")
            }
        }
    }
}
