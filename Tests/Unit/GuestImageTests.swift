import Foundation
import Testing

/// The committed guest image must be what its sources build, so nobody boots a stale
/// binary. Rebuilding needs only the Swift toolchain this test already runs on.
@Suite struct GuestImageTests {
    @Test(.timeLimit(.minutes(2))) func committedImageMatchesSources() throws {
        let output = FileManager.default.temporaryDirectory.appendingPathComponent("guest-\(getpid()).elf").path
        defer { try? FileManager.default.removeItem(atPath: output) }
        let process = Process()
        process.executableURL = URL(fileURLWithPath: "/bin/bash")
        process.arguments = [packageRoot + "/assets/guest/build.sh", output]
        let pipe = Pipe()
        process.standardOutput = pipe
        process.standardError = pipe
        try process.run()
        let log = String(decoding: pipe.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
        process.waitUntilExit()
        try #require(process.terminationStatus == 0, "build.sh failed:\n\(log)")
        let rebuilt = try Data(contentsOf: URL(fileURLWithPath: output))
        let committed = try Data(contentsOf: URL(fileURLWithPath: packageRoot + "/assets/guest/guest.elf"))
        #expect(rebuilt == committed, "assets/guest/guest.elf is stale: run assets/guest/build.sh and commit the result")
    }
}
