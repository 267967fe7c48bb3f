import Foundation
import Synchronization
import Testing
@testable import TestKit

extension TestKitTests {
    @Suite struct ArtifactsTests {
        struct Boom: Error {}

        @Test func keepDecision() {
            #expect(!ArtifactDirectory.shouldKeep(bodyError: nil, keepReasons: [], environment: [:]))
            #expect(ArtifactDirectory.shouldKeep(bodyError: Boom(), keepReasons: [], environment: [:]))
            #expect(ArtifactDirectory.shouldKeep(bodyError: nil, keepReasons: ["console timeout"], environment: [:]))
            #expect(ArtifactDirectory.shouldKeep(bodyError: nil, keepReasons: [], environment: ["TESTKIT_KEEP_ARTIFACTS": "1"]))
            #expect(!ArtifactDirectory.shouldKeep(bodyError: nil, keepReasons: [], environment: ["TESTKIT_KEEP_ARTIFACTS": "0"]))
        }

        @Test func namesAreSanitizedAndUnique() throws {
            #expect(ArtifactDirectory.sanitize("launch(options:) with spaces") == "launch_options___with_spaces")
            #expect(ArtifactDirectory.sanitize("()") == "test")
            #expect(ArtifactDirectory.sanitize(String(repeating: "x", count: 100)).count == 40)

            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            let a = try ArtifactDirectory(testName: "same name", base: base)
            let b = try ArtifactDirectory(testName: "same name", base: base)
            #expect(a.path != b.path)
            #expect((a.path as NSString).lastPathComponent.hasPrefix("testkit-same_name-\(getpid())-"))
            #expect(a.path.hasPrefix(base + "/"))
        }

        @Test func defaultsToTheCurrentTestName() throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            let artifacts = try ArtifactDirectory(base: base)
            #expect(artifacts.testName == "defaultsToTheCurrentTestName()")
            #expect(artifacts.path.contains("testkit-defaultsToTheCurrentTestName-"))
        }

