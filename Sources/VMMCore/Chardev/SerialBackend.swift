import CLinux
import Glibc
import Logging
import Synchronization

/// Connects a UART to the host side named by `-serial`: stdio, a file, or a unix socket
/// (listening or connecting). Output comes from the vCPU thread; input and connection
/// changes are handled on the event loop.
///
/// The vCPU never waits for a reader: output is written without blocking, what the
/// reader cannot take yet waits in a buffer of `outputLimit` bytes that the event loop
/// flushes, and beyond that it is dropped and counted (logged when the reader catches
/// up or goes away), as a UART without flow control loses what nobody reads.
public final class SerialBackend: @unchecked Sendable {
    /// Several screens of output: enough for a reader that is briefly slow.
    static let outputLimit = 64 << 10

    private struct Output {
        /// The fd console output currently goes to (-1: nobody listening, output is dropped).
        var fd: Int32 = -1
        var pending = OutputBuffer(limit: SerialBackend.outputLimit)
        /// Bytes lost since the last report because the reader did not keep up.
        var dropped = 0
    }

    private let spec: ChardevSpec
    private let logger: Logger
    private let output = Mutex(Output())
    private var inputFD: Int32 = -1
    private var listenFD: Int32 = -1
    private var acceptor: ClientAcceptor?
    private var ownedFDs: Set<Int32> = []
    private var savedTerminal: termios?
    private var loop: EventLoop?
    private var sink: ((UnsafeRawBufferPointer) -> Int)?
    private var wantsInput: (() -> Bool)?

