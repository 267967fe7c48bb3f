import QMPWire

/// How a migration ended on both sides, as `MigrationWaiter.waitForFinish` saw it.
public struct MigrationOutcome: Sendable, Equatable, CustomStringConvertible {
    /// The `status` of the side's `MIGRATION` end event (`completed`, `failed`, `cancelled`),
    /// or why there was none (`no MIGRATION end event within 30s`).
    public var sourceStatus: String
    public var targetStatus: String
    /// `query-status`'s `status` once the events are in (`postmigrate`, `paused`, `running`),
    /// or `unreachable: <error>` when the side no longer answers, e.g. because it exited.
    public var sourceRunState: String
    public var targetRunState: String

    public init(sourceStatus: String, targetStatus: String, sourceRunState: String, targetRunState: String) {
        self.sourceStatus = sourceStatus
        self.targetStatus = targetStatus
        self.sourceRunState = sourceRunState
        self.targetRunState = targetRunState
    }

    /// Both sides' end statuses and run states as pairs, `(source, target)`.
    public init(ends: (source: String, target: String), runStates: (source: String, target: String)) {
        self.init(sourceStatus: ends.source, targetStatus: ends.target, sourceRunState: runStates.source, targetRunState: runStates.target)
    }

    /// `source: completed/postmigrate, target: completed/paused`.
    public var description: String {
        "source: \(sourceStatus)/\(sourceRunState), target: \(targetStatus)/\(targetRunState)"
    }
}

/// A migration that ended otherwise than expected (or not at all).
public struct MigrationWaitError: Error, CustomStringConvertible {
    public var outcome: MigrationOutcome
    /// What was expected, in the same shape.
    public var expected: MigrationOutcome
    /// `query-migrate`'s `error-desc` on the source, when it reported one.
    public var sourceError: String?
    /// What else explains the outcome: a side's exit status and stderr tail, a hint.
    public var details: [String] = []

    public var description: String {
        "migration did not end as expected: \(outcome) (expected \(expected))"
            + (sourceError.map { "; source error-desc: \($0)" } ?? "")
            + details.map { "\n" + $0 }.joined()
    }
}

/// QEMU's `wait_migration_finish` for TestKit: waits for both sides' `MIGRATION` end
/// events, then checks both run states.
///
/// Both sides need the `events` migration capability (`migrate-set-capabilities`), or no
/// `MIGRATION` event is sent at all. The end events are consumed from the client's buffer,
/// so an event that came before the call counts, and each migration of a round trip is
/// waited for with its own call.
public enum MigrationWaiter {
    /// The `MIGRATION` statuses after which nothing more happens (`cancelling` is not one).
    public static let endStatuses = ["completed", "failed", "cancelled"]

    /// Bounds each `query-status`/`query-migrate`: the side has already reported its end,
    /// so a slow answer means it is stuck, and `timeout` (sized for the migration) is too long.
    static let queryTimeout: Duration = .seconds(10)

