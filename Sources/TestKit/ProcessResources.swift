import Foundation
import Glibc
import Testing

/// Swift Testing runs suites in parallel in one process. A test that checks this process
/// leaks nothing (counts its fds or TestKit threads before and after) cannot tell its own
/// leftovers from those of a VM test running beside it. Tests that launch VMMs, pingers or
/// namespaces take this lock shared (`.usesProcessResources`); a leak check takes it
/// exclusively (`.countsProcessResources`) and so runs alone among them. Waiters are
/// served in arrival order, so a leak check is not starved by a stream of VM tests.
public actor ProcessResourceLock {
    public static let shared = ProcessResourceLock()

    private var sharedHolders = 0
    private var exclusiveHeld = false
    private var waiters: [(exclusive: Bool, continuation: CheckedContinuation<Void, Never>)] = []

    public func acquire(exclusive: Bool) async {
        if waiters.isEmpty && canGrant(exclusive) {
            grant(exclusive)
            return
        }
        await withCheckedContinuation { waiters.append((exclusive, $0)) }
    }

    public func release(exclusive: Bool) {
        if exclusive { exclusiveHeld = false } else { sharedHolders -= 1 }
        while let first = waiters.first, canGrant(first.exclusive) {
            waiters.removeFirst()
            grant(first.exclusive)
            first.continuation.resume()
        }
    }

    private func canGrant(_ exclusive: Bool) -> Bool {
        exclusive ? !exclusiveHeld && sharedHolders == 0 : !exclusiveHeld
    }

    private func grant(_ exclusive: Bool) {
        if exclusive { exclusiveHeld = true } else { sharedHolders += 1 }
    }
}

/// Holds `ProcessResourceLock` around each test case it applies to (recursively, on a suite).
public struct ProcessResourcesTrait: TestTrait, SuiteTrait, TestScoping {
    let exclusive: Bool

    public var isRecursive: Bool { true }

    public func scopeProvider(for test: Test, testCase: Test.Case?) -> Self? {
        testCase == nil ? nil : self
    }

    public func provideScope(
        for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void
    ) async throws {
        await ProcessResourceLock.shared.acquire(exclusive: exclusive)
        do {
            try await function()
        } catch {
            await ProcessResourceLock.shared.release(exclusive: exclusive)
            throw error
        }
        await ProcessResourceLock.shared.release(exclusive: exclusive)
    }
}

extension Trait where Self == ProcessResourcesTrait {
    /// For tests that start VMMs, pingers or namespaces: they may run side by side, but not
    /// while a `.countsProcessResources` test runs.
    public static var usesProcessResources: Self { ProcessResourcesTrait(exclusive: false) }

    /// For tests that compare this process's fds or threads before and after: no
    /// `.usesProcessResources` test runs meanwhile.
    public static var countsProcessResources: Self { ProcessResourcesTrait(exclusive: true) }
}

/// What a process holds, read from /proc: for leak checks across boots, migrations and
/// hops (`#expect(after.fileDescriptors == before.fileDescriptors)`).
public struct ProcessSnapshot: Sendable, Equatable, CustomStringConvertible {
    public var pid: Int32
    /// Entries in /proc/PID/fd.
    public var fileDescriptors: Int
    /// `Threads:` in /proc/PID/status.
    public var threads: Int
    /// `VmRSS:` in /proc/PID/status, in bytes.
    public var residentBytes: Int

    /// nil when the process is gone or /proc cannot be read.
    public init?(pid: Int32) {
        let base = "/proc/\(pid)"
        guard let fds = try? FileManager.default.contentsOfDirectory(atPath: base + "/fd"),
              let status = try? String(contentsOfFile: base + "/status", encoding: .utf8) else { return nil }
        func field(_ name: String) -> Int? {
            guard let line = status.split(separator: "\n").first(where: { $0.hasPrefix(name + ":") }) else { return nil }
            return line.split(whereSeparator: { !$0.isNumber }).first.flatMap { Int($0) }
        }
        guard let threads = field("Threads"), let rss = field("VmRSS") else { return nil }
        self.pid = pid
        fileDescriptors = fds.count
        self.threads = threads
        residentBytes = rss * 1024
    }

    /// This test process.
    public static func current() -> ProcessSnapshot? { ProcessSnapshot(pid: getpid()) }

    /// `/proc/PID/fd` entries with what each points to, for failure messages.
    public static func describeFileDescriptors(of pid: Int32) -> String {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/\(pid)/fd")) ?? []
        return entries.sorted { (Int($0) ?? 0) < (Int($1) ?? 0) }.map { fd in
            "\(fd)->\((try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(pid)/fd/\(fd)")) ?? "?")"
        }.joined(separator: " ")
    }

    public var description: String { "pid \(pid): \(fileDescriptors) fds, \(threads) threads, \(residentBytes >> 10) KiB resident" }
}
