import Foundation
import Synchronization
import Testing

/// The files one test leaves behind: for each VMM `cmdline.txt`, `stdout.log`,
/// `stderr.log`, `console.log`, `qmp.log`, `exit-status.txt`; `ping-N.txt` with every
/// pinger's per-sequence record; `failure.txt` saying why the directory was kept.
///
/// The directory is kept when the scoped body throws, when any TestKit wait failed
/// inside it (even if the test caught the error), when a failed `#expect` was recorded
/// inside it in a test or suite with the `.keepsArtifactsOnFailure` trait, when
/// `keep(_:)` is called, or when `TESTKIT_KEEP_ARTIFACTS=1`; otherwise it is removed.
public final class ArtifactDirectory: Sendable {
    /// The innermost `withArtifacts` directory around the current task: where pingers
    /// write their records and where a failed expectation is noted.
    @TaskLocal public static var current: ArtifactDirectory?

    public static let baseEnvironmentKey = "TESTKIT_ARTIFACTS"
    public static let keepEnvironmentKey = "TESTKIT_KEEP_ARTIFACTS"

    public let path: String
    public let testName: String
    /// When the scope began: kernel messages from then on go to dmesg.txt when kept.
    let started = Date()
    /// The namespace the scope ran in (`NetworkNamespace.scope` at creation): its links
    /// and addresses go to netns.txt when kept, while it still exists.
    let namespace: NetworkNamespace? = NetworkNamespace.scope

    private struct State {
        var shortSocketDirectory: String?
        var keepReasons: [String] = []
        var cleanups: [@Sendable () async -> Void] = []
        var claimedRoot = false
        var subdirectories = 0
        var files = 0
        var finished = false
    }
    private let state = Mutex(State())

    private static let counter = Atomic<Int>(0)

    /// Creates `<base>/testkit-<test name>-<pid>-<n>`; base is `$TESTKIT_ARTIFACTS` or the temp dir.
    public init(
        testName: String? = nil,
        base: String? = nil,
        environment: [String: String] = ProcessInfo.processInfo.environment
    ) throws {
        let name = testName ?? Test.current?.name ?? "untitled"
        let base = base ?? environment[Self.baseEnvironmentKey] ?? FileManager.default.temporaryDirectory.path
        try FileManager.default.createDirectory(atPath: base, withIntermediateDirectories: true)
        let stem = "testkit-\(Self.sanitize(name))-\(getpid())"
        while true {
            let n = Self.counter.wrappingAdd(1, ordering: .relaxed).newValue
            let candidate = (base as NSString).appendingPathComponent("\(stem)-\(n)")
            if mkdir(candidate, 0o755) == 0 {
                path = candidate
                break
            }
            // A leftover from an earlier run with the same pid: take the next number.
            guard errno == EEXIST else { throw SystemError("mkdir \(candidate)") }
        }
        self.testName = name
    }

    /// Test names become file names: `launch(_:) ` → `launch__`; long ones are cut so that
    /// socket paths inside the directory still fit in `sun_path`.
    public static func sanitize(_ name: String) -> String {
        let allowed = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")
        var result = String(name.map { allowed.contains($0) ? $0 : "_" })
        while result.hasSuffix("_") { result.removeLast() }
        if result.isEmpty { result = "test" }
        return String(result.prefix(40))
    }

    public func file(_ name: String) -> String { (path as NSString).appendingPathComponent(name) }

    /// Where a VMM's files go: the directory itself for the first unnamed VMM (the common
    /// single-VM test), a subdirectory per name otherwise (`source/`, `target/`).
    public func directory(forMachine name: String?) throws -> String {
        let chosen: String? = state.withLock { state in
            if let name { return name }
            if !state.claimedRoot {
                state.claimedRoot = true
                return nil
            }
            state.subdirectories += 1
            return "vm\(state.subdirectories + 1)"
        }
        guard let chosen else { return path }
        let directory = file(Self.sanitize(chosen))
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        return directory
    }

