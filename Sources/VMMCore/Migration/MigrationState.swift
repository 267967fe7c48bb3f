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
    var startTime: Int64 = 0
    var setupDoneTime: Int64 = 0
    var stopTime: Int64 = 0
    var endTime: Int64 = 0
    var ramTotal: UInt64 = 0
    /// Bytes of RAM sent/received so far, updated by the transfer thread.
    let ramTransferred = Atomic<UInt64>(0)
    let pagesTransferred = Atomic<UInt64>(0)
    var runStateBefore: RunState = .running
    var incomingListener: Int32 = -1
    var incomingPath: String?

    var isActive: Bool { [.setup, .active, .device, .cancelling].contains(status) }
}
