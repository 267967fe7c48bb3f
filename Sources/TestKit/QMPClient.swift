import CLinux
import Foundation
import QMPWire
import Synchronization

/// An asynchronous QMP event as received.
public struct QMPEvent: Sendable, Equatable, CustomStringConvertible {
    public var name: String
    /// The `data` member; an empty object when the event has none.
    public var data: JSON
    public var timestamp: QMPTimestamp
    /// The whole message as received.
    public var message: JSON

    public init(message: JSON) {
        self.message = message
        name = message["event"]?.stringValue ?? ""
        data = message["data"] ?? .object(JSONObject())
        timestamp = QMPTimestamp(message["timestamp"]) ?? QMPTimestamp(seconds: 0, microseconds: 0)
    }

    public var description: String { message.serialized }

    /// `pattern` is a partial match on `data`, as QEMU's `events_wait` does.
    public func matches(name: String, data pattern: JSON?) -> Bool {
        self.name == name && (pattern.map { data.matches($0) } ?? true)
    }
}

public enum QMPError: Error, Equatable, CustomStringConvertible {
    /// The VMM answered with `{"error": {"class": ..., "desc": ...}}`.
    case commandFailed(class: String, desc: String, command: String)
    /// What was awaited (`reply to 'query-status'`, `event STOP`) did not come in time.
    case timeout(String, after: Duration)
    /// The connection ended while something was awaited, or before a command was sent.
    case disconnected
    /// The peer broke the protocol: a line that is not JSON, a reply with neither
    /// `return` nor `error`, a greeting that is not one.
    case protocolError(String)
    /// `expectNoEvent` saw the event it was told should not come.
    case unexpectedEvent(QMPEvent)

    public var description: String {
        switch self {
        case .commandFailed(let errorClass, let desc, let command):
            return "QMP command '\(command)' failed: \(errorClass): \(desc)"
        case .timeout(let what, let after):
            return "QMP: timed out after \(after) waiting for \(what)"
        case .disconnected:
            return "QMP: connection closed"
        case .protocolError(let message):
            return "QMP protocol error: \(message)"
        case .unexpectedEvent(let event):
            return "QMP: unexpected event \(event)"
        }
    }
}

/// A QMP client over a connected stream socket.
///
/// A dedicated reader thread parses each line and routes it: replies to the command
/// with the same `id`, events to the first waiter that matches or else to a buffer,
/// everything else (replies without a known id, unparseable lines) to the raw queue
/// that `readRawReply` reads.
public final class QMPClient: Sendable {
    public static let defaultTimeout: Duration = .seconds(30)

    private struct EventWaiter {
        var candidates: [(name: String, matching: JSON?)]
        var shot: OneShot<QMPEvent>
    }

    private struct State {
        var greeting: JSON?
        var nextID: Int64 = 1
        var pending: [Int64: OneShot<JSON>] = [:]
        var received: [QMPEvent] = []
        var unconsumed: [QMPEvent] = []
        var eventWaiters: [EventWaiter] = []
        var raw: [Result<JSON, QMPError>] = []
        var rawWaiters: [OneShot<JSON>] = []
        var splitter = LineSplitter()
        var closed = false
    }

    /// Shared with the reader thread's callbacks; holding it (not `self`) there lets
    /// the client deinit and close its socket.
    private final class Core: Sendable {
        let state = Mutex(State())
        let greetingShot = OneShot<JSON>()
        let log: LogFile?
        let onWaitFailure: (@Sendable (String) -> Void)?

        init(log: LogFile?, onWaitFailure: (@Sendable (String) -> Void)?) {
            self.log = log
            self.onWaitFailure = onWaitFailure
        }

        func receive(_ bytes: [UInt8]) {
            let lines = state.withLock { $0.splitter.append(bytes) }
            for line in lines where !line.trimmingCharacters(in: .whitespaces).isEmpty {
                log?.line("<<< \(line)")
                route(line)
            }
        }

