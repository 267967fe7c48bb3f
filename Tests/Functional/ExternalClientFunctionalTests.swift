import Foundation
import QMPWire
import TestKit
import Testing

/// Runs `executable arguments` to completion and returns its exit status and output.
func runProcess(_ executable: String, _ arguments: [String], timeout: Duration = .seconds(30)) async throws -> (status: Int32, stdout: String, stderr: String) {
    let process = Process()
    process.executableURL = URL(fileURLWithPath: executable)
    process.arguments = arguments
    let out = Pipe()
    let err = Pipe()
    process.standardOutput = out
    process.standardError = err
    process.standardInput = FileHandle.nullDevice
    try process.run()
    let deadline = ContinuousClock.now + timeout
    while process.isRunning {
        if ContinuousClock.now > deadline {
            // SIGKILL: a child may have inherited a mask that blocks SIGTERM.
            kill(process.processIdentifier, SIGKILL)
            process.waitUntilExit()
            throw FixtureError("\(executable) \(arguments) did not finish within \(timeout)")
        }
        try await Task.sleep(for: .milliseconds(20))
    }
    let stdout = String(decoding: out.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
    return (process.terminationStatus, stdout, stderr)
}

/// Why the Python qemu.qmp client cannot be used here, or nil when it can.
let qemuQMPUnavailable: String? = {
    guard let python = VMMBinary.findExecutable("python3") else { return "python3 not found on PATH" }
    let process = Process()
    process.executableURL = URL(fileURLWithPath: python)
    process.arguments = ["-c", "import qemu.qmp"]
    process.standardOutput = FileHandle.nullDevice
    process.standardError = FileHandle.nullDevice
    guard (try? process.run()) != nil else { return "cannot run \(python)" }
    process.waitUntilExit()
    return process.terminationStatus == 0 ? nil : "python3 lacks the qemu.qmp package (pip install qemu.qmp; ci/setup installs it)"
}()

/// Drives the VMM with QEMU's own Python QMP library, unchanged, as QEMU's scripts would.
let qemuQMPScript = #"""
import asyncio, sys
from qemu.qmp import QMPClient, ExecuteError

async def main(path):
    qmp = QMPClient('swift-vmm')
    await qmp.connect(path)
    status = await qmp.execute('query-status')
    assert status['status'] == 'running', status
    await qmp.execute('stop')
    event = await asyncio.wait_for(qmp.events.get(), 5)
    assert event['event'] == 'STOP', event
    assert (await qmp.execute('query-status'))['status'] == 'paused'
    await qmp.execute('cont')
    event = await asyncio.wait_for(qmp.events.get(), 5)
    assert event['event'] == 'RESUME', event
    try:
        await qmp.execute('no-such-command')
        raise AssertionError('unknown command accepted')
    except ExecuteError as err:
        assert err.error_class == 'CommandNotFound', err
    version = await qmp.execute('query-version')
    await qmp.disconnect()
    print('qemu.qmp OK', version['package'])

asyncio.run(main(sys.argv[1]))
"""#

@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct ExternalClientFunctionalTests {
    @Test(.enabled(if: qemuQMPUnavailable == nil, Comment(rawValue: qemuQMPUnavailable ?? "")))
    func pythonQemuQMPClientDrivesTheVMM() async throws {
        let dir = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/qmp.sock"
        try await Machine.with(MachineOptions.bundledGuest(arguments: ["-qmp", "unix:\(path),server=on,wait=off"], connectQMP: false)) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            let python = try #require(VMMBinary.findExecutable("python3"))
            let result = try await runProcess(python, ["-c", qemuQMPScript, path])
            #expect(result.status == 0, "stdout: \(result.stdout)\nstderr: \(result.stderr)")
            #expect(result.stdout.contains("qemu.qmp OK"))
            try await vm.console.run("echo after python", expect: "after python", timeout: .seconds(20))
        }
    }

    @Test(arguments: [
        (["-bogus"], "-bogus: invalid option"),
        (["-m", "lots", "-kernel", "x"], "'lots'"),
        (["-kernel", "/nonexistent/guest.elf"], "-kernel /nonexistent/guest.elf"),
        (["-kernel", "/etc/hostname"], "not a usable ELF image"),
        // Used to be read whole until the OOM killer came.
        (["-kernel", "/dev/zero"], "-kernel /dev/zero: not a regular file"),
        // -m 1T used to boot on a 24 GiB host and die at first touch; QEMU refuses up front.
        // 64T: more than any test host has, less than the 128 TiB a process can map.
        (["-m", "64T", "-kernel", "/nonexistent/guest.elf"], "-m 64T: cannot set up guest memory: 70368744177664 bytes"),
    ])
    func badCommandLineFailsWithOneLineAndStatusOne(arguments: [String], fragment: String) async throws {
        let vmm = try VMMBinary.resolve()
        let result = try await runProcess(vmm.path, arguments + ["-nodefaults"])
        #expect(result.status == 1)
        let lines = result.stderr.split(separator: "\n")
        #expect(lines.count == 1, "\(result.stderr)")
        #expect(result.stderr.contains(fragment), "\(result.stderr)")
    }
}
