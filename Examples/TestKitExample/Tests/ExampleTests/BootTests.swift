import TestKit
import Testing

@Suite(.keepsArtifactsOnFailure, .requiresKVM, .requiresGuestImage, .requiresVMM)
struct BootTests {
    @Test func echoAndStopCont() async throws {
        try await Machine.with(.bundledGuest()) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            try await vm.console.run("echo hello", expect: "hello")
            try await vm.qmp.execute("stop")
            _ = try await vm.qmp.waitForEvent("STOP")
            try await vm.qmp.execute("cont")
            _ = try await vm.qmp.waitForEvent("RESUME")
            #expect(try await vm.qmp.execute("query-status")["status"] == "running")
        }
    }
}