        private func route(_ line: String) {
            let message: JSON
            do {
                message = try JSON.parse(line)
            } catch {
                deliverRaw(.failure(.protocolError("unparseable line (\(error)): \(line)")))
                return
            }
            if message["QMP"] != nil, state.withLock({ $0.greeting == nil }) {
                state.withLock { $0.greeting = message }
                greetingShot.resolve(.success(message))
                return
            }
            if message["event"] != nil {
                deliverEvent(QMPEvent(message: message))
                return
            }
            if let id = message["id"]?.intValue, let shot = state.withLock({ $0.pending.removeValue(forKey: id) }) {
                shot.resolve(.success(message))
                return
            }
            deliverRaw(.success(message))
        }

        private func deliverEvent(_ event: QMPEvent) {
            state.withLock { state in
                state.received.append(event)
                // In registration order; a waiter that already timed out refuses and is dropped.
                while let index = state.eventWaiters.firstIndex(where: { waiter in
                    waiter.shot.isResolved || waiter.candidates.contains { event.matches(name: $0.name, data: $0.matching) }
                }) {
                    let waiter = state.eventWaiters.remove(at: index)
                    if waiter.shot.resolve(.success(event)) { return }
                }
                state.unconsumed.append(event)
            }
        }

        private func deliverRaw(_ item: Result<JSON, QMPError>) {
            state.withLock { state in
                while !state.rawWaiters.isEmpty {
                    let shot = state.rawWaiters.removeFirst()
                    if shot.resolve(item.mapError { $0 as any Error }) { return }
                }
                state.raw.append(item)
            }
        }

        func end(_ error: SystemError?) {
            let first = state.withLock { state in
                defer { state.closed = true }
                return !state.closed
            }
            guard first else { return }
            let remainder = state.withLock { $0.splitter.remainder }
            if !remainder.isEmpty { log?.line("<<< (unterminated) \(remainder)") }
            log?.line("--- connection closed\(error.map { ": \($0)" } ?? "")")
            let (pending, events, raws) = state.withLock { state in
                defer {
                    state.pending = [:]
                    state.eventWaiters = []
                    state.rawWaiters = []
                }
                return (Array(state.pending.values), state.eventWaiters.map(\.shot), state.rawWaiters)
            }
            greetingShot.resolve(.failure(QMPError.disconnected))
            for shot in pending { shot.resolve(.failure(QMPError.disconnected)) }
            for shot in events { shot.resolve(.failure(QMPError.disconnected)) }
            for shot in raws { shot.resolve(.failure(QMPError.disconnected)) }
        }

        func failed(_ error: any Error) -> any Error {
            log?.line("--- \(error)")
            onWaitFailure?("\(error)")
            return error
        }
    }

    private let core: Core
    private let stream: SocketStream

    /// Takes ownership of `fd` (also when it throws) and starts reading. Nothing is sent:
    /// call `negotiate()` next, or use `connect`, which does both.
    /// `logPath` receives every line sent (`>>>`) and received (`<<<`) with timestamps.
    /// `onWaitFailure` is told about every failed wait (timeout, disconnect, protocol
    /// error), e.g. to keep the test's artifacts.
    public init(
        takingOwnershipOf fd: Int32, logPath: String? = nil,
        onWaitFailure: (@Sendable (String) -> Void)? = nil
    ) throws {
        let log: LogFile?
        do {
            log = try logPath.map { path throws(SystemError) in try LogFile(path: path) }
        } catch {
            closeDescriptor(fd)
            throw error
        }
        let core = Core(log: log, onWaitFailure: onWaitFailure)
        self.core = core
        stream = try SocketStream(
            takingOwnershipOf: fd, threadName: "tk-qmp-reader",
            onData: { core.receive($0) }, onEnd: { core.end($0) })
    }

    /// A client that has read the greeting and, unless `negotiate` is false, left
    /// capabilities negotiation mode. Takes ownership of `fd`.
    public static func connect(
        takingOwnershipOf fd: Int32, logPath: String? = nil, negotiate: Bool = true,
        timeout: Duration = defaultTimeout, onWaitFailure: (@Sendable (String) -> Void)? = nil
    ) async throws -> QMPClient {
        let client = try QMPClient(takingOwnershipOf: fd, logPath: logPath, onWaitFailure: onWaitFailure)
        do {
            _ = try await client.waitForGreeting(timeout: timeout)
            if negotiate { try await client.negotiate(timeout: timeout) }
        } catch {
            client.close()
            throw error
        }
        return client
    }

