import CLinux
import Glibc
import Synchronization

/// The VMM's control thread: a poll() loop over sockets and console fds. All machine
/// state changes happen here; other threads hand work over with `post`.
public final class EventLoop: @unchecked Sendable {
    private struct Source {
        var interest: () -> Int16
        var handler: (Int16) -> Void
    }

    private var sources: [Int32: Source] = [:]
    /// One-shot timers (loop thread only): deadline in monotonic nanoseconds, and the work.
    private var timers: [(deadline: Int64, work: () -> Void)] = []
    private let wakeup: EventFD
    private let posted = Mutex<[@Sendable () -> Void]>([])
    private var exitStatus: Int32?

    public init() throws {
        wakeup = try EventFD()
    }

    /// Calls `handler` with the returned events whenever `fd` is ready for `interest()`;
    /// `interest` is asked again before every poll, so a source can pause itself (return 0).
    public func watch(_ fd: Int32, interest: @escaping () -> Int16 = { Int16(POLLIN) }, handler: @escaping (Int16) -> Void) {
        sources[fd] = Source(interest: interest, handler: handler)
    }

    public func unwatch(_ fd: Int32) { sources[fd] = nil }

    /// Runs `work` on the loop thread; safe from any thread.
    public func post(_ work: @escaping @Sendable () -> Void) {
        posted.withLock { $0.append(work) }
        wakeup.signal()
    }

    /// Runs `work` on the loop thread after `nanoseconds`; call from the loop thread.
    public func after(nanoseconds: Int64, _ work: @escaping () -> Void) {
        timers.append((monotonicNanoseconds() + nanoseconds, work))
    }

    /// Wakes the loop so it re-reads every source's interest.
    public func poke() { wakeup.signal() }

    public func stop(exitStatus: Int32) { self.exitStatus = exitStatus }

    public var isStopping: Bool { exitStatus != nil }

    public func run() -> Int32 {
        while exitStatus == nil {
            var fds = [wakeup.fd.pollRequest()]
            for (fd, source) in sources {
                let events = source.interest()
                if events != 0 { fds.append(pollfd(fd: fd, events: events, revents: 0)) }
            }
            let rc = poll(&fds, nfds_t(fds.count), pollTimeout())
            if rc < 0 && errno != EINTR { break }
            if fds[0].revents != 0 { wakeup.drain() }
            runPosted()
            runDueTimers()
            for p in fds.dropFirst() where p.revents != 0 {
                guard exitStatus == nil else { break }
                // A handler may have removed this source (or another one) meanwhile.
                sources[p.fd]?.handler(p.revents)
            }
            runPosted()
        }
        return exitStatus ?? 1
    }

    /// Milliseconds until the next timer, rounded up; -1 (forever) without timers.
    private func pollTimeout() -> Int32 {
        guard let next = timers.map(\.deadline).min() else { return -1 }
        let remaining = next - monotonicNanoseconds()
        return remaining <= 0 ? 0 : Int32(clamping: (remaining + 999_999) / 1_000_000)
    }

    private func runDueTimers() {
        guard !timers.isEmpty else { return }
        let now = monotonicNanoseconds()
        let due = timers.filter { $0.deadline <= now }
        timers.removeAll { $0.deadline <= now }
        for timer in due { timer.work() }
    }

    private func runPosted() {
        let work = posted.withLock { w -> [@Sendable () -> Void] in
            defer { w.removeAll() }
            return w
        }
        for item in work { item() }
    }
}