    /// Turns on the `events` migration capability, without which a VMM sends no
    /// `MIGRATION` event (QEMU's default too).
    public static func enableEvents(on machine: Machine) async throws {
        try await machine.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [["capability": "events", "state": true]]])
    }

    /// The status of the next (or buffered) `MIGRATION` end event of one side. Throws the
    /// client's `QMPError.timeout` or `.disconnected`.
    public static func waitForEnd(of qmp: QMPClient, timeout: Duration) async throws -> String {
        let event = try await qmp.waitForAnyEvent(
            endStatuses.map { (name: "MIGRATION", matching: ["status": .string($0)]) }, timeout: timeout)
        return event.data["status"]?.stringValue ?? ""
    }

    /// Waits (up to `timeout`, both sides at once) for each side's `MIGRATION` end event, then
    /// runs `query-status` on both. Throws `MigrationWaitError`, with all four values, unless
    /// the events and run states are the expected ones. A side that died or hangs is reported
    /// in the error, not thrown as a QMP error.
    @discardableResult
    public static func waitForFinish(
        source: QMPClient, target: QMPClient,
        expecting: (source: String, target: String) = ("completed", "completed"),
        runStates: (source: String, target: String) = ("postmigrate", "paused"),
        timeout: Duration
    ) async throws -> MigrationOutcome {
        async let sourceEnd = endStatus(of: source, timeout: timeout)
        async let targetEnd = endStatus(of: target, timeout: timeout)
        let (sourceStatus, targetStatus) = try await (sourceEnd, targetEnd)
        async let sourceState = runState(of: source)
        async let targetState = runState(of: target)
        let outcome = MigrationOutcome(ends: (sourceStatus, targetStatus), runStates: (try await sourceState, try await targetState))
        let expected = MigrationOutcome(ends: expecting, runStates: runStates)
        guard outcome != expected else { return outcome }
        let info = try? await source.execute("query-migrate", timeout: queryTimeout)
        var details: [String] = []
        for (side, qmp, status) in [("source", source, sourceStatus), ("target", target, targetStatus)]
        where status.hasPrefix("no MIGRATION end event") {
            if let hint = await eventsHint(qmp, side: side) { details.append(hint) }
        }
        throw MigrationWaitError(outcome: outcome, expected: expected, sourceError: info?["error-desc"]?.stringValue, details: details)
    }

    /// Waits for both sides like `waitForFinish(source:target:)` on their QMP clients, but
    /// a side's end also counts when its `query-migrate` reports it (polled, as QEMU's
    /// tests do), so the `events` capability is not needed; and when a side died, the
    /// error carries its exit status and the end of its stderr, where the VMM says why.
    @discardableResult
    public static func waitForFinish(
        source: Machine, target: Machine,
        expecting: (source: String, target: String) = ("completed", "completed"),
        runStates: (source: String, target: String) = ("postmigrate", "paused"),
        timeout: Duration
    ) async throws -> MigrationOutcome {
        let deadline = ContinuousClock.now + timeout
        async let sourceEnd = polledEndStatus(of: source, until: deadline, timeout: timeout)
        async let targetEnd = polledEndStatus(of: target, until: deadline, timeout: timeout)
        let (sourceStatus, targetStatus) = try await (sourceEnd, targetEnd)
        async let sourceState = runState(of: source)
        async let targetState = runState(of: target)
        let outcome = MigrationOutcome(ends: (sourceStatus, targetStatus), runStates: (try await sourceState, try await targetState))
        let expected = MigrationOutcome(ends: expecting, runStates: runStates)
        guard outcome != expected else { return outcome }
        let info = try? await source.qmp.request("query-migrate", arguments: nil, timeout: queryTimeout, recordingFailure: false)
        var details: [String] = []
        for (side, machine) in [("source", source), ("target", target)] {
            // A side that exited by itself says why on stderr; so may a live one that failed.
            let status = machine.exitStatus.map { "\($0)" } ?? "running"
            let tail = machine.stderrTail(10)
            details.append("\(side) (\(status)), stderr" + (tail.isEmpty ? ": empty" : ":\n" + tail.map { "  | \($0)" }.joined(separator: "\n")))
        }
        throw MigrationWaitError(
            outcome: outcome, expected: expected, sourceError: info?["return"]?["error-desc"]?.stringValue, details: details)
    }

    /// The side's end: a `MIGRATION` end event, or `query-migrate` showing an end status,
    /// whichever comes first; checked at once and then every 100 ms until `deadline`. (A
    /// cpr-transfer target may have completed before its monitor even took a client, so
    /// its event went to no one: waiting 100 ms first only kept its guest paused longer.)
    private static func polledEndStatus(of machine: Machine, until deadline: ContinuousClock.Instant, timeout: Duration) async throws -> String {
        let qmp = try machine.qmp
        let candidates = endStatuses.map { (name: "MIGRATION", matching: Optional(JSON.object(["status": .string($0)]))) }
        while true {
            try Task.checkCancellation()
            if let status = machine.exitStatus { return "VMM \(status)" }
            if let info = try? await qmp.request("query-migrate", arguments: nil, timeout: queryTimeout, recordingFailure: false),
               let status = info["return"]?["status"]?.stringValue, endStatuses.contains(status) {
                // With events on, the event went out before this reply on the same socket:
                // consume it, so that a later wait on this machine does not take it for its own.
                _ = try? await qmp.awaitEvent(candidates, timeout: .zero)
                return status
            }
            if ContinuousClock.now >= deadline { return "no MIGRATION end within \(seconds(timeout))" }
            let slice = min(.milliseconds(100), max(.zero, deadline - .now))
            do {
                let event = try await qmp.awaitEvent(candidates, timeout: slice)
                return event.data["status"]?.stringValue ?? ""
            } catch QMPError.timeout {
            } catch is CancellationError {
                throw CancellationError()
            } catch {
                if let status = machine.exitStatus { return "VMM \(status)" }
                return "no MIGRATION end event: \(error)"
            }
        }
    }

    /// "enable the events capability" when the side's migration ended but no event came.
    private static func eventsHint(_ qmp: QMPClient, side: String) async -> String? {
        guard let info = try? await qmp.request("query-migrate", arguments: nil, timeout: queryTimeout, recordingFailure: false),
              let status = info["return"]?["status"]?.stringValue else { return nil }
        guard endStatuses.contains(status) else { return "\(side): query-migrate says '\(status)'" }
        let capabilities = try? await qmp.request("query-migrate-capabilities", arguments: nil, timeout: queryTimeout, recordingFailure: false)
        let events = capabilities?["return"]?.arrayValue?.first { $0["capability"] == "events" }?["state"]?.boolValue
        if events != true {
            return "\(side): query-migrate says '\(status)', but no MIGRATION event came: enable the events capability"
                + " (migrate-set-capabilities {\"capabilities\": [{\"capability\": \"events\", \"state\": true}]})"
                + " or wait with MigrationWaiter.waitForFinish(source: Machine, target: Machine, ...), which polls"
        }
        return "\(side): query-migrate says '\(status)', but no MIGRATION event for it came"
    }

    private static func endStatus(of qmp: QMPClient, timeout: Duration) async throws -> String {
        do {
            return try await waitForEnd(of: qmp, timeout: timeout)
        } catch QMPError.timeout {
            return "no MIGRATION end event within \(seconds(timeout))"
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            return "no MIGRATION end event: \(error)"
        }
    }

    private static func runState(of machine: Machine) async throws -> String {
        if let status = machine.exitStatus { return "exited: \(status)" }
        return try await runState(of: machine.qmp)
    }

    private static func runState(of qmp: QMPClient) async throws -> String {
        do {
            let status = try await qmp.execute("query-status", timeout: queryTimeout)
            return status["status"]?.stringValue ?? "unknown: \(status.serialized)"
        } catch is CancellationError {
            throw CancellationError()
        } catch {
            return "unreachable: \(error)"
        }
    }

    /// `30s`, `0.25s`.
    static func seconds(_ duration: Duration) -> String {
        let (seconds, attoseconds) = duration.components
        if attoseconds == 0 { return "\(seconds)s" }
        return "\(Double(seconds) + Double(attoseconds) / 1e18)s"
    }
}