        @Test func baseComesFromTheEnvironment() throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            let artifacts = try ArtifactDirectory(testName: "t", environment: ["TESTKIT_ARTIFACTS": base + "/nested"])
            #expect(artifacts.path.hasPrefix(base + "/nested/testkit-t-"))
        }

        @Test func removedWhenNothingFailed() async throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            let artifacts = try ArtifactDirectory(testName: "ok", base: base)
            try "x".write(toFile: artifacts.file("qmp.log"), atomically: false, encoding: .utf8)
            #expect(await artifacts.finish(bodyError: nil, environment: [:]) == nil)
            #expect(!FileManager.default.fileExists(atPath: artifacts.path))
        }

        @Test func keptWhenAWaitFailedOrTheBodyThrew() async throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }

            let waited = try ArtifactDirectory(testName: "wait", base: base)
            waited.keep("console: timed out")
            #expect(await waited.finish(bodyError: nil, environment: [:]) == waited.path)
            #expect(try String(contentsOfFile: waited.file("failure.txt"), encoding: .utf8).contains("console: timed out"))

            let threw = try ArtifactDirectory(testName: "threw", base: base)
            #expect(await threw.finish(bodyError: Boom(), environment: [:]) == threw.path)
            #expect(try String(contentsOfFile: threw.file("failure.txt"), encoding: .utf8).contains("Boom"))

            let forced = try ArtifactDirectory(testName: "forced", base: base)
            #expect(await forced.finish(bodyError: nil, environment: ["TESTKIT_KEEP_ARTIFACTS": "1"]) == forced.path)
        }

        /// The issue an `#expect` records, as `.keepsArtifactsOnFailure` sees it inside a
        /// `withArtifacts` scope: the directory is kept and failure.txt quotes the issue
        /// with its comment. (Captured through `withKnownIssue`, so this test passes.)
        @Test func failedExpectationKeepsTheDirectoryWithTheTrait() async throws {
            let captured = Mutex<Issue?>(nil)
            withKnownIssue {
                #expect(1 + 1 == 3, "the ping report would be here")
            } matching: { issue in
                captured.withLock { $0 = issue }
                return true
            }
            let issue = try #require(captured.withLock { $0 })
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            let artifacts = try ArtifactDirectory(testName: "expect", base: base)
            ArtifactDirectory.$current.withValue(artifacts) {
                _ = IssueHandlingTrait.keepsArtifactsOnFailure.handleIssue(issue)
            }
            #expect(await artifacts.finish(bodyError: nil, environment: [:]) == artifacts.path)
            let failure = try String(contentsOfFile: artifacts.file("failure.txt"), encoding: .utf8)
            #expect(failure.contains("the ping report would be here"), "\(failure)")
        }

        @Test func failedRequireIsRenderedWithItsLocation() {
            let rendered = Mutex<String?>(nil)
            withKnownIssue {
                do {
                    try #require(1 + 1 == 3)
                } catch {
                    rendered.withLock { $0 = ArtifactDirectory.render(error) }
                }
            }
            let text = rendered.withLock { $0 } ?? ""
            #expect(text.hasPrefix("#require failed at TestKitArtifactsTests.swift:"), "\(text)")
            #expect(ArtifactDirectory.render(Boom()) == "\(Boom())")
        }

        @Test func withArtifactsKeepsOnThrowAndRunsCleanupsFirst() async throws {
            let order = Mutex<[String]>([])
            let seen = Mutex<String?>(nil)
            await #expect(throws: Boom.self) {
                try await withArtifacts(testName: "scoped") { artifacts in
                    seen.withLock { $0 = artifacts.path }
                    artifacts.addCleanup { order.withLock { $0.append("first registered") } }
                    artifacts.addCleanup {
                        // Cleanups run before the decision, so the directory still exists.
                        order.withLock { $0.append(FileManager.default.fileExists(atPath: artifacts.path) ? "second registered" : "gone") }
                    }
                    throw Boom()
                }
            }
            #expect(order.withLock { $0 } == ["second registered", "first registered"])
            let path = try #require(seen.withLock { $0 })
            #expect(FileManager.default.fileExists(atPath: path + "/failure.txt"))
            try FileManager.default.removeItem(atPath: path)
        }

        @Test func machineDirectories() throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            let artifacts = try ArtifactDirectory(testName: "dirs", base: base)
            #expect(try artifacts.directory(forMachine: nil) == artifacts.path)
            #expect(try artifacts.directory(forMachine: nil) == artifacts.path + "/vm2")
            #expect(try artifacts.directory(forMachine: "target") == artifacts.path + "/target")
            #expect(FileManager.default.fileExists(atPath: artifacts.path + "/target"))
        }
    }

    @Suite struct BinaryTests {
        @Test func bundledVMMIsFoundNextToTheTestBinary() {
            #expect(VMMBinary.bundledCandidates(executable: "/p/.build/debug/PkgPackageTests.xctest")
                == ["/p/.build/debug/vmm"])
            #expect(VMMBinary.bundledCandidates(executable: "/p/.build/debug/Pkg.xctest/Contents/MacOS/Pkg")
                == ["/p/.build/debug/Pkg.xctest/Contents/MacOS/vmm", "/p/.build/debug/vmm"])
            #expect(VMMBinary.bundledCandidates(executable: "/p/.build/debug/vmm-bench") == ["/p/.build/debug/vmm"])
        }

        @Test func missingBundledVMMSaysHowToFixIt() {
            #expect(throws: VMMBinaryError.self) { try VMMBinary.bundled(executable: "/nonexistent/dir/tests") }
            let message = "\(VMMBinaryError.bundledNotBuilt(searched: ["/x/vmm"]))"
            #expect(message.contains("TESTKIT_VMM"))
        }

        @Test func environmentOverride() throws {
            let sh = try VMMBinary.resolve(environment: ["TESTKIT_VMM": "sh", "PATH": "/usr/bin:/bin"])
            #expect(sh.name == "sh")
            #expect(sh.defaultArguments.isEmpty)
            let qemuLike = VMMBinary(path: "/usr/bin/qemu-system-x86_64")
            #expect(qemuLike.isQEMU)
            #expect(qemuLike.defaultArguments == VMMBinary.qemuDefaultArguments)
            let custom = try VMMBinary.resolve(
                environment: ["TESTKIT_VMM": "/bin/sh", "TESTKIT_VMM_ARGS": "-machine  q35 -accel tcg"])
            #expect(custom.defaultArguments == ["-machine", "q35", "-accel", "tcg"])
            #expect(throws: VMMBinaryError.self) {
                try VMMBinary.resolve(environment: ["TESTKIT_VMM": "no-such-vmm-binary", "PATH": "/nonexistent"])
            }
        }

        @Test func guestImagePath() {
            #expect(BundledGuest.image(environment: ["TESTKIT_GUEST": "/g.elf"]) == "/g.elf")
            let bundled = BundledGuest.image(environment: [:])
            #expect(bundled.hasSuffix("/assets/guest/guest.elf"))
            #expect(FileManager.default.fileExists(atPath: BundledGuest.packageRoot + "/Package.swift"))
        }

        @Test func shellQuoting() {
            #expect(Machine.shellQuoted("-qmp") == "-qmp")
            #expect(Machine.shellQuoted("unix:/tmp/a b") == "'unix:/tmp/a b'")
            #expect(Machine.shellQuoted("it's") == "'it'\\''s'")
            #expect(Machine.shellQuoted("") == "''")
        }

        @Test func requirementReasonsNameTheProblem() {
            #expect(HostRequirement.kvmUnavailable(path: "/nonexistent/kvm") == "/nonexistent/kvm: No such file or directory")
            #expect(HostRequirement.vhostNetUnavailable(path: "/nonexistent/vhost-net")
                    == "/nonexistent/vhost-net: No such file or directory (kernel vhost-net; try modprobe vhost_net)")
            #expect(HostRequirement.binaryMissing("no-such-binary-xyz") == "no-such-binary-xyz not found on PATH")
            #expect(HostRequirement.binaryMissing("sh") == nil)
            if let reason = HostRequirement.missingCapabilities() {
                #expect(reason.contains("CAP_"))
            }
        }

        @Test(.requiresRoot) func rootTraitMeansTheCapabilitiesAreThere() {
            #expect(HostRequirement.missingCapabilities() == nil)
        }

        @Test func exitStatusDecoding() {
            #expect(ExitStatus(waitStatus: 0) == .exited(0))
            #expect(ExitStatus(waitStatus: 3 << 8) == .exited(3))
            #expect(ExitStatus(waitStatus: 9) == .signaled(9))
            #expect(ExitStatus(waitStatus: 15 | 0x80) == .signaled(15))  // with core-dump bit
        }
    }
}
