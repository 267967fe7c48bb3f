import Foundation
import Synchronization
import Testing
@testable import TestKit

extension TestKitTests {
    @Suite struct ConsoleTests {
        @Test func waitForReturnsTextUpToMatchAndConsumesIt() async throws {
            let (client, guestFD) = try UnixSocket.pair()
            let guest = try FakePeer(fd: guestFD, onBytes: { _, _ in })
            defer { guest.close() }
            let console = try Console(takingOwnershipOf: client)
            defer { console.close() }

            guest.write("booting...\r\nbanner v1\r\n")
            guest.write("# ")
            #expect(try await console.waitFor("banner", timeout: .seconds(5)) == "booting...\r\nbanner")
            // The second wait starts after the first match, not at the beginning.
            #expect(try await console.waitFor("\n", timeout: .seconds(5)) == " v1\r\n")
            #expect(try await console.waitForPrompt(timeout: .seconds(5)) == "# ")
        }

        @Test func matchesAPatternSplitAcrossReads() async throws {
            let (client, guestFD) = try UnixSocket.pair()
            let guest = try FakePeer(fd: guestFD, onBytes: { _, _ in })
            defer { guest.close() }
            let console = try Console(takingOwnershipOf: client)
            defer { console.close() }

            async let found = console.waitFor("ready!", timeout: .seconds(5))
            guest.write("system rea")
            try await Task.sleep(for: .milliseconds(30))
            guest.write("dy!\r\n")
            #expect(try await found == "system ready!")
        }

        @Test func newlineMatchesInsideCRLF() async throws {
            let (client, guestFD) = try UnixSocket.pair()
            let guest = try FakePeer(fd: guestFD, onBytes: { _, _ in })
            defer { guest.close() }
            let console = try Console(takingOwnershipOf: client)
            defer { console.close() }

            guest.write("line one\r")
            try await Task.sleep(for: .milliseconds(20))
            guest.write("\nline two\r\n")
            // Swift's String sees "\r\n" as one Character; byte matching must still find "\n".
            #expect(try await console.waitFor("\n", timeout: .seconds(5)) == "line one\r\n")
            #expect(try await console.waitFor("two\r\n", timeout: .seconds(5)) == "line two\r\n")
        }

        @Test func regexPattern() async throws {
            let (client, guestFD) = try UnixSocket.pair()
            let guest = try FakePeer(fd: guestFD, onBytes: { _, _ in })
            defer { guest.close() }
            let console = try Console(takingOwnershipOf: client)
            defer { console.close() }

            guest.write("ticks=12345\r\n# ")
            let text = try await console.waitFor(try .regex("ticks=[0-9]+\\r?\\n"), timeout: .seconds(5))
            #expect(text == "ticks=12345\r\n")
            #expect(throws: (any Error).self) { try ConsolePattern.regex("(unclosed") }
        }

        @Test func failurePatternSeenFirstThrows() async throws {
            let (client, guestFD) = try UnixSocket.pair()
            let guest = try FakePeer(fd: guestFD, onBytes: { _, _ in })
            defer { guest.close() }
            let failures = FailureLog()
            let console = try Console(takingOwnershipOf: client, onWaitFailure: failures.record)
            defer { console.close() }

            guest.write("starting\r\nKernel panic: oops\r\nlogin: ")
            let error = await #expect(throws: ConsoleError.self) {
                try await console.waitFor("login:", failure: "panic", timeout: .seconds(5))
            }
            guard case .failurePattern(_, let matched, let lines) = error else {
                Issue.record("wrong error \(String(describing: error))")
                return
            }
            #expect(matched == "panic")
            #expect(lines.contains("Kernel panic: oops"))
            #expect(failures.count == 1)
            // A failure text that comes after the expected one does not count.
            guest.write("\r\nOK\r\nlater panic\r\n")
            #expect(try await console.waitFor("OK", failure: "panic", timeout: .seconds(5)).hasSuffix("OK"))
        }