    /// A path for a unix socket named `leaf`: inside this directory when it fits
    /// `sun_path` (108 bytes), else in a short `/tmp/testkit-XXXXXX` directory that is
    /// removed when this directory finishes. For migration sockets and the like.
    public func socketPath(_ leaf: String) throws -> String {
        let inside = file(leaf)
        if inside.utf8.count <= UnixSocket.maxPathLength { return inside }
        let directory = try state.withLock { state -> String in
            if let existing = state.shortSocketDirectory { return existing }
            let created = try Self.makeShortSocketDirectory()
            state.shortSocketDirectory = created
            return created
        }
        return directory + "/" + leaf
    }

    /// Creates `/tmp/testkit-XXXXXX`, short enough for any socket name under it; the
    /// caller removes it. Inside a scope, prefer `socketPath(_:)`, which cleans up.
    public static func makeShortSocketDirectory() throws -> String {
        var template = Array("/tmp/testkit-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw SystemError("mkdtemp /tmp/testkit-XXXXXX") }
        return String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
    }

    /// A new file name `STEM-N.EXTENSION` (N counts from 1 per directory), for records
    /// of which a test may make several, like pinger reports.
    public func numberedFile(_ stem: String, extension ext: String) -> String {
        let n = state.withLock { state in
            state.files += 1
            return state.files
        }
        return file("\(stem)-\(n).\(ext)")
    }

    /// Keeps the directory whatever happens next; TestKit calls this when one of its waits fails.
    public func keep(_ reason: String) {
        state.withLock { $0.keepReasons.append(reason) }
    }

    public var keepReasons: [String] { state.withLock { $0.keepReasons } }

    /// Runs when the scope ends, before the keep/remove decision, newest first
    /// (machines registered later are shut down first).
    public func addCleanup(_ cleanup: @escaping @Sendable () async -> Void) {
        state.withLock { $0.cleanups.append(cleanup) }
    }

    /// The pure decision, separate so that it can be tested without a filesystem.
    public static func shouldKeep(bodyError: (any Error)?, keepReasons: [String], environment: [String: String]) -> Bool {
        if let value = environment[keepEnvironmentKey], !["", "0", "false", "no"].contains(value.lowercased()) {
            return true
        }
        return bodyError != nil || !keepReasons.isEmpty
    }

    /// Runs the cleanups, then keeps or removes the directory. Returns the path when kept.
    /// A kept directory gets `failure.txt` and is announced on stderr and, inside a test,
    /// as a warning issue (a warning, so that a test that caught an expected error still passes).
    @discardableResult
    public func finish(
        bodyError: (any Error)?,
        environment: [String: String] = ProcessInfo.processInfo.environment,
        sourceLocation: SourceLocation = #_sourceLocation
    ) async -> String? {
        let cleanups: [@Sendable () async -> Void]? = state.withLock { state in
            if state.finished { return nil }
            state.finished = true
            defer { state.cleanups = [] }
            return state.cleanups
        }
        guard let cleanups else { return nil }
        for cleanup in cleanups.reversed() { await cleanup() }
        if let short = state.withLock({ $0.shortSocketDirectory }) { try? FileManager.default.removeItem(atPath: short) }

        let reasons = keepReasons
        guard Self.shouldKeep(bodyError: bodyError, keepReasons: reasons, environment: environment) else {
            try? FileManager.default.removeItem(atPath: path)
            return nil
        }
        var summary = reasons
        if let bodyError { summary.insert("test body threw: \(Self.render(bodyError))", at: 0) }
        if summary.isEmpty { summary = ["\(Self.keepEnvironmentKey) is set"] }
        try? (summary.joined(separator: "\n") + "\n").write(toFile: file("failure.txt"), atomically: false, encoding: .utf8)
        await gatherHostEvidence()
        if Test.current != nil { attachFiles(sourceLocation: sourceLocation) }
        let message = "TestKit: artifacts of \(testName) kept at \(path) (\(summary[0]))"
        FileHandle.standardError.write(Data((message + "\n").utf8))
        if Test.current != nil, bodyError != nil || !reasons.isEmpty {
            Issue.record(Comment(rawValue: message), severity: .warning, sourceLocation: sourceLocation)
        }
        return path
    }
}

extension ArtifactDirectory {
    /// dmesg.txt: the kernel's messages since the scope began (KVM, TAP and OOM reports
    /// land there); netns.txt: `ip -d link` and `ip addr` of the scope's namespace.
    func gatherHostEvidence() async {
        let since = Date(timeIntervalSince1970: started.timeIntervalSince1970.rounded(.down) - 1)
        let formatter = DateFormatter()
        formatter.locale = Locale(identifier: "en_US_POSIX")
        formatter.timeZone = TimeZone(identifier: "UTC")
        formatter.dateFormat = "yyyy-MM-dd HH:mm:ss"
        await ChildProcess.run(["dmesg", "--time-format", "iso", "--since", formatter.string(from: since)], appendingTo: file("dmesg.txt"))
        if let namespace, !namespace.isDeleted {
            for command in [["ip", "-n", namespace.name, "-d", "link"], ["ip", "-n", namespace.name, "addr"]] {
                await ChildProcess.run(command, appendingTo: file("netns.txt"))
            }
        }
    }

