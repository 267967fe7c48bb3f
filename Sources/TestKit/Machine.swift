import CLinux
import Foundation
import Synchronization
import Testing

/// How to start a VMM.
public struct MachineOptions: Sendable {
    /// nil: `VMMBinary.resolve()` ($TESTKIT_VMM, else the bundled `vmm`).
    public var binary: VMMBinary?
    /// Names the machine's artifact subdirectory (`source`, `target`); nil for a single VM.
    public var name: String?
    /// `-kernel`; e.g. `BundledGuest.image`.
    public var kernel: String?
    /// `-m`, e.g. "64M".
    public var memory: String?
    /// `-S`: stay in prelaunch until `cont`.
    public var startPaused: Bool
    /// `-qmp unix:PATH` to a socket TestKit listens on.
    public var connectQMP: Bool
    /// `-serial unix:PATH` to a socket TestKit listens on.
    public var connectConsole: Bool
    /// Appended after everything TestKit adds.
    public var arguments: [String]
    /// Added to (and overriding) the test process's environment.
    public var environment: [String: String]
    /// From spawn until the VMM has connected and QMP is negotiated.
    public var startupTimeout: Duration
    /// How long `shutdown` waits after `quit`, then again after SIGTERM, before SIGKILL.
    public var quitTimeout: Duration
    /// Runs the VMM inside this network namespace (through `nsenter --net=...`, which
    /// execs it, so `Machine.pid` is still the VMM's). Its TAPs must be created there.
    /// Shut the machine down before the namespace is deleted.
    public var namespace: NetworkNamespace?
    /// Launching without `namespace` inside a `NetworkNamespace.with` scope is refused
    /// (`MachineError.outsideNamespaceScope`) unless this is set: the VMM would run in the
    /// host's namespace, create its TAPs there and never see the test's traffic.
    public var outsideNamespaceScope: Bool = false
    /// fds the VMM inherits, as 3, 4, ... in this order (QEMU's `QEMUMachine.add_fd`), for
    /// `-netdev tap,fd=3`, `vhostfd=4` or a pre-opened socket; `inheritedNumber(of:)` says
    /// which. They stay the caller's: TestKit neither closes nor keeps them.
    public var inheritedFDs: [Int32] = []

    /// The number the VMM sees the `index`-th of `inheritedFDs` as.
    public static func inheritedNumber(of index: Int) -> Int32 { Int32(3 + index) }

    public init(
        binary: VMMBinary? = nil, name: String? = nil, kernel: String? = nil, memory: String? = nil,
        startPaused: Bool = false, connectQMP: Bool = true, connectConsole: Bool = true,
        arguments: [String] = [], environment: [String: String] = [:],
        startupTimeout: Duration = .seconds(30), quitTimeout: Duration = .seconds(5),
        namespace: NetworkNamespace? = nil
    ) {
        self.binary = binary
        self.name = name
        self.kernel = kernel
        self.memory = memory
        self.startPaused = startPaused
        self.connectQMP = connectQMP
        self.connectConsole = connectConsole
        self.arguments = arguments
        self.environment = environment
        self.startupTimeout = startupTimeout
        self.quitTimeout = quitTimeout
        self.namespace = namespace
    }
}

public enum MachineError: Error, CustomStringConvertible {
    case spawnFailed(String, SystemError)
    case exitedDuringStartup(machine: String, status: ExitStatus, stderrTail: [String], artifacts: String)
    case startupTimeout(machine: String, waitingFor: [String], after: Duration, stderrTail: [String], artifacts: String)
    case startupFailed(machine: String, reason: String, stderrTail: [String], artifacts: String)
    case stillRunning(pid: pid_t, after: Duration)
    case notConnected(machine: String, what: String)
    case outsideNamespaceScope(machine: String, scope: String)

