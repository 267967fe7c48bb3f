import Foundation
import Synchronization

/// What to look for on the console: literal text, or a regular expression
/// (Swift Regex syntax, matched on Unicode scalars so that "\n" matches inside "\r\n").
public struct ConsolePattern: Sendable, Equatable, CustomStringConvertible, ExpressibleByStringLiteral {
    enum Kind: Sendable, Equatable {
        case text(String)
        case regex(String)
    }
    let kind: Kind

    public static func text(_ text: String) -> ConsolePattern { ConsolePattern(kind: .text(text)) }

    /// Throws now if `source` is not a valid regex, rather than at the first match.
    public static func regex(_ source: String) throws -> ConsolePattern {
        _ = try Regex(source)
        return ConsolePattern(kind: .regex(source))
    }

    init(kind: Kind) { self.kind = kind }
    public init(stringLiteral value: String) { kind = .text(value) }

    public var description: String {
        switch kind {
        case .text(let text): return text.debugDescription
        case .regex(let source): return "/\(source)/"
        }
    }

    /// Byte range of the first match in `bytes`. Text is compared byte by byte: Swift's
    /// String comparison works on grapheme clusters, where "\r\n" is one character and
    /// would never match "\n".
    func firstMatch(in bytes: ArraySlice<UInt8>) -> Range<Int>? {
        switch kind {
        case .text(let text):
            let needle = Array(text.utf8)
            guard !needle.isEmpty else { return bytes.startIndex..<bytes.startIndex }
            guard bytes.count >= needle.count else { return nil }
            var i = bytes.startIndex
            let last = bytes.endIndex - needle.count
            while i <= last {
                if bytes[i] == needle[0], bytes[i..<i + needle.count].elementsEqual(needle) {
                    return i..<i + needle.count
                }
                i += 1
            }
            return nil
        case .regex(let source):
            guard let regex = try? Regex(source).matchingSemantics(.unicodeScalar) else { return nil }
            let text = String(decoding: bytes, as: UTF8.self)
            guard let match = text.firstMatch(of: regex) else { return nil }
            let start = text.utf8.distance(from: text.startIndex, to: match.range.lowerBound)
            let end = text.utf8.distance(from: text.startIndex, to: match.range.upperBound)
            // Invalid UTF-8 decodes to a 3-byte U+FFFD; clamp so that offsets stay in the buffer.
            return bytes.startIndex + min(start, bytes.count)..<bytes.startIndex + min(end, bytes.count)
        }
    }
}

public enum ConsoleError: Error, Equatable, CustomStringConvertible {
    case timeout(pattern: String, after: Duration, lastLines: [String])
    /// The failure pattern appeared before the expected one.
    case failurePattern(pattern: String, matched: String, lastLines: [String])
    /// The VMM closed the console before the pattern appeared.
    case closed(pattern: String, lastLines: [String])
    /// Output arrived while the console was expected to stay silent.
    case unexpectedOutput(String, during: Duration, lastLines: [String])

    public var description: String {
        func tail(_ lines: [String]) -> String {
            lines.isEmpty ? " (console empty)" : "; last console lines:\n" + lines.map { "  | \($0)" }.joined(separator: "\n")
        }
        switch self {
        case .timeout(let pattern, let after, let lines):
            return "console: timed out after \(after) waiting for \(pattern)" + tail(lines)
        case .failurePattern(let pattern, let matched, let lines):
            return "console: failure pattern \(pattern) appeared (\(matched.debugDescription))" + tail(lines)
        case .closed(let pattern, let lines):
            return "console: closed while waiting for \(pattern)" + tail(lines)
        case .unexpectedOutput(let text, let during, let lines):
            return "console: expected no output for \(during), got \(text.debugDescription)" + tail(lines)
        }
    }
}

/// Drives a serial console over a stream socket, like a user at a terminal.
///
/// Everything received is kept; `waitFor` consumes it front to back, so a pattern is
/// only found after the end of the previous match, and each `waitFor` returns the text
/// between the two.
public final class Console: Sendable {
    public static let defaultTimeout: Duration = .seconds(60)
    /// The bundled guest's shell prompt (and busybox's).
    public static let prompt = "# "
    /// How many console lines an error shows.
    public static let tailLineCount = 20

