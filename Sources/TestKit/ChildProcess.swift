import CLinux
import Foundation
import Glibc
import Synchronization

/// How a process ended.
public enum ExitStatus: Sendable, Equatable, CustomStringConvertible {
    case exited(Int32)
    case signaled(Int32)

    public var description: String {
        switch self {
        case .exited(let code): return "exited with status \(code)"
        case .signaled(let signal):
            return "killed by signal \(signal) (\(String(cString: strsignal(signal))))"
        }
    }

    /// Decodes a waitpid status the way glibc's W* macros do; written out because Swift
    /// cannot import function-like macros and importing CLinux next to CCap and
    /// Foundation makes clang see two different fd_set definitions.
    init(waitStatus status: Int32) {
        let low = status & 0x7f
        if low == 0 {
            self = .exited((status >> 8) & 0xff)
        } else {
            self = .signaled(low)
        }
    }
}

/// A spawned child and the thread that reaps it.
///
/// The reaper blocks in `waitid(WNOWAIT)`, which sees the exit without reaping, then
/// reaps under the same lock that `signal` takes. So a signal is never sent to a pid
/// that was already reaped and maybe reused by an unrelated process.
final class ChildProcess: Sendable {
    let pid: pid_t
    /// Readable (eventfd) once the child has exited, so that a `poll` on sockets can also
    /// watch for the child dying.
    let exitEvent: Int32

    private struct State {
        var status: ExitStatus?
        var waiters: [OneShot<ExitStatus>] = []
        var exitEventClosed = false
    }

    /// What the reaper thread uses; it must not retain the ChildProcess, whose deinit
    /// is the last-resort kill.
    private final class Core: Sendable {
        let pid: pid_t
        let exitEvent: Int32
        let state = Mutex(State())

        init(pid: pid_t, exitEvent: Int32) {
            self.pid = pid
            self.exitEvent = exitEvent
        }

        func reap() {
            var info = siginfo_t()
            while waitid(P_PID, id_t(pid), &info, WEXITED | WNOWAIT) != 0, errno == EINTR {}
            let (status, waiters): (ExitStatus, [OneShot<ExitStatus>]) = state.withLock { state in
                var raw: Int32 = 0
                var result: pid_t
                repeat { result = waitpid(pid, &raw, 0) } while result < 0 && errno == EINTR
                // ECHILD: someone else reaped it (a waitpid(-1) elsewhere in the process).
                // The status is lost; -1 cannot be a real exit code.
                let status = result == pid ? ExitStatus(waitStatus: raw) : .exited(-1)
                state.status = status
                var one: UInt64 = 1
                if !state.exitEventClosed { _ = write(exitEvent, &one, 8) }
                defer { state.waiters = [] }
                return (status, state.waiters)
            }
            for waiter in waiters { waiter.resolve(.success(status)) }
        }
    }

    private let core: Core
    private let reaper: Mutex<BlockingThread?>

    /// Spawns `path` with `arguments` (argv[0] included). stdin is /dev/null; stdout and
    /// stderr are dup'ed from the given fds, which stay owned by the caller; every other
    /// fd is closed in the child.
    /// Most fds `spawn` passes on (as 3, 4, ...).
    static let maxPassedFDs = 64