    public var description: String {
        func tail(_ lines: [String]) -> String {
            lines.isEmpty ? "; stderr empty" : "; stderr:\n" + lines.map { "  | \($0)" }.joined(separator: "\n")
        }
        switch self {
        case .spawnFailed(let path, let error):
            return "cannot start \(path): \(error)"
        case .exitedDuringStartup(let machine, let status, let lines, let artifacts):
            return "\(machine): VMM \(status) during startup (artifacts: \(artifacts))" + tail(lines)
        case .startupTimeout(let machine, let what, let after, let lines, let artifacts):
            return "\(machine): VMM did not connect \(what.joined(separator: " and ")) within \(after) (artifacts: \(artifacts))"
                + tail(lines)
        case .startupFailed(let machine, let reason, let lines, let artifacts):
            return "\(machine): startup failed: \(reason) (artifacts: \(artifacts))" + tail(lines)
        case .stillRunning(let pid, let after):
            return "process \(pid) still running after \(after)"
        case .notConnected(let machine, let what):
            return "\(machine) was launched without \(what)"
        case .outsideNamespaceScope(let machine, let scope):
            return "\(machine): launched outside \(scope) although the test runs inside it; set MachineOptions.namespace"
                + " (or outsideNamespaceScope = true to run it in the host's namespace on purpose)"
        }
    }
}

/// A VMM process under test, reached only as a user would: its command line, QMP and
/// the serial console. Both sockets are listened on by TestKit before the spawn and
/// the VMM connects to them (client mode), so nothing it prints can be missed.
public final class Machine: Sendable {
    public let name: String
    public let pid: pid_t
    public let binary: VMMBinary
    /// argv, argv[0] included.
    public let commandLine: [String]
    /// Where this machine's cmdline.txt, stdout.log, stderr.log, console.log, qmp.log are.
    public let directory: String

    private let options: MachineOptions
    private let process: ChildProcess
    private let qmpClient: QMPClient?
    private let consoleClient: Console?
    /// Sockets live here instead of `directory` when its path is too long for sun_path.
    private let socketDirectory: String?
    private let keep: @Sendable (String) -> Void
    private let shutdownTask = Mutex<Task<ExitStatus, Never>?>(nil)

    private init(
        name: String, process: ChildProcess, binary: VMMBinary, commandLine: [String], directory: String,
        options: MachineOptions, qmp: QMPClient?, console: Console?, socketDirectory: String?,
        keep: @escaping @Sendable (String) -> Void
    ) {
        self.name = name
        self.process = process
        pid = process.pid
        self.binary = binary
        self.commandLine = commandLine
        self.directory = directory
        self.options = options
        qmpClient = qmp
        consoleClient = console
        self.socketDirectory = socketDirectory
        self.keep = keep
    }

    public var qmp: QMPClient {
        get throws {
            guard let qmpClient else { throw MachineError.notConnected(machine: name, what: "QMP") }
            return qmpClient
        }
    }

    public var console: Console {
        get throws {
            guard let consoleClient else { throw MachineError.notConnected(machine: name, what: "a console") }
            return consoleClient
        }
    }

    public var isRunning: Bool { process.status == nil }
    public var exitStatus: ExitStatus? { process.status }

    // MARK: Scoped use

    /// Launches a machine, runs `body`, and always shuts the machine down. The artifact
    /// directory is removed afterwards unless the body threw or a TestKit wait failed
    /// (see `ArtifactDirectory`).
    public static func with<T>(
        _ options: MachineOptions = MachineOptions(),
        isolation: isolated (any Actor)? = #isolation,
        sourceLocation: SourceLocation = #_sourceLocation,
        _ body: (Machine) async throws -> T
    ) async throws -> T {
        try await withArtifacts(isolation: isolation, sourceLocation: sourceLocation) { artifacts in
            let machine = try await launch(options, in: artifacts)
            return try await body(machine)
        }
    }

    // MARK: Launch

    /// Starts a VMM whose files go to `artifacts`; the directory shuts it down when its
    /// scope ends. Use inside `withArtifacts` for tests with several machines.
    public static func launch(_ options: MachineOptions = MachineOptions(), in artifacts: ArtifactDirectory) async throws -> Machine {
        let binary = try options.binary ?? VMMBinary.resolve()
        let name = options.name ?? "vm"
        if options.namespace == nil, !options.outsideNamespaceScope, let scope = NetworkNamespace.scope {
            throw MachineError.outsideNamespaceScope(machine: name, scope: scope.description)
        }
        let directory = try artifacts.directory(forMachine: options.name)
        func file(_ leaf: String) -> String { (directory as NSString).appendingPathComponent(leaf) }
        // Weak: the directory's cleanup list holds the machine, the machine must not hold the directory.
        let keep: @Sendable (String) -> Void = { [weak artifacts] reason in artifacts?.keep("\(name): \(reason)") }
        do {
            return try await launch(options, binary: binary, name: name, directory: directory, file: file, keep: keep, artifacts: artifacts)
        } catch {
            keep("launch failed: \(error)")
            throw error
        }
    }