    private struct Waiter {
        var pattern: ConsolePattern
        var failure: ConsolePattern?
        var shot: OneShot<String>
    }

    private struct State {
        var received: [UInt8] = []
        /// Bytes before this were returned by an earlier wait.
        var cursor = 0
        var waiters: [Waiter] = []
        var closed = false

        /// Resolves the front waiters that the buffer now satisfies, in order.
        mutating func serveWaiters() {
            while let waiter = waiters.first {
                if waiter.shot.isResolved {
                    waiters.removeFirst()
                    continue
                }
                guard let outcome = match(waiter.pattern, failure: waiter.failure) else {
                    if closed {
                        waiters.removeFirst()
                        waiter.shot.resolve(.failure(ConsoleError.closed(pattern: waiter.pattern.description, lastLines: lastLines())))
                        continue
                    }
                    return
                }
                waiters.removeFirst()
                if waiter.shot.resolve(outcome.result) { cursor = outcome.end }
            }
        }

        /// The earliest of the pattern and the failure pattern; the failure wins when it
        /// starts before the pattern ends, since then it was printed first.
        func match(_ pattern: ConsolePattern, failure: ConsolePattern?) -> (result: Result<String, any Error>, end: Int)? {
            let unread = received[cursor...]
            let success = pattern.firstMatch(in: unread)
            if let failure, let bad = failure.firstMatch(in: unread), success.map({ bad.lowerBound < $0.upperBound }) ?? true {
                let error = ConsoleError.failurePattern(
                    pattern: failure.description, matched: String(decoding: received[bad], as: UTF8.self),
                    lastLines: lastLines())
                return (.failure(error), bad.upperBound)
            }
            guard let success else { return nil }
            return (.success(String(decoding: received[cursor..<success.upperBound], as: UTF8.self)), success.upperBound)
        }

        func lastLines(_ count: Int = Console.tailLineCount) -> [String] {
            // Enough bytes for 20 terminal lines; decoding the whole transcript could be megabytes.
            // Split as bytes: as Characters, "\r\n" is one grapheme and never equals "\n".
            var lines = received.suffix(count * 160)
                .split(separator: UInt8(ascii: "\n"), omittingEmptySubsequences: false)
                .map { line in String(decoding: line.last == UInt8(ascii: "\r") ? line.dropLast() : line, as: UTF8.self) }
            if lines.last == "" { lines.removeLast() }
            return Array(lines.suffix(count))
        }
    }

    private final class Core: Sendable {
        let state = Mutex(State())
        let transcript: LogFile?

        init(transcript: LogFile?) { self.transcript = transcript }

        func receive(_ bytes: [UInt8]) {
            transcript?.write(bytes)
            state.withLock { state in
                state.received.append(contentsOf: bytes)
                state.serveWaiters()
            }
        }

        func end() {
            state.withLock { state in
                state.closed = true
                state.serveWaiters()
            }
        }
    }

    private let core: Core
    private let stream: SocketStream
    private let onWaitFailure: (@Sendable (String) -> Void)?

    /// Takes ownership of `fd` (also when it throws). `transcriptPath` gets every byte
    /// received, raw; the guest echoes input, so what was typed appears there too.
    public init(
        takingOwnershipOf fd: Int32, transcriptPath: String? = nil,
        onWaitFailure: (@Sendable (String) -> Void)? = nil
    ) throws {
        let transcript: LogFile?
        do {
            transcript = try transcriptPath.map { path throws(SystemError) in try LogFile(path: path) }
        } catch {
            closeDescriptor(fd)
            throw error
        }
        let core = Core(transcript: transcript)
        self.core = core
        self.onWaitFailure = onWaitFailure
        stream = try SocketStream(
            takingOwnershipOf: fd, threadName: "tk-console-rd",
            onData: { core.receive($0) }, onEnd: { _ in core.end() })
    }

