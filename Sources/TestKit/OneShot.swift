import Synchronization

/// A value that arrives once, from a reader thread, a timer or a cancellation, whichever
/// comes first. The losers see `resolve` return false; that is how a reply that arrives
/// after its timeout is told apart from one that is still awaited.
final class OneShot<Value: Sendable>: Sendable {
    private enum State {
        case idle
        case waiting(CheckedContinuation<Value, any Error>)
        case resolved(Result<Value, any Error>)
        case delivered
    }

    private let state = Mutex<State>(.idle)

    init() {}

    var isResolved: Bool {
        state.withLock { state in
            if case .idle = state { return false }
            if case .waiting = state { return false }
            return true
        }
    }

    /// True when this call decided the value; false when something else already had.
    @discardableResult
    func resolve(_ result: Result<Value, any Error>) -> Bool {
        let (won, continuation): (Bool, CheckedContinuation<Value, any Error>?) = state.withLock { state in
            switch state {
            case .idle:
                state = .resolved(result)
                return (true, nil)
            case .waiting(let continuation):
                state = .delivered
                return (true, continuation)
            case .resolved, .delivered:
                return (false, nil)
            }
        }
        continuation?.resume(with: result)
        return won
    }

    /// Suspends until resolved. `timeout` nil waits forever; otherwise the timer resolves
    /// with `onTimeout()`, computed when it fires so that it can describe the state then.
    func value(timeout: Duration?, onTimeout: @escaping @Sendable () -> any Error) async throws -> Value {
        let timer: Task<Void, Never>? = timeout.map { timeout in
            Task { [self] in
                do { try await Task.sleep(for: timeout) } catch { return }
                resolve(.failure(onTimeout()))
            }
        }
        defer { timer?.cancel() }
        return try await withTaskCancellationHandler {
            try await withCheckedThrowingContinuation { (continuation: CheckedContinuation<Value, any Error>) in
                let ready: Result<Value, any Error>? = state.withLock { state in
                    switch state {
                    case .idle:
                        state = .waiting(continuation)
                        return nil
                    case .resolved(let result):
                        state = .delivered
                        return result
                    case .waiting, .delivered:
                        preconditionFailure("OneShot awaited twice")
                    }
                }
                if let ready { continuation.resume(with: ready) }
            }
        } onCancel: {
            resolve(.failure(CancellationError()))
        }
    }
}