    /// Connects to a VMM's QMP server socket (`-qmp unix:PATH,server=on,wait=off`).
    public static func connect(
        path: String, logPath: String? = nil, negotiate: Bool = true, timeout: Duration = defaultTimeout,
        onWaitFailure: (@Sendable (String) -> Void)? = nil
    ) async throws -> QMPClient {
        try await connect(
            takingOwnershipOf: try UnixSocket.connect(path: path), logPath: logPath, negotiate: negotiate,
            timeout: timeout, onWaitFailure: onWaitFailure)
    }

    /// The greeting, `{"QMP": {"version": ..., "capabilities": [...]}}`; null before it arrived.
    public var greeting: JSON { core.state.withLock { $0.greeting } ?? .null }

    public func waitForGreeting(timeout: Duration = defaultTimeout) async throws -> JSON {
        do {
            return try await core.greetingShot.value(timeout: timeout) {
                QMPError.timeout("the greeting", after: timeout)
            }
        } catch {
            throw core.failed(error)
        }
    }

    public func negotiate(timeout: Duration = defaultTimeout) async throws {
        _ = try await execute("qmp_capabilities", timeout: timeout)
    }

    /// Runs a command and returns its `return` value; an `error` reply throws `commandFailed`.
    @discardableResult
    public func execute(
        _ command: String, arguments: JSONObject? = nil, timeout: Duration = defaultTimeout
    ) async throws -> JSON {
        try await execute(command, arguments: arguments, passing: [], timeout: timeout)
    }

    /// Like `execute`, with file descriptors attached (SCM_RIGHTS), e.g. for QMP `getfd`.
    /// The receiver gets copies; the caller still owns and closes `fds`.
    @discardableResult
    public func execute(
        _ command: String, arguments: JSONObject? = nil, passing fds: [Int32], timeout: Duration = defaultTimeout
    ) async throws -> JSON {
        let reply = try await request(command, arguments: arguments, timeout: timeout, recordingFailure: true, fds: fds)
        if let error = reply["error"] {
            throw QMPError.commandFailed(
                class: error["class"]?.stringValue ?? "", desc: error["desc"]?.stringValue ?? "", command: command)
        }
        guard let value = reply["return"] else {
            throw core.failed(QMPError.protocolError("reply to '\(command)' has neither return nor error: \(reply.serialized)"))
        }
        return value
    }

    /// Runs a command and returns the whole reply object, error or not.
    public func request(
        _ command: String, arguments: JSONObject? = nil, timeout: Duration = defaultTimeout
    ) async throws -> JSON {
        try await request(command, arguments: arguments, timeout: timeout, recordingFailure: true)
    }

    /// `recordingFailure` false: for `quit` during shutdown, where a VMM that closes the
    /// socket before answering is not a test failure.
    func request(
        _ command: String, arguments: JSONObject?, timeout: Duration, recordingFailure: Bool, fds: [Int32] = []
    ) async throws -> JSON {
        func failed(_ error: any Error) -> any Error { recordingFailure ? core.failed(error) : error }
        let shot = OneShot<JSON>()
        let id: Int64? = core.state.withLock { state in
            if state.closed { return nil }
            let id = state.nextID
            state.nextID += 1
            state.pending[id] = shot
            return id
        }
        guard let id else { throw failed(QMPError.disconnected) }
        var object: JSONObject = ["execute": .string(command)]
        if let arguments { object["arguments"] = .object(arguments) }
        object["id"] = .int(id)
        do {
            try send(JSON.object(object).serialized, fds: fds)
            return try await shot.value(timeout: timeout) {
                QMPError.timeout("reply to '\(command)'", after: timeout)
            }
        } catch {
            _ = core.state.withLock { $0.pending.removeValue(forKey: id) }
            if error is SystemError { throw failed(QMPError.disconnected) }
            throw failed(error)
        }
    }

    private func send(_ line: String, fds: [Int32] = []) throws(SystemError) {
        core.log?.line(">>> \(line)" + (fds.isEmpty ? "" : " (with fds \(fds))"))
        try stream.write(Array((line + "\r\n").utf8), fds: fds)
    }