    /// Waits until `pattern` appears after what earlier waits consumed, and returns the
    /// text up to and including it. Throws `failurePattern` if `failure` shows up first.
    @discardableResult
    public func waitFor(
        _ pattern: String, failure: String? = nil, timeout: Duration = defaultTimeout
    ) async throws -> String {
        try await waitFor(.text(pattern), failure: failure.map { .text($0) }, timeout: timeout)
    }

    @discardableResult
    public func waitFor(
        _ pattern: ConsolePattern, failure: ConsolePattern? = nil, timeout: Duration = defaultTimeout
    ) async throws -> String {
        let shot = OneShot<String>()
        core.state.withLock { state in
            state.waiters.append(Waiter(pattern: pattern, failure: failure, shot: shot))
            state.serveWaiters()
        }
        do {
            return try await shot.value(timeout: timeout) { [core] in
                ConsoleError.timeout(pattern: pattern.description, after: timeout, lastLines: core.state.withLock { $0.lastLines() })
            }
        } catch {
            onWaitFailure?("\(error)")
            throw error
        }
    }

    @discardableResult
    public func waitForPrompt(timeout: Duration = defaultTimeout) async throws -> String {
        try await waitFor(Self.prompt, timeout: timeout)
    }

    /// Succeeds when the guest prints nothing for `duration`, e.g. while its vCPU is
    /// stopped. Consumes nothing.
    public func expectSilence(for duration: Duration) async throws {
        let before = core.state.withLock { $0.received.count }
        try await Task.sleep(for: duration)
        let extra = core.state.withLock { String(decoding: $0.received[before...], as: UTF8.self) }
        guard extra.isEmpty else {
            let error = ConsoleError.unexpectedOutput(extra, during: duration, lastLines: lastLines())
            onWaitFailure?("\(error)")
            throw error
        }
    }

    /// Types `text` as is.
    public func send(_ text: String) throws {
        do {
            try stream.write(Array(text.utf8))
        } catch {
            throw ConsoleError.closed(pattern: "(sending \(text.debugDescription))", lastLines: lastLines())
        }
    }

    /// Types `command` and Enter, waits for the guest to echo that line, then waits for
    /// `expect` (the prompt when nil) and returns the output after the echoed line up to
    /// and including the match. Matching only after the echo is what keeps
    /// `run("echo hello", expect: "hello")` from matching its own echo. `timeout` covers
    /// the whole exchange; `failure` applies to the output only, so that a command that
    /// mentions the failure text does not trip on its own echo.
    @discardableResult
    public func run(
        _ command: String, expect: String? = nil, failure: String? = nil, timeout: Duration = defaultTimeout
    ) async throws -> String {
        try await run(command, expect: .text(expect ?? Self.prompt), failure: failure.map { .text($0) }, timeout: timeout)
    }

    /// `run` with patterns, e.g. `.regex(#"scribble ok, round \d+\r?\n"#)`.
    @discardableResult
    public func run(
        _ command: String, expect: ConsolePattern, failure: ConsolePattern? = nil, timeout: Duration = defaultTimeout
    ) async throws -> String {
        let deadline = ContinuousClock.now + timeout
        func remaining() -> Duration { max(.zero, deadline - ContinuousClock.now) }
        try send(command + "\r")
        try await waitFor(.text(command), timeout: remaining())
        try await waitFor(.text("\n"), timeout: remaining())
        return try await waitFor(expect, failure: failure, timeout: remaining())
    }

    /// Everything received so far, consumed or not.
    public var transcript: String { core.state.withLock { String(decoding: $0.received, as: UTF8.self) } }

    /// The last lines received, without line ends; what the errors show.
    public func lastLines(_ count: Int = tailLineCount) -> [String] { core.state.withLock { $0.lastLines(count) } }

    public var isClosed: Bool { core.state.withLock { $0.closed } }

    /// Closes the socket and joins the reader; idempotent. Pending waits fail with `closed`.
    public func close() {
        stream.close()
        core.end()
        core.transcript?.close()
    }

    deinit { close() }
}
