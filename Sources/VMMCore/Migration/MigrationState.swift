import QMPWire
import Synchronization

/// Migration status, capabilities, parameters and statistics, as QMP reports them.
/// Owned by the control thread; the transfer thread reports through `progress`.
public final class MigrationState: @unchecked Sendable {
    public enum Status: String, Sendable {
        case none, setup, active, device, completed, failed, cancelling, cancelled
    }

    var status: Status = .none
    var capabilities: [String: Bool] = ["events": false, "x-ignore-shared": false]
    var parameters: [String: JSON] = ["local": false, "mode": "normal", "downtime-limit": 300, "max-bandwidth": 134_217_728]
    var error: String?
    /// Monotonic nanoseconds: migrate issued, setup done, guest stopped, finished.
    var startTime: Int64 = 0
    var setupDoneTime: Int64 = 0
    var stopTime: Int64 = 0
    var endTime: Int64 = 0
    var ramTotal: UInt64 = 0
    /// Updated by the transfer thread: RAM bytes on the wire, pages sent with data,
    /// zero pages, dirty bytes left after the last sync, log syncs, expected downtime (ms).
    let ramTransferred = Atomic<UInt64>(0)
    let pagesTransferred = Atomic<UInt64>(0)
    let zeroPages = Atomic<UInt64>(0)
    let ramRemaining = Atomic<UInt64>(0)
    let dirtySyncCount = Atomic<UInt64>(0)
    let expectedDowntime = Atomic<Int64>(0)
    /// Set by migrate_cancel; the transfer thread stops at its next section.
    let cancelRequested = Atomic<Bool>(false)
    var runStateBefore: RunState = .running
    /// This side sends (migrate) rather than receives; only a sender can cancel.
    var outgoing = false
    /// The outgoing connection, set by the transfer thread once connected, so that
    /// migrate_cancel (control thread) can shut it down.
    let channel = Mutex<MigrationChannel?>(nil)
    var dirtyLogging = false
    /// cpr-transfer: the devices let go (`prepareForHandover`); a failure takes it back.
    var handoverPrepared = false
    /// migrate-incoming's `exit-on-error`: a target whose load failed exits (status 1).
    var exitOnError = true
    /// The target's migration, from the first `-incoming`/`migrate-incoming` on.
    var incoming: IncomingMigration?
    /// The channels this target was given, and the listeners not yet connected to.
    var incomingChannels = MigrationChannels()
    var incomingListeners: [MigrationChannelType: FileDescriptor] = [:]
    /// Accept each listener's one connection, backing off when out of fds (as QMP's do).
    var incomingAcceptors: [MigrationChannelType: ClientAcceptor] = [:]
    var incomingPaths: [MigrationChannelType: String] = [:]
    /// A cpr-transfer target's cpr channel, held open until the main channel listens:
    /// the source connects that one once this one closes (QEMU's HUP).
    var cprChannel: MigrationChannel?
    /// The thread that read the cpr state, waiting to read the main channel too.
    var incomingReader: IncomingReader?

    func reset(ramTotal: UInt64, now: Int64) {
        error = nil
        startTime = now
        setupDoneTime = 0
        stopTime = 0
        endTime = 0
        self.ramTotal = ramTotal
        ramTransferred.store(0, ordering: .relaxed)
        pagesTransferred.store(0, ordering: .relaxed)
        zeroPages.store(0, ordering: .relaxed)
        ramRemaining.store(0, ordering: .relaxed)
        dirtySyncCount.store(0, ordering: .relaxed)
        expectedDowntime.store(0, ordering: .relaxed)
        cancelRequested.store(false, ordering: .relaxed)
        // The timeline is not cleared: the end of every migration takes it, and a
        // cpr-transfer target's marks from before its main channel connected belong to it.
    }

    /// Named moments of the switch-over, from any thread, logged at debug level when the
    /// migration ends: where a downtime went.
    private let timeline = Mutex<[(String, Int64)]>([])

    func mark(_ moment: String) {
        let now = monotonicNanoseconds()
        timeline.withLock { $0.append((moment, now)) }
    }

    /// "at T us: stop +0 us, captured +85 us, ..." relative to the first mark (T is
    /// CLOCK_MONOTONIC, shared by source and target on one host); empties the timeline.
    func takeTimeline() -> String {
        let marks = timeline.withLock { t -> [(String, Int64)] in
            defer { t.removeAll() }
            return t
        }
        guard let first = marks.first?.1 else { return "" }
        return "at \(first / 1000) us: " + marks.map { "\($0.0) +\(($0.1 - first) / 1000) us" }.joined(separator: ", ")
    }

    func checkCancelled() throws {
        if cancelRequested.load(ordering: .relaxed) { throw MigrationCancelled() }
    }

    var isActive: Bool { [.setup, .active, .device, .cancelling].contains(status) }
}

struct MigrationCancelled: Error, CustomStringConvertible {
    var description: String { "migration cancelled" }
}