        @Test func timeoutShowsLastLines() async throws {
            let (client, guestFD) = try UnixSocket.pair()
            let guest = try FakePeer(fd: guestFD, onBytes: { _, _ in })
            defer { guest.close() }
            let console = try Console(takingOwnershipOf: client)
            defer { console.close() }

            for i in 1...30 { guest.write("line \(i)\r\n") }
            try await console.waitFor("line 30\r\n", timeout: .seconds(5))
            let error = await #expect(throws: ConsoleError.self) {
                try await console.waitFor("never", timeout: .milliseconds(200))
            }
            guard case .timeout(let pattern, _, let lines) = error else {
                Issue.record("wrong error \(String(describing: error))")
                return
            }
            #expect(pattern == "\"never\"")
            #expect(lines.count == 20)
            #expect(lines.first == "line 11")
            #expect(lines.last == "line 30")
            #expect("\(error!)".contains("line 30"))
            // The timed-out waiter must not swallow later output.
            guest.write("never mind\r\n")
            #expect(try await console.waitFor("mind", timeout: .seconds(5)).hasSuffix("never mind"))
        }

        @Test func closedConsoleFailsWaits() async throws {
            let (client, guestFD) = try UnixSocket.pair()
            let guest = try FakePeer(fd: guestFD, onBytes: { _, _ in })
            let console = try Console(takingOwnershipOf: client)
            defer { console.close() }

            guest.write("bye\r\n")
            let waiting = Task { try await console.waitFor("never", timeout: .seconds(10)) }
            try await Task.sleep(for: .milliseconds(50))
            guest.close()
            await #expect(throws: ConsoleError.self) { try await waiting.value }
            // What arrived before the close can still be matched.
            #expect(try await console.waitFor("bye", timeout: .seconds(1)) == "bye")
            #expect(console.isClosed)
        }

        @Test func runMatchesOutputAfterTheEchoedCommand() async throws {
            let (client, guest) = try FakeGuest.start(outputDelay: .milliseconds(100))
            defer { guest.close() }
            let console = try Console(takingOwnershipOf: client)
            defer { console.close() }

            // The echo "echo hello" contains "hello"; only the output line may match.
            #expect(try await console.run("echo hello", expect: "hello", timeout: .seconds(5)) == "hello")
            _ = try await console.waitForPrompt(timeout: .seconds(5))
            #expect(try await console.run("echo one two", timeout: .seconds(5)) == "one two\r\n# ")
            #expect(console.transcript.contains("echo hello\r\nhello\r\n# "))
        }

        @Test func runFailurePatternAppliesToOutputOnly() async throws {
            let (client, guest) = try FakeGuest.start()
            defer { guest.close() }
            let console = try Console(takingOwnershipOf: client)
            defer { console.close() }

            // The echoed command line contains "echo" but must not trip the failure pattern.
            #expect(try await console.run("echo fine", expect: "fine", failure: "echo", timeout: .seconds(5)) == "fine")
            _ = try await console.waitForPrompt(timeout: .seconds(5))
            await #expect(throws: ConsoleError.self) {
                try await console.run("fail", expect: "done", failure: "PANIC", timeout: .seconds(5))
            }
        }

        @Test func transcriptFileGetsEveryByte() async throws {
            let directory = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let path = directory + "/console.log"
            let (client, guestFD) = try UnixSocket.pair()
            let guest = try FakePeer(fd: guestFD, onBytes: { _, _ in })
            defer { guest.close() }
            let console = try Console(takingOwnershipOf: client, transcriptPath: path)
            guest.write("hello\r\n# ")
            _ = try await console.waitForPrompt(timeout: .seconds(5))
            console.close()
            #expect(try String(contentsOfFile: path, encoding: .utf8) == "hello\r\n# ")
        }
    }
}

/// Counts `onWaitFailure` calls.
final class FailureLog: Sendable {
    private let reasons = Mutex<[String]>([])
    var count: Int { reasons.withLock { $0.count } }
    var all: [String] { reasons.withLock { $0 } }
    func add(_ reason: String) { reasons.withLock { $0.append(reason) } }
    var record: @Sendable (String) -> Void { { [self] reason in add(reason) } }
}
