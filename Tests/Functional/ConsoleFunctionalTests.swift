import Foundation
import TestKit
import Testing

/// Console input that arrives before the guest has set up its UART (a person pressing
/// Enter, or a harness asking for a fresh prompt) must not stall the console: under
/// QEMU's 16550 it did, and our UART model now behaves the same way, so both VMMs
/// check the bundled guest here.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .usesProcessResources)
struct ConsoleEarlyInputFunctionalTests {
    /// Types Enter while the machine is still stopped (`-S`), so the byte is waiting in
    /// the UART when the guest's first instruction runs; then expects a working shell.
    static func typeBeforeBootThenEcho(_ options: MachineOptions) async throws {
        var options = options
        options.startPaused = true
        try await Machine.with(options) { vm in
            try vm.console.send("\n")
            // The VMM takes the byte from its socket asynchronously; give it time to
            // reach the UART before the guest runs.
            try await Task.sleep(for: .milliseconds(300))
            try await vm.qmp.execute("cont")
            try await vm.console.waitForPrompt(timeout: .seconds(30))
            try await vm.console.run("echo typed early", expect: "typed early", timeout: .seconds(20))
        }
    }

    @Test(.requiresVMM) func bundledVMM() async throws {
        try await Self.typeBeforeBootThenEcho(MachineOptions.bundledGuest())
    }

    /// QEMU 7.2's q35, as the issue ran it: firmware first, then the guest.
    @Test(.requiresBinary("qemu-system-x86_64")) func qemuQ35() async throws {
        let qemu = try VMMBinary.named("qemu-system-x86_64")
        let binary = VMMBinary(path: qemu.path, defaultArguments: [
            "-machine", "q35", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none",
        ])
        try await Self.typeBeforeBootThenEcho(MachineOptions(binary: binary, kernel: BundledGuest.image, memory: "128M"))
    }
}
