import Foundation
import Glibc

/// The bundled `vhost-user-net` backend, run for a test in a network namespace on a TAP
/// there: its socket appears in a short temporary directory, its stderr goes to a log.
/// `with` always kills and reaps it (and removes the directory), also when the body throws.
public final class VhostUserBackendProcess: Sendable {
    public static let executableName = "vhost-user-net"
    /// Where a front-end connects (`-chardev socket,path=`).
    public let socketPath: String
    /// The backend's stderr (a line per front-end and per rejected message).
    public let logPath: String
    private let process: ChildProcess
    private let socketDirectory: String
    /// 1 for the first backend on a socket, then one more per `replacing:`.
    private let generation: Int

    private init(socketPath: String, logPath: String, process: ChildProcess, socketDirectory: String, generation: Int) {
        (self.socketPath, self.logPath, self.process, self.socketDirectory) = (socketPath, logPath, process, socketDirectory)
        self.generation = generation
    }

    /// The log so far.
    public var log: String { (try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "" }

    public var isRunning: Bool { process.status == nil }

    /// The backend's process id (a migration that keeps the backend keeps this).
    public var pid: pid_t { process.pid }

    /// Starts `vhost-user-net --tap TAP --queues N` in `namespace`, runs `body`, then stops it.
    /// `logDirectory`: where `vhost-user-net.log` goes (kept by the caller's artifacts).
    /// `replacing`: a backend that was killed; the new one serves on its socket path (a
    /// front-end with `reconnect=` finds it there) and logs to `vhost-user-net.N.log`.
    public static func with<T>(
        tap: String, queues: Int, in namespace: NetworkNamespace, logDirectory: String,
        replacing previous: VhostUserBackendProcess? = nil,
        isolation: isolated (any Actor)? = #isolation,
        _ body: (VhostUserBackendProcess) async throws -> T
    ) async throws -> T {
        let backend = try await start(tap: tap, queues: queues, in: namespace, logDirectory: logDirectory, replacing: previous)
        defer { backend.stop() }
        return try await body(backend)
    }

    static func start(tap: String, queues: Int, in namespace: NetworkNamespace, logDirectory: String,
                      replacing previous: VhostUserBackendProcess? = nil) async throws -> VhostUserBackendProcess {
        let vmm = try VMMBinary.bundled()
        let path = ((vmm.path as NSString).deletingLastPathComponent as NSString).appendingPathComponent(executableName)
        let generation = (previous?.generation ?? 0) + 1
        let directory: String
        let socketPath: String
        if let previous {
            guard !previous.isRunning else { throw SystemError("\(executableName) on \(previous.socketPath) still runs; kill() it first", code: EBUSY) }
            directory = previous.socketDirectory
            socketPath = previous.socketPath
            // The killed backend's socket file stays; the wait below must see the new one.
            unlink(socketPath)
        } else {
            directory = try ArtifactDirectory.makeShortSocketDirectory()
            socketPath = directory + "/vhost-user.sock"
        }
        let logName = generation == 1 ? "\(executableName).log" : "\(executableName).\(generation).log"
        let logPath = (logDirectory as NSString).appendingPathComponent(logName)
        let process: ChildProcess
        do {
            let log = open(logPath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            guard log >= 0 else { throw SystemError("open \(logPath)") }
            defer { closeDescriptor(log) }
            let argv = try namespace.commandPrefix() + [path, "--socket", socketPath, "--tap", tap, "--queues", "\(queues)"]
            process = try ChildProcess.spawn(path: argv[0], arguments: argv, environment: ProcessInfo.processInfo.environment,
                                             stdout: log, stderr: log)
        } catch {
            try? FileManager.default.removeItem(atPath: directory)
            throw error
        }
        let backend = VhostUserBackendProcess(socketPath: socketPath, logPath: logPath, process: process, socketDirectory: directory,
                                              generation: generation)
        // The socket file appears once it listens (bound under a temporary name, renamed).
        let deadline = ContinuousClock.now + .seconds(10)
        while !FileManager.default.fileExists(atPath: socketPath) {
            guard backend.isRunning, ContinuousClock.now < deadline else {
                let log = backend.log
                backend.stop()
                throw SystemError("\(executableName) did not listen on \(socketPath) within 10 s; its log:\n\(log)", code: ETIMEDOUT)
            }
            try await Task.sleep(for: .milliseconds(20))
        }
        return backend
    }

    /// Kills (SIGKILL) and reaps the backend, as a crash would end it; its socket file and
    /// directory stay, for a backend started `replacing:` it.
    public func kill() async throws {
        _ = process.signal(SIGKILL)
        _ = try await process.wait(timeout: .seconds(10))
    }

    /// Kills and reaps the backend and removes its socket directory (idempotent).
    public func stop() {
        process.close()
        try? FileManager.default.removeItem(atPath: socketDirectory)
    }
}