    /// Sends bytes exactly as given (no line end added), for tests of malformed input.
    public func sendRaw(_ text: String) throws {
        core.log?.line(">>> (raw) \(text.debugDescription)")
        do {
            try stream.write(Array(text.utf8))
        } catch {
            throw QMPError.disconnected
        }
    }

    /// The next message that is neither an event nor the reply to a command sent with
    /// `execute`: e.g. the error QEMU sends for a line that is not a JSON object.
    public func readRawReply(timeout: Duration = defaultTimeout) async throws -> JSON {
        let shot = OneShot<JSON>()
        let ready: Result<JSON, QMPError>?? = core.state.withLock { state in
            if !state.raw.isEmpty { return .some(state.raw.removeFirst()) }
            if state.closed { return .some(nil) }
            state.rawWaiters.append(shot)
            return nil
        }
        switch ready {
        case .some(.some(.success(let message))): return message
        case .some(.some(.failure(let error))): throw core.failed(error)
        case .some(.none): throw core.failed(QMPError.disconnected)
        case .none: break
        }
        do {
            return try await shot.value(timeout: timeout) { QMPError.timeout("a raw reply", after: timeout) }
        } catch {
            throw core.failed(error)
        }
    }

    /// Every event received so far, consumed or not, in arrival order.
    public var events: [QMPEvent] { core.state.withLock { $0.received } }

    /// Forgets all events received so far; waits then only see later ones.
    public func clearEvents() {
        core.state.withLock { state in
            state.received = []
            state.unconsumed = []
        }
    }

    /// The first buffered or future event with this name whose `data` matches `matching`
    /// (partially, like QEMU's `events_wait`); consumes it.
    public func waitForEvent(
        _ name: String, matching: JSON? = nil, timeout: Duration = defaultTimeout
    ) async throws -> QMPEvent {
        try await waitForAnyEvent([(name: name, matching: matching)], timeout: timeout)
    }

    /// The first buffered or future event that matches any candidate; consumes it.
    public func waitForAnyEvent(
        _ candidates: [(name: String, matching: JSON?)], timeout: Duration = defaultTimeout
    ) async throws -> QMPEvent {
        do {
            return try await awaitEvent(candidates, timeout: timeout)
        } catch {
            throw core.failed(error)
        }
    }

    /// Succeeds when no such event arrives within `within`. The expected timeout is not a
    /// wait failure, so it does not keep the artifacts.
    public func expectNoEvent(_ name: String, matching: JSON? = nil, within: Duration) async throws {
        do {
            let event = try await awaitEvent([(name: name, matching: matching)], timeout: within)
            throw core.failed(QMPError.unexpectedEvent(event))
        } catch QMPError.timeout {
            return
        }
    }

    /// `waitForAnyEvent` without keeping the artifacts on timeout: for waiters that poll
    /// in slices and decide themselves what counts as a failure.
    func awaitEvent(
        _ candidates: [(name: String, matching: JSON?)], timeout: Duration
    ) async throws -> QMPEvent {
        let shot = OneShot<QMPEvent>()
        let ready: Result<QMPEvent, QMPError>? = core.state.withLock { state in
            if let index = state.unconsumed.firstIndex(where: { event in
                candidates.contains { event.matches(name: $0.name, data: $0.matching) }
            }) {
                return .success(state.unconsumed.remove(at: index))
            }
            if state.closed { return .failure(.disconnected) }
            state.eventWaiters.append(EventWaiter(candidates: candidates, shot: shot))
            return nil
        }
        if let ready { return try ready.get() }
        let what = candidates.map { c in "event \(c.name)" + (c.matching.map { " matching \($0.serialized)" } ?? "") }
            .joined(separator: " or ")
        return try await shot.value(timeout: timeout) { QMPError.timeout(what, after: timeout) }
    }

    public var isClosed: Bool { core.state.withLock { $0.closed } }

    /// Closes the socket and joins the reader thread; idempotent. Pending waits fail with `disconnected`.
    public func close() {
        stream.close()
        core.end(nil)
        core.log?.close()
    }

    deinit { close() }
}