    private static func launch(
        _ options: MachineOptions, binary: VMMBinary, name: String, directory: String,
        file: (String) -> String, keep: @escaping @Sendable (String) -> Void, artifacts: ArtifactDirectory
    ) async throws -> Machine {
        // posix_spawn cannot setns; nsenter can, and then execs the VMM in its place.
        // Resolved first, so that a missing nsenter fails before any socket exists.
        let namespacePrefix = try options.namespace?.commandPrefix() ?? []
        var socketDirectory = directory
        var ownedSocketDirectory: String?
        if file("console.sock").utf8.count > UnixSocket.maxPathLength {
            socketDirectory = try ArtifactDirectory.makeShortSocketDirectory()
            ownedSocketDirectory = socketDirectory
        }
        func removeSocketDirectory() {
            if let ownedSocketDirectory { try? FileManager.default.removeItem(atPath: ownedSocketDirectory) }
        }
        let qmpListener: UnixListener?
        let consoleListener: UnixListener?
        do {
            qmpListener = options.connectQMP ? try UnixListener(path: socketDirectory + "/qmp.sock") : nil
            consoleListener = options.connectConsole ? try UnixListener(path: socketDirectory + "/console.sock") : nil
        } catch {
            removeSocketDirectory()
            throw error
        }
        // Listening sockets are only needed until the VMM connected.
        defer {
            qmpListener?.close()
            consoleListener?.close()
        }

        var commandLine = [binary.path] + binary.defaultArguments
        if let memory = options.memory { commandLine += ["-m", memory] }
        if let kernel = options.kernel { commandLine += ["-kernel", kernel] }
        if options.startPaused { commandLine.append("-S") }
        if let qmpListener { commandLine += ["-qmp", "unix:\(qmpListener.path)"] }
        if let consoleListener { commandLine += ["-serial", "unix:\(consoleListener.path)"] }
        commandLine += options.arguments
        let spawned = namespacePrefix + commandLine
        try (spawned.map(shellQuoted).joined(separator: " ") + "\n")
            .write(toFile: file("cmdline.txt"), atomically: false, encoding: .utf8)

        let process: ChildProcess
        do {
            let stdout = try openLog(file("stdout.log"))
            defer { closeDescriptor(stdout) }
            let stderr = try openLog(file("stderr.log"))
            defer { closeDescriptor(stderr) }
            var environment = ProcessInfo.processInfo.environment
            environment.merge(options.environment) { $1 }
            process = try ChildProcess.spawn(
                path: spawned[0], arguments: spawned, environment: environment, stdout: stdout, stderr: stderr,
                passing: options.inheritedFDs)
        } catch {
            removeSocketDirectory()
            throw MachineError.spawnFailed(binary.path, error)
        }

        let deadline = ContinuousClock.now + options.startupTimeout
        var console: Console?
        var qmp: QMPClient?
        do {
            let listeners = [(qmpListener, "QMP"), (consoleListener, "console")].compactMap { l, what in l.map { ($0.fd, what) } }
            let accepted = try await BlockingThread.run(name: "tk-accept") { [exitEvent = process.exitEvent] in
                try acceptAll(listeners, exitEvent: exitEvent, deadline: deadline)
            }
            var fds = accepted.makeIterator()
            let qmpFD = qmpListener != nil ? fds.next() : nil
            let consoleFD = consoleListener != nil ? fds.next() : nil
            do {
                console = try consoleFD.map { fd in
                    try Console(takingOwnershipOf: fd, transcriptPath: file("console.log"), onWaitFailure: keep)
                }
            } catch {
                qmpFD.map(closeDescriptor)
                throw error
            }
            if let qmpFD {
                qmp = try await QMPClient.connect(
                    takingOwnershipOf: qmpFD, logPath: file("qmp.log"), timeout: max(.zero, deadline - .now),
                    onWaitFailure: keep)
            }
        } catch {
            qmp?.close()
            console?.close()
            let failure = await startupFailure(
                error, process: process, name: name, file: file, directory: directory, timeout: options.startupTimeout)
            process.close()
            writeExitStatus(process.status, to: file("exit-status.txt"), note: "during startup")
            removeSocketDirectory()
            throw failure
        }
        let machine = Machine(
            name: name, process: process, binary: binary, commandLine: commandLine, directory: directory,
            options: options, qmp: qmp, console: console, socketDirectory: ownedSocketDirectory, keep: keep)
        artifacts.addCleanup { await machine.shutdown() }
        return machine
    }

