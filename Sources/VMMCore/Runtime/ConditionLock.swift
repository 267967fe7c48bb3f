import Glibc

/// A mutex with a condition variable, for threads that must block until another thread
/// changes shared state (a vCPU parking, a control thread waiting for it to park).
/// `Synchronization.Mutex` has no condition variable, hence pthreads.
public final class ConditionLock<State>: @unchecked Sendable {
    private let mutex = UnsafeMutablePointer<pthread_mutex_t>.allocate(capacity: 1)
    private let cond = UnsafeMutablePointer<pthread_cond_t>.allocate(capacity: 1)
    private var state: State

    public init(_ state: State) {
        self.state = state
        pthread_mutex_init(mutex, nil)
        var attr = pthread_condattr_t()
        pthread_condattr_init(&attr)
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC)
        pthread_cond_init(cond, &attr)
        pthread_condattr_destroy(&attr)
    }

    deinit {
        pthread_cond_destroy(cond)
        pthread_mutex_destroy(mutex)
        mutex.deallocate()
        cond.deallocate()
    }

    /// Runs `body` under the lock and wakes every waiter afterwards.
    @discardableResult
    public func update<R>(_ body: (inout State) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer {
            pthread_cond_broadcast(cond)
            pthread_mutex_unlock(mutex)
        }
        return try body(&state)
    }

    public func read<R>(_ body: (State) throws -> R) rethrows -> R {
        pthread_mutex_lock(mutex)
        defer { pthread_mutex_unlock(mutex) }
        return try body(state)
    }

    /// Blocks until `condition` holds, then runs `body` under the lock. With a timeout,
    /// returns nil if the condition did not come true in time.
    public func wait<R>(until condition: (State) -> Bool, timeoutMilliseconds: Int? = nil, then body: (inout State) -> R) -> R? {
        pthread_mutex_lock(mutex)
        defer {
            pthread_cond_broadcast(cond)
            pthread_mutex_unlock(mutex)
        }
        var deadline = timespec()
        if let timeoutMilliseconds {
            clock_gettime(CLOCK_MONOTONIC, &deadline)
            let ns = Int(deadline.tv_nsec) + (timeoutMilliseconds % 1000) * 1_000_000
            deadline.tv_sec += timeoutMilliseconds / 1000 + ns / 1_000_000_000
            deadline.tv_nsec = ns % 1_000_000_000
        }
        while !condition(state) {
            if timeoutMilliseconds != nil {
                if pthread_cond_timedwait(cond, mutex, &deadline) == ETIMEDOUT && !condition(state) { return nil }
            } else {
                pthread_cond_wait(cond, mutex)
            }
        }
        return body(&state)
    }
}
