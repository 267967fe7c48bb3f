import QMPWire
import TestKit
import Testing

/// The bundled VMM boots the bundled guest to its shell, and the shell behaves.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct BootFunctionalTests {
    @Test func bootsToBannerAndPrompt() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            try await vm.console.waitFor("SwiftVMM test guest", timeout: .seconds(20))
            try await vm.console.waitForPrompt()
            let status = try await vm.qmp.execute("query-status")
            #expect(status["status"] == "running")
            #expect(status["running"] == true)
        }
    }

    @Test func echoRoundTrip() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            let output = try await vm.console.run("echo hello from the host", expect: "hello from the host")
            #expect(output.contains("hello from the host"))
            try await vm.console.run("uname", expect: "SwiftGuest")
            try await vm.console.run("nosuchcommand", expect: "sh: nosuchcommand: not found")
        }
    }

    @Test func ticksOnlyGrows() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            let first = try await vm.guest.ticks()
            try await Task.sleep(for: .milliseconds(300))
            let second = try await vm.guest.ticks()
            #expect(second > first, "ticks went from \(first) to \(second)")
        }
    }

    @Test func poweroffExitsWithStatusZero() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            try vm.console.send("poweroff\r")
            let event = try await vm.qmp.waitForEvent("SHUTDOWN", timeout: .seconds(10))
            #expect(event.data == ["guest": true, "reason": "guest-shutdown"])
            #expect(try await vm.wait(timeout: .seconds(10)) == .exited(0))
        }
    }

    @Test func noShutdownKeepsTheVMMInShutdownState() async throws {
        try await Machine.with(MachineOptions.bundledGuest(arguments: ["-no-shutdown"])) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            try vm.console.send("poweroff\r")
            _ = try await vm.qmp.waitForEvent("SHUTDOWN", matching: ["guest": true], timeout: .seconds(10))
            _ = try await vm.qmp.waitForEvent("STOP", timeout: .seconds(10))
            let status = try await vm.qmp.execute("query-status")
            #expect(status["status"] == "shutdown")
            #expect(status["running"] == false)
            await #expect(throws: QMPError.self) { try await vm.qmp.execute("cont") }
            #expect(vm.isRunning)
        }
    }
}