    /// Attaches every file of the kept directory to the running test (up to 4 MiB each),
    /// so `swift test --attachments-path DIR` collects them with the test's name.
    func attachFiles(sourceLocation: SourceLocation) {
        guard let walker = FileManager.default.enumerator(atPath: path) else { return }
        for case let relative as String in walker {
            let full = file(relative)
            guard let attributes = try? FileManager.default.attributesOfItem(atPath: full),
                  attributes[.type] as? FileAttributeType == .typeRegular,
                  let size = attributes[.size] as? Int, size <= 4 << 20,
                  let data = FileManager.default.contents(atPath: full) else { continue }
            Attachment.record([UInt8](data), named: relative.replacingOccurrences(of: "/", with: "_"), sourceLocation: sourceLocation)
        }
    }

    /// What a failure says in failure.txt. A failed `#require` throws an error whose dump
    /// says nothing; the issue it recorded (with the comment, e.g. a ping report) is
    /// in failure.txt too when the test has `.keepsArtifactsOnFailure`.
    static func render(_ error: any Error) -> String {
        if let failed = error as? ExpectationFailedError {
            let location = failed.expectation.sourceLocation
            return "#require failed at \(location.fileName):\(location.line) (the expectation's issue follows when recorded)"
        }
        return "\(error)"
    }
}

extension Trait where Self == IssueHandlingTrait {
    /// Keeps TestKit's artifact directory (`withArtifacts`, `Machine.with`, the fixtures)
    /// when an `#expect` or `#require` fails inside it, and writes the issue, comments
    /// included, to its failure.txt. Put it on a suite to cover all its tests:
    /// `@Suite(.keepsArtifactsOnFailure, .requiresKVM, ...)`.
    public static var keepsArtifactsOnFailure: Self {
        .compactMapIssues { issue in
            if issue.isFailure, let directory = ArtifactDirectory.current {
                directory.keep("issue recorded: \(issue)")
            }
            return issue
        }
    }
}

/// Runs `body` with a fresh artifact directory; see `ArtifactDirectory` for when it is kept.
/// Cleanups registered inside (e.g. machines launched in it) always run, also on throw.
/// `sourceLocation` is where the "artifacts kept" warning points: the test, not TestKit.
public func withArtifacts<T>(
    testName: String? = nil,
    isolation: isolated (any Actor)? = #isolation,
    sourceLocation: SourceLocation = #_sourceLocation,
    _ body: (ArtifactDirectory) async throws -> T
) async throws -> T {
    let artifacts = try ArtifactDirectory(testName: testName)
    let result: T
    do {
        result = try await ArtifactDirectory.$current.withValue(artifacts) { try await body(artifacts) }
    } catch {
        await artifacts.finish(bodyError: error, sourceLocation: sourceLocation)
        throw error
    }
    await artifacts.finish(bodyError: nil, sourceLocation: sourceLocation)
    return result
}
