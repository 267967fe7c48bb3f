import Foundation
import QMPWire
import Synchronization
import Testing
@testable import TestKit

extension TestKitTests {
    /// Launcher tests. Those with /bin/sh as the "VMM" need nothing; the QEMU ones prove
    /// launch, QMP, console, quit and reaping end to end.
    @Suite struct MachineTests {
        static let qemu = "qemu-system-x86_64"

        /// A stand-in VMM: `sh -c SCRIPT` ignores the QEMU arguments appended after it.
        static func shell(_ script: String) -> VMMBinary {
            VMMBinary(path: "/bin/sh", defaultArguments: ["-c", script])
        }

        @Test func vmmThatExitsEarlyFailsWithItsStatusAndStderr() async throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            let artifacts = try ArtifactDirectory(testName: "early-exit", base: base)
            let error = await #expect(throws: MachineError.self) {
                _ = try await Machine.launch(
                    MachineOptions(binary: Self.shell("echo 'bad option -qmp' >&2; exit 3")), in: artifacts)
            }
            guard case .exitedDuringStartup(_, let status, let stderr, let path) = error else {
                Issue.record("wrong error: \(String(describing: error))")
                return
            }
            #expect(status == .exited(3))
            #expect(stderr == ["bad option -qmp"])
            #expect(path == artifacts.path)
            #expect(!artifacts.keepReasons.isEmpty)
            let cmdline = try String(contentsOfFile: artifacts.file("cmdline.txt"), encoding: .utf8)
            #expect(cmdline.hasPrefix("/bin/sh -c 'echo '\\''bad option -qmp'\\'' >&2; exit 3' -qmp unix:"))
            #expect(cmdline.contains(" -serial unix:"))
            #expect(await artifacts.finish(bodyError: nil, environment: [:]) == artifacts.path)
        }

        @Test func vmmThatNeverConnectsTimesOutAndIsKilled() async throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            let artifacts = try ArtifactDirectory(testName: "never-connects", base: base)
            let pidFile = artifacts.file("pid")
            let error = await #expect(throws: MachineError.self) {
                _ = try await Machine.launch(
                    MachineOptions(binary: Self.shell("echo $$ > \(pidFile); exec sleep 60"), startupTimeout: .seconds(2)),
                    in: artifacts)
            }
            guard case .startupTimeout(_, let missing, _, _, _) = error else {
                Issue.record("wrong error: \(String(describing: error))")
                return
            }
            #expect(missing == ["QMP", "console"])
            // Killed and reaped: no process, not even a zombie, is left with that pid.
            let pid = try #require(Int32(String(contentsOfFile: pidFile, encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)))
            #expect(kill(pid, 0) == -1 && errno == ESRCH)
            #expect(try String(contentsOfFile: artifacts.file("exit-status.txt"), encoding: .utf8).contains("signal 9"))
        }

        @Test func missingBinaryIsASpawnError() async throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            let artifacts = try ArtifactDirectory(testName: "spawn", base: base)
            await #expect(throws: MachineError.self) {
                _ = try await Machine.launch(MachineOptions(binary: VMMBinary(path: "/nonexistent/vmm")), in: artifacts)
            }
        }

        @Test func longArtifactPathsStillGetSockets() async throws {
            let base = try temporaryDirectory() + "/" + String(repeating: "d", count: 100)
            defer { try? FileManager.default.removeItem(atPath: (base as NSString).deletingLastPathComponent) }
            let artifacts = try ArtifactDirectory(testName: "long", base: base)
            await #expect(throws: MachineError.self) {
                _ = try await Machine.launch(MachineOptions(binary: Self.shell("exit 0")), in: artifacts)
            }
            let cmdline = try String(contentsOfFile: artifacts.file("cmdline.txt"), encoding: .utf8)
            #expect(cmdline.contains("-qmp unix:/tmp/testkit-"))
        }

        /// TCG, so that it runs on hosts without /dev/kvm.
        static var qemuTCG: VMMBinary {
            get throws {
                var binary = try VMMBinary.named(qemu)
                binary.defaultArguments = ["-machine", "microvm", "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none"]
                return binary
            }
        }

        @Test(.requiresBinary(qemu), .countsProcessResources) func qemuLaunchQueryQuitAndReap() async throws {
            let fdsBefore = ProcessResources.descriptors().count
            let seen = Mutex<(Machine?, String?)>((nil, nil))
            try await Machine.with(MachineOptions(binary: try Self.qemuTCG, memory: "64M", startPaused: true)) { machine in
                seen.withLock { $0 = (machine, machine.directory) }
                let qmp = try machine.qmp
                #expect(qmp.greeting["QMP"]?["version"]?["qemu"]?["major"]?.intValue ?? 0 >= 7)
                let status = try await qmp.execute("query-status", timeout: .seconds(10))
                #expect(status["status"] == "prelaunch")
                #expect(status["running"] == false)
                #expect(try !machine.console.isClosed)
                #expect(machine.isRunning)
                let cmdline = try String(contentsOfFile: machine.directory + "/cmdline.txt", encoding: .utf8)
                #expect(cmdline.contains(" -m 64M -S -qmp unix:"))
            }
            let (machine, directory) = seen.withLock { $0 }
            let vm = try #require(machine)
            // `quit` worked, so no signal was needed, and the process was reaped.
            #expect(vm.exitStatus == .exited(0))
            #expect(kill(vm.pid, 0) == -1 && errno == ESRCH)
            #expect(try vm.qmp.isClosed)
            #expect(try vm.console.isClosed)
            if ProcessInfo.processInfo.environment[ArtifactDirectory.keepEnvironmentKey] == nil {
                #expect(!FileManager.default.fileExists(atPath: try #require(directory)))
            }
            // Nothing of this machine stays open: no log or socket file under its directory.
            let dir = try #require(directory)
            #expect(!ProcessResources.descriptors().contains { $0.hasPrefix(dir) }, "\(ProcessResources.descriptors())")
            #expect(await ProcessResources.settledDescriptorCount(expecting: fdsBefore) == fdsBefore, "\(ProcessResources.descriptors())")
        }

        @Test(.requiresBinary(qemu)) func qemuFailureKeepsArtifacts() async throws {
            struct Deliberate: Error {}
            let seen = Mutex<String?>(nil)
            await #expect(throws: Deliberate.self) {
                try await Machine.with(MachineOptions(binary: try Self.qemuTCG, startPaused: true)) { machine in
                    seen.withLock { $0 = machine.directory }
                    _ = try await machine.qmp.execute("query-status", timeout: .seconds(10))
                    throw Deliberate()
                }
            }
            let directory = try #require(seen.withLock { $0 })
            defer { try? FileManager.default.removeItem(atPath: directory) }
            for file in ["cmdline.txt", "stdout.log", "stderr.log", "console.log", "qmp.log", "exit-status.txt", "failure.txt"] {
                #expect(FileManager.default.fileExists(atPath: directory + "/" + file), "\(file)")
            }
            let qmpLog = try String(contentsOfFile: directory + "/qmp.log", encoding: .utf8)
            #expect(qmpLog.contains(">>> {\"execute\": \"query-status\""))
            #expect(qmpLog.contains("\"quit\""))
            #expect(try String(contentsOfFile: directory + "/exit-status.txt", encoding: .utf8) == "exited with status 0 (after quit)\n")
        }

        @Test(.requiresBinary(qemu)) func qemuQuitFromTheTestAndWait() async throws {
            try await Machine.with(MachineOptions(binary: try Self.qemuTCG, startPaused: true)) { machine in
                let qmp = try machine.qmp
                try await qmp.execute("quit", timeout: .seconds(10))
                #expect(try await machine.wait(timeout: .seconds(10)) == .exited(0))
                let shutdown = try await qmp.waitForEvent("SHUTDOWN", timeout: .seconds(5))
                #expect(shutdown.data["reason"] == "host-qmp-quit")
                #expect(!machine.isRunning)
                // Shutting down an exited machine is a no-op that reports the same status.
                #expect(await machine.shutdown() == .exited(0))
            }
        }

        @Test(.requiresBinary(qemu)) func twoMachinesInOneScope() async throws {
            let directories = Mutex<[String]>([])
            try await withArtifacts { artifacts in
                let source = try await Machine.launch(MachineOptions(binary: try Self.qemuTCG, name: "source", startPaused: true), in: artifacts)
                let target = try await Machine.launch(
                    MachineOptions(binary: try Self.qemuTCG, name: "target", startPaused: true, arguments: ["-incoming", "defer"]),
                    in: artifacts)
                directories.withLock { $0 = [artifacts.path, source.directory, target.directory] }
                #expect(source.directory == artifacts.path + "/source")
                #expect(target.directory == artifacts.path + "/target")
                #expect(try await target.qmp.execute("query-status", timeout: .seconds(10))["status"] == "inmigrate")
                // Killing one (a migration peer dying) does not disturb the other.
                target.kill()
                #expect(try await target.wait(timeout: .seconds(10)) == .signaled(SIGKILL))
                #expect(try await source.qmp.execute("query-status", timeout: .seconds(10))["status"] == "prelaunch")
            }
        }

        @Test(.requiresBinary(qemu)) func withoutQMPShutdownUsesSIGTERM() async throws {
            let seen = Mutex<(Machine?, ArtifactDirectory?)>((nil, nil))
            try await withArtifacts { artifacts in
                let machine = try await Machine.launch(MachineOptions(binary: try Self.qemuTCG, startPaused: true, connectQMP: false), in: artifacts)
                seen.withLock { $0 = (machine, artifacts) }
                #expect(throws: MachineError.self) { try machine.qmp }
                #expect(try !machine.console.isClosed)
                #expect(try !String(contentsOfFile: machine.directory + "/cmdline.txt", encoding: .utf8).contains("-qmp"))
            }
            let (machine, artifacts) = seen.withLock { $0 }
            #expect(machine?.exitStatus != nil)
            // The expected way to stop a VMM without QMP: not a reason to keep anything.
            #expect(artifacts?.keepReasons == [])
        }

        @Test(.requiresBinary(qemu)) func droppedMachineIsKilledAndReaped() async throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            var pid: pid_t = 0
            do {
                // Neither `shutdown` nor `finish`: dropping the directory drops the last
                // reference to the machine, whose deinit must still kill and reap the VMM.
                let artifacts = try ArtifactDirectory(testName: "dropped", base: base)
                let machine = try await Machine.launch(MachineOptions(binary: try Self.qemuTCG, startPaused: true), in: artifacts)
                pid = machine.pid
                #expect(kill(pid, 0) == 0)
            }
            #expect(pid > 0)
            #expect(kill(pid, 0) == -1 && errno == ESRCH)
        }

        @Test(.requiresKVM, .requiresBinary(qemu)) func qemuWithKVM() async throws {
            try await Machine.with(MachineOptions(binary: try VMMBinary.named(Self.qemu), startPaused: true)) { machine in
                let kvm = try await machine.qmp.execute("query-kvm", timeout: .seconds(10))
                #expect(kvm["enabled"] == true)
                #expect(try await machine.qmp.execute("query-status", timeout: .seconds(10))["status"] == "prelaunch")
            }
        }

        @Test(.requiresKVM, .requiresBinary(qemu), .requiresGuestImage) func qemuBootsTheBundledGuest() async throws {
            try await Machine.with(MachineOptions(binary: try VMMBinary.named(Self.qemu), kernel: BundledGuest.image, memory: "64M")) { machine in
                let console = try machine.console
                try await console.waitForPrompt(timeout: .seconds(120))
                #expect(try await console.run("echo hello", expect: "hello", timeout: .seconds(60)) == "hello")
            }
        }
    }

    @Suite(.countsProcessResources) struct LeakTests {
        @Test func connectAndCloseLeavesNoFdOrThread() async throws {
            let threadsBefore = await ProcessResources.settledTestKitThreads(expecting: 0)
            var inodes: [String] = []
            do {
                let (qmpFD, server, _) = try FakeQMP.start()
                let (consoleFD, guest) = try FakeGuest.start(outputDelay: .zero)
                inodes = [qmpFD, consoleFD].compactMap(ProcessResources.socketInode)
                let qmp = try await QMPClient.connect(takingOwnershipOf: qmpFD, timeout: .seconds(5))
                let console = try Console(takingOwnershipOf: consoleFD)
                _ = try await qmp.execute("query-status", timeout: .seconds(5))
                _ = try await console.run("echo hi", expect: "hi", timeout: .seconds(5))
                // Both readers have run by now, so they carry their names.
                #expect(ProcessResources.testKitThreads() == threadsBefore + 2)
                qmp.close()
                console.close()
                server.close()
                guest.close()
            }
            #expect(inodes.count == 2)
            let open = Set(ProcessResources.descriptors())
            for inode in inodes { #expect(!open.contains(inode), "\(inode) still open") }
            #expect(await ProcessResources.settledTestKitThreads(expecting: threadsBefore) == threadsBefore)
        }

        @Test func fdCountIsStableAcrossACycle() async throws {
            // Other suites may open fds meanwhile; retry a few cycles before calling it a leak.
            var deltas: [Int] = []
            for _ in 0..<10 {
                let before = ProcessResources.descriptors().count
                let (qmpFD, server, _) = try FakeQMP.start()
                let qmp = try await QMPClient.connect(takingOwnershipOf: qmpFD, timeout: .seconds(5))
                _ = try await qmp.execute("query-status", timeout: .seconds(5))
                qmp.close()
                server.close()
                deltas.append(ProcessResources.descriptors().count - before)
                if deltas.last == 0 { break }
            }
            #expect(deltas.last == 0, "fd count deltas: \(deltas)")
        }

        @Test func droppedClientsCloseTheirSockets() async throws {
            let (qmpFD, server, _) = try FakeQMP.start()
            defer { server.close() }
            let inode = try #require(ProcessResources.socketInode(qmpFD))
            do {
                let qmp = try await QMPClient.connect(takingOwnershipOf: qmpFD, timeout: .seconds(5))
                _ = try await qmp.execute("query-status", timeout: .seconds(5))
            }
            #expect(!ProcessResources.descriptors().contains(inode))
        }
    }
}