    public init(spec: ChardevSpec, logger: Logger) throws {
        self.spec = spec
        self.logger = logger
        switch spec {
        case .none:
            break
        case .stdio:
            output.withLock { $0.fd = STDOUT_FILENO }
            inputFD = STDIN_FILENO
            makeTerminalRaw()
        case .file(let path):
            let fd = try syscallRetrying("open -serial file \(path)") { cl_open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
            ownedFDs.insert(fd)
            output.withLock { $0.fd = fd }
        case .unixServer(let path, _):
            do {
                listenFD = try UnixSocket.listen(path: path, backlog: 1)
            } catch {
                throw VMMConfiguration.Error("-serial unix:\(path): \(error)")
            }
            ownedFDs.insert(listenFD)
        case .unixClient(let path):
            do {
                adopt(try UnixSocket.connect(path: path))
            } catch {
                throw VMMConfiguration.Error("-serial unix:\(path): \(error)")
            }
        }
    }

    /// `server=on,wait=on`: blocks until the first client connects, or throws
    /// `TerminationRequested` when a termination signal comes first.
    func waitForFirstClient(_ signals: TerminationSignals) throws {
        guard case .unixServer(let path, true) = spec, inputFD < 0 else { return }
        logger.info("serial: waiting for a connection on \(path)")
        adopt(try signals.waitForClient(on: listenFD))
    }

    /// The `-serial` endpoint as a user wrote it, for log lines.
    private var endpoint: String {
        switch spec {
        case .none: return "none"
        case .stdio: return "stdio"
        case .file(let path): return "file:\(path)"
        case .unixServer(let path, _), .unixClient(let path): return "unix:\(path)"
        }
    }

    private func adopt(_ fd: Int32) {
        ownedFDs.insert(fd)
        inputFD = fd
        output.withLock {
            $0.fd = fd
            $0.pending.removeAll()
        }
    }

    /// Starts delivering input: `sink` takes bytes and returns how many it accepted;
    /// `wantsInput` says whether there is room (the loop stops reading otherwise).
    public func attach(to loop: EventLoop, wantsInput: @escaping () -> Bool, sink: @escaping (UnsafeRawBufferPointer) -> Int) {
        self.loop = loop
        self.sink = sink
        self.wantsInput = wantsInput
        if listenFD >= 0 {
            acceptor = ClientAcceptor(fd: listenFD, what: "serial \(endpoint)", loop: loop, logger: logger,
                                      wanted: { [unowned self] in inputFD < 0 }) { [unowned self] client in
                adopt(client)
                watch(client)
            }
        }
        if inputFD >= 0 { watch(inputFD) }
        let outputFD = output.withLock { $0.fd }
        if outputFD >= 0 && outputFD != inputFD { watch(outputFD) }
    }

    /// One source per fd: a socket client is both input and output; stdio and files are one of them.
    private func watch(_ fd: Int32) {
        guard let loop else { return }
        loop.watch(fd, interest: { [unowned self] in
            var events: Int16 = 0
            if fd == inputFD && wantsInput?() == true { events |= Int16(POLLIN) }
            if output.withLock({ $0.fd == fd && !$0.pending.isEmpty }) { events |= Int16(POLLOUT) }
            return events
        }) { [unowned self] events in
            // A hang-up is reported even when only POLLOUT was asked for: writing finds out
            // (and disconnects) without reading input the UART has no room for.
            let trouble = Int16(POLLERR | POLLHUP)
            if events & (Int16(POLLOUT) | trouble) != 0 { flushOutput(fd) }
            if events & (Int16(POLLIN) | trouble) != 0, fd == inputFD, wantsInput?() == true { readInput(fd) }
        }
    }

    private func readInput(_ fd: Int32) {
        var buffer = [UInt8](repeating: 0, count: 1024)
        let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
        if n <= 0 {
            if n < 0 && (errno == EINTR || errno == EAGAIN) { return }
            disconnect(fd)
            return
        }
        // Never read more than the UART can take, so `accepted` is normally all of it.
        let accepted = buffer.withUnsafeBytes { sink?(UnsafeRawBufferPointer(rebasing: $0[0..<n])) ?? n }
        if accepted < n { logger.warning("serial: dropped \(n - accepted) input bytes, guest input buffer full") }
    }

    /// Loop thread: writes what the reader takes now, and reports losses once it caught up.
    private func flushOutput(_ fd: Int32) {
        let (result, dropped) = output.withLock { o -> (OutputBuffer.FlushResult, Int) in
            guard o.fd == fd else { return (.drained, 0) }
            let result = o.pending.flush(to: fd)
            guard result == .drained else { return (result, 0) }
            defer { o.dropped = 0 }
            return (result, o.dropped)
        }
        if dropped > 0 { reportDropped(dropped) }
        if result == .peerGone { disconnect(fd) }
    }

    private func reportDropped(_ count: Int) {
        logger.warning("serial: dropped \(count) bytes of console output that the reader on \(endpoint) did not take in time")
    }

    private func disconnect(_ fd: Int32) {
        loop?.unwatch(fd)
        if fd == STDIN_FILENO {
            inputFD = -1
            // stdout stays: still watch it if it shares nothing with stdin.
            return
        }
        let lost = output.withLock { o -> Int in
            guard o.fd == fd else { return 0 }
            defer {
                o.fd = -1
                o.dropped = 0
                o.pending.removeAll()
            }
            return o.dropped + o.pending.count
        }
        if lost > 0 { reportDropped(lost) }
        if inputFD == fd { inputFD = -1 }
        if ownedFDs.remove(fd) != nil { Glibc.close(fd) }
        logger.debug("serial: client disconnected")
    }

    /// Called on the vCPU thread for every byte the guest transmits; never blocks.
    public func write(_ byte: UInt8) {
        let wakeLoop = output.withLock { o -> Bool in
            guard o.fd >= 0 else { return false }
            if o.pending.isEmpty {
                var b = byte
                switch withUnsafeBytes(of: &b, { UnixSocket.writeNonBlocking(o.fd, $0) }) {
                case 1: return false
                case nil:
                    // The reader is gone; the loop notices on its side and cleans up.
                    if o.fd != STDOUT_FILENO { o.fd = -1 }
                    return false
                default:
                    // Full: the loop watches for room from now on.
                    _ = o.pending.append(CollectionOfOne(byte))
                    return true
                }
            }
            if !o.pending.append(CollectionOfOne(byte)) { o.dropped += 1 }
            return false
        }
        if wakeLoop { loop?.poke() }
    }

    private func makeTerminalRaw() {
        guard isatty(STDIN_FILENO) == 1 else { return }
        var t = termios()
        guard tcgetattr(STDIN_FILENO, &t) == 0 else { return }
        savedTerminal = t
        // Raw input, but keep ISIG so Ctrl-C still stops the VMM.
        t.c_lflag &= ~tcflag_t(ICANON | ECHO | ECHONL | IEXTEN)
        t.c_iflag &= ~tcflag_t(ICRNL | INLCR | IXON)
        tcsetattr(STDIN_FILENO, TCSANOW, &t)
    }

    /// Restores the terminal and removes the listening socket file.
    public func close() {
        if var t = savedTerminal {
            tcsetattr(STDIN_FILENO, TCSANOW, &t)
            savedTerminal = nil
        }
        if case .unixServer(let path, _) = spec { unlink(path) }
        let lost = output.withLock { o -> Int in
            defer {
                o.fd = -1
                o.pending.removeAll()
                o.dropped = 0
            }
            return o.dropped
        }
        if lost > 0 { reportDropped(lost) }
        acceptor?.close()
        acceptor = nil
        for fd in ownedFDs {
            loop?.unwatch(fd)
            Glibc.close(fd)
        }
        ownedFDs.removeAll()
        inputFD = -1
        listenFD = -1
    }

    deinit { close() }
}