    /// `passing`: fds the child gets as 3, 4, ... in order (QEMU's `add_fd`); they stay
    /// the caller's here.
    static func spawn(
        path: String, arguments: [String], environment: [String: String], stdout: Int32, stderr: Int32,
        passing: [Int32] = []
    ) throws(SystemError) -> ChildProcess {
        guard passing.count <= maxPassedFDs else { throw SystemError("pass \(passing.count) fds (at most \(maxPassedFDs))", code: EINVAL) }
        var actions = posix_spawn_file_actions_t()
        posix_spawn_file_actions_init(&actions)
        defer { posix_spawn_file_actions_destroy(&actions) }
        posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
        posix_spawn_file_actions_adddup2(&actions, stdout, 1)
        posix_spawn_file_actions_adddup2(&actions, stderr, 2)
        // Copies above every target number first (close-on-exec, so they vanish at exec):
        // dup2 to 3, 4, ... must not overwrite a source that has not been copied yet.
        var copies: [Int32] = []
        defer { copies.forEach { closeDescriptor($0) } }
        for fd in passing {
            let copy = fcntl(fd, F_DUPFD_CLOEXEC, Int32(3 + maxPassedFDs))
            guard copy >= 0 else { throw SystemError("pass fd \(fd) to \(path)") }
            copies.append(copy)
        }
        for (index, copy) in copies.enumerated() { posix_spawn_file_actions_adddup2(&actions, copy, Int32(3 + index)) }
        // Parallel tests open fds all the time, not all close-on-exec; a VMM that inherits
        // another test's socket keeps it open and hangs that test.
        if cl_spawn_can_close_from() != 0 { _ = cl_spawn_add_close_from(&actions, Int32(3 + passing.count)) }

        var attributes = posix_spawnattr_t()
        posix_spawnattr_init(&attributes)
        defer { posix_spawnattr_destroy(&attributes) }
        // The test runner may block or ignore signals; the VMM must start with defaults.
        var empty = sigset_t()
        sigemptyset(&empty)
        posix_spawnattr_setsigmask(&attributes, &empty)
        var all = sigset_t()
        sigfillset(&all)
        posix_spawnattr_setsigdefault(&attributes, &all)
        posix_spawnattr_setflags(&attributes, Int16(POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF))

        let argv = arguments.map { strdup($0) } + [nil]
        let envp = environment.map { strdup("\($0.key)=\($0.value)") } + [nil]
        defer {
            argv.forEach { free($0) }
            envp.forEach { free($0) }
        }
        var pid: pid_t = 0
        let rc = posix_spawn(&pid, path, &actions, &attributes, argv, envp)
        guard rc == 0 else { throw SystemError("posix_spawn \(path)", code: rc) }

        let exitEvent = cl_eventfd(0, CL_EFD_CLOEXEC)
        guard exitEvent >= 0 else {
            let error = SystemError("eventfd")
            kill(pid, SIGKILL)
            var status: Int32 = 0
            waitpid(pid, &status, 0)
            throw error
        }
        return ChildProcess(pid: pid, exitEvent: exitEvent)
    }

    /// Runs a short host command (`dmesg`, `ip`) with stdout and stderr appended to
    /// `path`; kills it after `timeout`. For evidence gathering: failures are written to
    /// the file, never thrown.
    static func run(_ argv: [String], appendingTo path: String, timeout: Duration = .seconds(5)) async {
        let fd = open(path, O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0o644)
        guard fd >= 0 else { return }
        defer { closeDescriptor(fd) }
        let header = "$ \(argv.joined(separator: " "))\n"
        _ = header.withCString { write(fd, $0, strlen($0)) }
        guard let path = VMMBinary.findExecutable(argv[0]) else {
            let note = "(\(argv[0]) not found)\n"
            _ = note.withCString { write(fd, $0, strlen($0)) }
            return
        }
        do {
            let process = try spawn(path: path, arguments: argv, environment: ProcessInfo.processInfo.environment, stdout: fd, stderr: fd)
            defer { process.close() }
            if (try? await process.wait(timeout: timeout)) == nil {
                _ = process.signal(SIGKILL)
                _ = try? await process.wait(timeout: nil)
            }
        } catch {
            let note = "(\(error))\n"
            _ = note.withCString { write(fd, $0, strlen($0)) }
        }
    }

    private init(pid: pid_t, exitEvent: Int32) {
        self.pid = pid
        self.exitEvent = exitEvent
        let core = Core(pid: pid, exitEvent: exitEvent)
        self.core = core
        do {
            reaper = Mutex(try BlockingThread(name: "tk-reaper") { core.reap() })
        } catch {
            // No thread: kill and reap right here, so the child never outlives its owner.
            kill(pid, SIGKILL)
            core.reap()
            reaper = Mutex(nil)
        }
    }

    var status: ExitStatus? { core.state.withLock { $0.status } }

    /// Sends `signal` unless the child was already reaped. Returns whether it was sent.
    @discardableResult
    func signal(_ signal: Int32) -> Bool {
        core.state.withLock { state in
            guard state.status == nil else { return false }
            return kill(pid, signal) == 0
        }
    }

    /// The exit status, waiting up to `timeout` (forever when nil) for the child to exit.
    func wait(timeout: Duration?) async throws -> ExitStatus {
        let shot = OneShot<ExitStatus>()
        let known: ExitStatus? = core.state.withLock { state in
            if let status = state.status { return status }
            state.waiters.append(shot)
            return nil
        }
        if let known { return known }
        return try await shot.value(timeout: timeout) { [pid] in
            MachineError.stillRunning(pid: pid, after: timeout ?? .zero)
        }
    }

    /// Kills the child if it still runs, joins the reaper and closes the eventfd. Blocks
    /// only as long as the kernel takes to finish a SIGKILL.
    func close() {
        signal(SIGKILL)
        let thread = reaper.withLock { r -> BlockingThread? in defer { r = nil }; return r }
        thread?.join()
        core.state.withLock { state in
            if !state.exitEventClosed {
                state.exitEventClosed = true
                closeDescriptor(exitEvent)
            }
        }
    }

    deinit { close() }
}
