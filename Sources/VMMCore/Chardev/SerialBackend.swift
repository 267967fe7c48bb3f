import CLinux
import Glibc
import Logging
import Synchronization

/// Connects a UART to the host side named by `-serial`: stdio, a file, or a unix socket
/// (listening or connecting). Output comes from the vCPU thread; input and connection
/// changes are handled on the event loop.
public final class SerialBackend: @unchecked Sendable {
    private let spec: ChardevSpec
    private let logger: Logger
    /// The fd console output currently goes to (-1: nobody listening, output is dropped).
    private let outputFD = Mutex<Int32>(-1)
    private var inputFD: Int32 = -1
    private var listenFD: Int32 = -1
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
            outputFD.withLock { $0 = STDOUT_FILENO }
            inputFD = STDIN_FILENO
            makeTerminalRaw()
        case .file(let path):
            let fd = try syscallRetrying("open -serial file \(path)") { cl_open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644) }
            ownedFDs.insert(fd)
            outputFD.withLock { $0 = fd }
        case .unixServer(let path, let wait):
            listenFD = try UnixSocket.listen(path: path, backlog: 1)
            ownedFDs.insert(listenFD)
            if wait {
                logger.info("serial: waiting for a connection on \(path)")
                if let client = UnixSocket.accept(listenFD) { adopt(client) }
            }
        case .unixClient(let path):
            adopt(try UnixSocket.connect(path: path))
        }
    }

    private func adopt(_ fd: Int32) {
        ownedFDs.insert(fd)
        inputFD = fd
        outputFD.withLock { $0 = fd }
    }

    /// Starts delivering input: `sink` takes bytes and returns how many it accepted;
    /// `wantsInput` says whether there is room (the loop stops reading otherwise).
    public func attach(to loop: EventLoop, wantsInput: @escaping () -> Bool, sink: @escaping (UnsafeRawBufferPointer) -> Int) {
        self.loop = loop
        self.sink = sink
        self.wantsInput = wantsInput
        if listenFD >= 0 {
            loop.watch(listenFD, interest: { [unowned self] in inputFD < 0 ? Int16(POLLIN) : 0 }) { [unowned self] _ in
                guard let client = UnixSocket.accept(listenFD) else { return }
                adopt(client)
                watchInput()
            }
        }
        watchInput()
    }

    private func watchInput() {
        guard let loop, inputFD >= 0 else { return }
        let fd = inputFD
        loop.watch(fd, interest: { [unowned self] in wantsInput?() == true ? Int16(POLLIN) : 0 }) { [unowned self] _ in
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
    }

    private func disconnect(_ fd: Int32) {
        loop?.unwatch(fd)
        if fd == STDIN_FILENO {
            inputFD = -1
            return
        }
        outputFD.withLock { if $0 == fd { $0 = -1 } }
        if inputFD == fd { inputFD = -1 }
        if ownedFDs.remove(fd) != nil { Glibc.close(fd) }
        logger.debug("serial: client disconnected")
    }

    /// Called on the vCPU thread for every byte the guest transmits.
    public func write(_ byte: UInt8) {
        outputFD.withLock { fd in
            guard fd >= 0 else { return }
            var b = byte
            if !withUnsafeBytes(of: &b, { UnixSocket.writeAll(fd, $0) }) {
                // The reader is gone; drop output until someone reconnects.
                if fd != STDOUT_FILENO { fd = -1 }
            }
        }
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
        outputFD.withLock { $0 = -1 }
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
