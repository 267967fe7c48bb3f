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

    public var description: String {
        "migration did not end as expected: \(outcome) (expected \(expected))"
            + (sourceError.map { "; source error-desc: \($0)" } ?? "")
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
        let outcome = MigrationOutcome(
            sourceStatus: sourceStatus, targetStatus: targetStatus,
            sourceRunState: try await sourceState, targetRunState: try await targetState)
        let expected = MigrationOutcome(
            sourceStatus: expecting.source, targetStatus: expecting.target,
            sourceRunState: runStates.source, targetRunState: runStates.target)
        guard outcome != expected else { return outcome }
        let info = try? await source.execute("query-migrate", timeout: queryTimeout)
        throw MigrationWaitError(outcome: outcome, expected: expected, sourceError: info?["error-desc"]?.stringValue)
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