    private enum AcceptFailure: Error {
        case childExited
        case timeout(missing: [String])
    }

    /// Accepts one connection per listener, watching the child's exit eventfd so that a
    /// VMM that dies on a bad argument fails at once instead of at the deadline.
    private static func acceptAll(
        _ listeners: [(fd: Int32, what: String)], exitEvent: Int32, deadline: ContinuousClock.Instant
    ) throws -> [Int32] {
        var accepted = [Int32?](repeating: nil, count: listeners.count)
        func closeAccepted() { accepted.compactMap { $0 }.forEach(closeDescriptor) }
        while accepted.contains(nil) {
            let remaining = deadline - .now
            guard remaining > .zero else {
                closeAccepted()
                throw AcceptFailure.timeout(missing: listeners.indices.filter { accepted[$0] == nil }.map { listeners[$0].what })
            }
            let waiting = listeners.indices.filter { accepted[$0] == nil }
            var fds = waiting.map { pollfd(fd: listeners[$0].fd, events: Int16(POLLIN), revents: 0) }
            fds.append(pollfd(fd: exitEvent, events: Int16(POLLIN), revents: 0))
            let milliseconds = Int32(clamping: remaining.components.seconds * 1000 + remaining.components.attoseconds / 1_000_000_000_000_000 + 1)
            let n = poll(&fds, nfds_t(fds.count), milliseconds)
            if n < 0 {
                if errno == EINTR { continue }
                let error = SystemError("poll")
                closeAccepted()
                throw error
            }
            for (slot, index) in waiting.enumerated() where fds[slot].revents != 0 {
                let client = cl_accept(listeners[index].fd)
                if client >= 0 { accepted[index] = client }
            }
            // Checked after accepting: a VMM that connected and then died is still reported as dead.
            if fds.last!.revents != 0, accepted.contains(nil) {
                closeAccepted()
                throw AcceptFailure.childExited
            }
        }
        return accepted.map { $0! }
    }

    /// Turns whatever went wrong into an error that says what the VMM did, with its stderr.
    private static func startupFailure(
        _ error: any Error, process: ChildProcess, name: String, file: (String) -> String, directory: String,
        timeout: Duration
    ) async -> MachineError {
        // A VMM that dies right after connecting shows up as a QMP disconnect; give the
        // reaper a moment so that the report says how it died.
        let status = try? await process.wait(timeout: .milliseconds(500))
        let tail = tailLines(of: file("stderr.log"))
        if let status {
            return .exitedDuringStartup(machine: name, status: status, stderrTail: tail, artifacts: directory)
        }
        if case AcceptFailure.timeout(let missing) = error {
            return .startupTimeout(machine: name, waitingFor: missing, after: timeout, stderrTail: tail, artifacts: directory)
        }
        return .startupFailed(machine: name, reason: "\(error)", stderrTail: tail, artifacts: directory)
    }

    // MARK: Running

    /// Sends a signal, e.g. SIGKILL to test what happens when a migration peer dies.
    /// Returns false when the process has already exited.
    @discardableResult
    public func kill(_ signal: Int32 = SIGKILL) -> Bool { process.signal(signal) }

