import CLinux
import Glibc

/// SIGINT, SIGTERM and SIGHUP, blocked in every thread and read from a signalfd, so no
/// handler runs on an arbitrary thread and every wait on the control thread (the event
/// loop, waiting for a first client) can watch for them. Created before any other thread
/// starts, so that all threads inherit the mask.
final class TerminationSignals {
    static let signals: [Int32] = [SIGINT, SIGTERM, SIGHUP]
    private(set) var fd: Int32

    init() throws {
        cl_block_signals(Self.signals, Int32(Self.signals.count))
        fd = try syscallChecked("signalfd") { cl_signalfd(Self.signals, Int32(Self.signals.count)) }
    }

    /// The next pending signal's number, if any (the fd is non-blocking).
    func take() -> UInt32? {
        var info = signalfd_siginfo()
        guard read(fd, &info, MemoryLayout<signalfd_siginfo>.size) > 0 else { return nil }
        return info.ssi_signo
    }

    /// Waits until `listener` has a client to accept; throws `TerminationRequested` when
    /// a termination signal arrives first. Used by `server=on,wait=on` endpoints.
    func waitForClient(on listener: Int32) throws -> Int32 {
        while true {
            var fds = [pollfd(fd: listener, events: Int16(POLLIN), revents: 0), pollfd(fd: fd, events: Int16(POLLIN), revents: 0)]
            if poll(&fds, 2, -1) < 0 {
                if errno == EINTR { continue }
                throw SystemError("poll")
            }
            if fds[1].revents != 0, let signal = take() { throw TerminationRequested(signal: signal) }
            if fds[0].revents != 0 {
                let client = cl_accept(listener)
                if client >= 0 { return client }
                if ![EINTR, EAGAIN, ECONNABORTED].contains(errno) { throw SystemError("accept") }
            }
        }
    }

    func close() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }

    deinit { close() }
}

/// A termination signal arrived while the VMM was still starting: it ends with status 0.
struct TerminationRequested: Error, CustomStringConvertible {
    let signal: UInt32
    var description: String { "terminating on signal \(signal)" }
}
