import Testing

/// Swift Testing runs suites in parallel in one process. A test that checks this process
/// leaks nothing (counts its fds or TestKit threads before and after) cannot tell its own
/// leftovers from those of a VM test running beside it. Tests that launch VMMs, pingers or
/// namespaces take this lock shared (`.usesProcessResources`); a leak check takes it
/// exclusively (`.countsProcessResources`) and so runs alone among them. Waiters are
/// served in arrival order, so a leak check is not starved by a stream of VM tests.
public actor ProcessResourceLock {
    public static let shared = ProcessResourceLock()

    private var sharedHolders = 0
    private var exclusiveHeld = false
    private var waiters: [(exclusive: Bool, continuation: CheckedContinuation<Void, Never>)] = []

    public func acquire(exclusive: Bool) async {
        if waiters.isEmpty && canGrant(exclusive) {
            grant(exclusive)
            return
        }
        await withCheckedContinuation { waiters.append((exclusive, $0)) }
    }

    public func release(exclusive: Bool) {
        if exclusive { exclusiveHeld = false } else { sharedHolders -= 1 }
        while let first = waiters.first, canGrant(first.exclusive) {
            waiters.removeFirst()
            grant(first.exclusive)
            first.continuation.resume()
        }
    }

    private func canGrant(_ exclusive: Bool) -> Bool {
        exclusive ? !exclusiveHeld && sharedHolders == 0 : !exclusiveHeld
    }

    private func grant(_ exclusive: Bool) {
        if exclusive { exclusiveHeld = true } else { sharedHolders += 1 }
    }
}

/// Holds `ProcessResourceLock` around each test case it applies to (recursively, on a suite).
public struct ProcessResourcesTrait: TestTrait, SuiteTrait, TestScoping {
    let exclusive: Bool

    public var isRecursive: Bool { true }

    public func scopeProvider(for test: Test, testCase: Test.Case?) -> Self? {
        testCase == nil ? nil : self
    }

    public func provideScope(
        for test: Test, testCase: Test.Case?, performing function: @Sendable () async throws -> Void
    ) async throws {
        await ProcessResourceLock.shared.acquire(exclusive: exclusive)
        do {
            try await function()
        } catch {
            await ProcessResourceLock.shared.release(exclusive: exclusive)
            throw error
        }
        await ProcessResourceLock.shared.release(exclusive: exclusive)
    }
}

extension Trait where Self == ProcessResourcesTrait {
    /// For tests that start VMMs, pingers or namespaces: they may run side by side, but not
    /// while a `.countsProcessResources` test runs.
    public static var usesProcessResources: Self { ProcessResourcesTrait(exclusive: false) }

    /// For tests that compare this process's fds or threads before and after: no
    /// `.usesProcessResources` test runs meanwhile.
    public static var countsProcessResources: Self { ProcessResourcesTrait(exclusive: true) }
}
