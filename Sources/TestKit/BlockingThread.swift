import CLinux
import Glibc
import Synchronization

/// A pthread for one blocking job (read, poll, waitid). Such calls must not run on
/// Swift's cooperative pool: with two cores, two blocked readers would stall every task.
final class BlockingThread: Sendable {
    private final class Job {
        let name: String
        let body: @Sendable () -> Void
        init(name: String, body: @escaping @Sendable () -> Void) {
            self.name = name
            self.body = body
        }
    }

    /// nil once joined, so that `join` is idempotent.
    private let handle: Mutex<pthread_t?>

    /// `name` shows in /proc/self/task/*/comm (15 characters at most), which is how the
    /// leak tests find TestKit's threads.
    init(name: String, _ body: @escaping @Sendable () -> Void) throws(SystemError) {
        let job = Unmanaged.passRetained(Job(name: name, body: body)).toOpaque()
        var thread = pthread_t()
        let rc = pthread_create(&thread, nil, { context in
            let job = Unmanaged<Job>.fromOpaque(context!).takeRetainedValue()
            _ = cl_set_thread_name(pthread_self(), String(job.name.prefix(15)))
            job.body()
            return nil
        }, job)
        guard rc == 0 else {
            Unmanaged<Job>.fromOpaque(job).release()
            throw SystemError("pthread_create", code: rc)
        }
        handle = Mutex(thread)
    }

    /// Waits for the job to end. Called from the thread itself (a callback that closes
    /// its own stream), it detaches instead, since joining itself would deadlock.
    func join() {
        guard let thread = handle.withLock({ h -> pthread_t? in defer { h = nil }; return h }) else { return }
        if pthread_equal(thread, pthread_self()) != 0 {
            pthread_detach(thread)
        } else {
            pthread_join(thread, nil)
        }
    }

    deinit { join() }

    /// Runs a blocking call on its own thread and suspends the caller until it returns.
    static func run<T: Sendable>(
        name: String, _ body: @escaping @Sendable () throws -> T
    ) async throws -> T {
        try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<T, any Error>) in
            do {
                let thread = try BlockingThread(name: name) {
                    continuation.resume(with: Result { try body() })
                }
                // The job owns nothing that needs joining; detach so the thread frees itself.
                if let t = thread.handle.withLock({ h -> pthread_t? in defer { h = nil }; return h }) {
                    pthread_detach(t)
                }
            } catch {
                continuation.resume(throwing: error)
            }
        }
    }
}