    /// Waits for the VMM to exit by itself (after `quit`, a guest poweroff, a failed migration).
    public func wait(timeout: Duration) async throws -> ExitStatus {
        do {
            return try await process.wait(timeout: timeout)
        } catch {
            keep("\(error)")
            throw error
        }
    }

    /// The last lines the VMM wrote to stderr.
    public func stderrTail(_ count: Int = 20) -> [String] {
        Machine.tailLines(of: (directory as NSString).appendingPathComponent("stderr.log"), count: count)
    }

    /// Stops the VMM: `quit` over QMP, then SIGTERM, then SIGKILL, each after
    /// `quitTimeout`; reaps it and closes every fd. Idempotent; concurrent callers share
    /// one shutdown. A VMM that ignored `quit` (or SIGTERM, without QMP) keeps the
    /// artifacts: not stopping when asked is a bug worth looking at.
    @discardableResult
    public func shutdown() async -> ExitStatus {
        let task = shutdownTask.withLock { task in
            if let task { return task }
            let started = Task { await self.performShutdown() }
            task = started
            return started
        }
        return await task.value
    }

    private func performShutdown() async -> ExitStatus {
        var note = "before shutdown"
        var askedToQuit = false
        if process.status == nil, let qmpClient, !qmpClient.isClosed {
            note = "after quit"
            askedToQuit = true
            _ = try? await qmpClient.request("quit", arguments: nil, timeout: options.quitTimeout, recordingFailure: false)
            _ = try? await process.wait(timeout: options.quitTimeout)
        }
        for (signal, label) in [(SIGTERM, "SIGTERM"), (SIGKILL, "SIGKILL")] where process.status == nil {
            // Without QMP, SIGTERM is the normal way to stop; only ignoring it is a bug.
            if process.signal(signal), askedToQuit || signal == SIGKILL {
                keep("VMM still running \(options.quitTimeout) \(note); sent \(label)")
            }
            note = "after \(label)"
            _ = try? await process.wait(timeout: signal == SIGKILL ? nil : options.quitTimeout)
        }
        let status = (try? await process.wait(timeout: nil)) ?? .exited(-1)
        qmpClient?.close()
        consoleClient?.close()
        process.close()
        if let socketDirectory { try? FileManager.default.removeItem(atPath: socketDirectory) }
        Machine.writeExitStatus(status, to: (directory as NSString).appendingPathComponent("exit-status.txt"), note: note)
        return status
    }

    deinit {
        // Last resort for a machine dropped without shutdown: no graceful quit is possible here.
        if process.status == nil, shutdownTask.withLock({ $0 == nil }) {
            FileHandle.standardError.write(Data("TestKit: \(name) (pid \(pid)) dropped without shutdown(); killing it\n".utf8))
        }
        qmpClient?.close()
        consoleClient?.close()
        process.close()
        if let socketDirectory { try? FileManager.default.removeItem(atPath: socketDirectory) }
    }

    // MARK: Helpers

    private static func openLog(_ path: String) throws(SystemError) -> Int32 {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw SystemError("open \(path)") }
        return fd
    }

    private static func writeExitStatus(_ status: ExitStatus?, to path: String, note: String) {
        let text = status.map { "\($0) (\(note))\n" } ?? "unknown (\(note))\n"
        try? text.write(toFile: path, atomically: false, encoding: .utf8)
    }

    static func tailLines(of path: String, count: Int = 20) -> [String] {
        guard let handle = FileHandle(forReadingAtPath: path) else { return [] }
        defer { try? handle.close() }
        let size = (try? handle.seekToEnd()) ?? 0
        try? handle.seek(toOffset: size > 8192 ? size - 8192 : 0)
        let data = (try? handle.readToEnd()) ?? Data()
        let lines = String(decoding: data, as: UTF8.self).split(separator: "\n", omittingEmptySubsequences: true)
        return lines.suffix(count).map(String.init)
    }

    /// For cmdline.txt: a line that can be pasted into a shell to rerun the VMM by hand.
    static func shellQuoted(_ argument: String) -> String {
        let safe = Set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./:=,+@%")
        if !argument.isEmpty, argument.allSatisfy({ safe.contains($0) }) { return argument }
        return "'" + argument.replacingOccurrences(of: "'", with: "'\\''") + "'"
    }
}
