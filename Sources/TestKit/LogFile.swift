import Glibc
import Synchronization

/// An append-only artifact file (qmp.log, console.log). Write errors are swallowed:
/// a full disk must not turn into a test failure that hides the real one.
final class LogFile: Sendable {
    let path: String
    private let fd: Mutex<Int32>

    init(path: String) throws(SystemError) {
        let fd = Glibc.open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SystemError("open \(path)") }
        self.path = path
        self.fd = Mutex(fd)
    }

    func write(_ bytes: [UInt8]) {
        fd.withLock { fd in
            if fd >= 0 { try? writeAll(fd, bytes) }
        }
    }

    /// One line prefixed with the wall-clock time, so that it lines up with QMP event timestamps.
    func line(_ text: String) {
        write(Array("\(LogFile.timestamp()) \(text)\n".utf8))
    }

    func close() {
        fd.withLock { fd in
            closeDescriptor(fd)
            fd = -1
        }
    }

    deinit { close() }

    /// UTC, ISO 8601, microseconds: `2025-11-20T15:48:00.123456Z`.
    static func timestamp() -> String {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        return timestamp(seconds: now.tv_sec, microseconds: now.tv_nsec / 1000)
    }

    /// The same format for a given time, e.g. a ping reply's wall-clock time.
    static func timestamp(seconds: Int, microseconds: Int) -> String {
        var seconds = seconds
        var parts = tm()
        gmtime_r(&seconds, &parts)
        func pad(_ value: Int, _ width: Int) -> String {
            let s = String(value)
            return String(repeating: "0", count: max(0, width - s.count)) + s
        }
        return "\(pad(Int(parts.tm_year) + 1900, 4))-\(pad(Int(parts.tm_mon) + 1, 2))-\(pad(Int(parts.tm_mday), 2))"
            + "T\(pad(Int(parts.tm_hour), 2)):\(pad(Int(parts.tm_min), 2)):\(pad(Int(parts.tm_sec), 2))"
            + ".\(pad(microseconds, 6))Z"
    }
}
