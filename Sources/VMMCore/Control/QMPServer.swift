import CLinux
import Glibc
import Logging
import QMPWire

/// Serves QMP on unix sockets (listening, or connecting out like QEMU's `-qmp unix:PATH`),
/// any number of clients at once, one after another or together. Runs on the event loop.
///
/// No client can stall the loop: sockets are non-blocking and each connection has an
/// output buffer of `outputLimit` bytes. A client that sends commands without reading
/// the replies is simply not read from while its buffer holds `inputPauseThreshold`
/// bytes (it is served again once it reads); events cannot wait, so a client whose
/// unread replies and events pass `outputLimit` is disconnected, with a log line.
public final class QMPServer {
    /// 4 MiB: QEMU buffered 20,000 unread replies and 20,000 STOP/RESUME pairs (about
    /// 3 MB of events) for one client; this holds such bursts with room to spare.
    public static let defaultOutputLimit = 4 << 20
    /// Replies beyond this wait in the client's input until it reads.
    static let inputPauseThreshold = 64 << 10

    private final class Connection {
        let fd: Int32
        let name: String
        var splitter = JSONStreamSplitter()
        /// fds received (SCM_RIGHTS) and not yet handed to a command.
        var pendingFDs: [FileDescriptor] = []
        var negotiated = false
        var output: OutputBuffer
        /// The client closed its side (e.g. `socat` after its last command): it still
        /// gets the replies that wait, then the connection ends.
        var inputClosed = false
        init(fd: Int32, name: String, outputLimit: Int) {
            self.fd = fd
            self.name = name
            output = OutputBuffer(limit: outputLimit)
        }
    }

    private let loop: EventLoop
    private let logger: Logger
    private let dispatcher: QMPDispatcher
    private let greeting: JSON
    private let outputLimit: Int
    private var listeners: [(acceptor: ClientAcceptor, path: String)] = []
    private var connections: [Int32: Connection] = [:]

    public init(loop: EventLoop, dispatcher: QMPDispatcher, greeting: JSON, logger: Logger,
                outputLimit: Int = QMPServer.defaultOutputLimit) {
        self.loop = loop
        self.dispatcher = dispatcher
        self.greeting = greeting
        self.logger = logger
        self.outputLimit = outputLimit
    }

    /// Opens every `-qmp` endpoint; `wait=on` servers wait here until a client connects,
    /// or throw `TerminationRequested` when `signals` delivers one first.
    func open(_ specs: [ChardevSpec], signals: TerminationSignals?) throws {
        for spec in specs {
            switch spec {
            case .unixServer(let path, let wait):
                let fd: Int32
                do {
                    fd = try UnixSocket.listen(path: path)
                } catch {
                    throw QMPCommandError("-qmp unix:\(path): \(error)")
                }
                let name = "QMP client on \(path)"
                listeners.append((ClientAcceptor(fd: fd, what: "qmp \(path)", loop: loop, logger: logger) { [unowned self] client in
                    accept(client, name: name)
                }, path))
                if wait, let signals {
                    logger.info("qmp: waiting for a connection on \(path)")
                    accept(try signals.waitForClient(on: fd), name: name)
                }
            case .unixClient(let path):
                do {
                    accept(try UnixSocket.connect(path: path), name: "QMP server \(path)")
                } catch {
                    throw QMPCommandError("-qmp unix:\(path): \(error)")
                }
            default:
                throw QMPCommandError("QMP is served on unix sockets only")
            }
        }
    }

    /// Opens endpoints without waiting for signals (tests that run a server in-process).
    public func open(_ specs: [ChardevSpec]) throws { try open(specs, signals: nil) }

    private func accept(_ fd: Int32, name: String) {
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let connection = Connection(fd: fd, name: "\(name) (fd \(fd))", outputLimit: outputLimit)
        connections[fd] = connection
        loop.watch(fd, interest: {
            (!connection.inputClosed && connection.output.count < Self.inputPauseThreshold ? Int16(POLLIN) : 0)
                | (connection.output.isEmpty ? 0 : Int16(POLLOUT))
        }) { [unowned self] events in
            // Hang-ups and errors come whether asked for or not; writing or reading finds out which.
            if events & Int16(POLLOUT | POLLERR | POLLHUP) != 0, !connection.output.isEmpty { flush(connection) }
            if events & ~Int16(POLLOUT) != 0, !connection.inputClosed, connections[fd] === connection { readable(connection) }
        }
        send(greeting, to: connection)
        logger.debug("qmp: \(connection.name) connected")
    }

    private func readable(_ connection: Connection) {
        var chunk = [UInt8](repeating: 0, count: 4096)
        var fds = [Int32](repeating: -1, count: 16)
        var fdCount: Int32 = 0
        let n = chunk.withUnsafeMutableBytes { cl_recv_with_fds(connection.fd, $0.baseAddress, $0.count, &fds, 16, &fdCount) }
        connection.pendingFDs += fds.prefix(Int(fdCount)).map { FileDescriptor(adopting: $0, label: "fd received on QMP") }
        if n == -Int(EINTR) || n == -Int(EAGAIN) { return }
        if n == 0 && !connection.output.isEmpty {
            connection.inputClosed = true
            return
        }
        guard n > 0 else {
            drop(connection)
            return
        }
        for output in connection.splitter.feed(chunk[0..<n]) {
            let reply: JSON
            switch output {
            case .message(let bytes):
                let line = String(decoding: bytes, as: UTF8.self)
                logger.trace("qmp <- \(line)")
                // A local copy: the command may emit events, which read every connection's state.
                var negotiated = connection.negotiated
                // fds travel with the message they arrived with; the command may claim them.
                let context = QMPRequestContext(fds: connection.pendingFDs)
                connection.pendingFDs = []
                reply = dispatcher.handle(line: line, negotiated: &negotiated, context: context)
                let unclaimed = context.closeUnclaimed()
                if unclaimed > 0 { logger.warning("qmp: closed \(unclaimed) received fd(s) that '\(line.prefix(60))' did not claim") }
                connection.negotiated = negotiated
            case .tooLong:
                reply = QMPMessage.error(.genericError, "JSON parse error, message longer than \(JSONStreamSplitter.maxMessageLength) bytes", id: nil)
            }
            // The handler may have closed everything (quit), or this client overflowed: only answer live clients.
            guard connections[connection.fd] === connection else { return }
            send(reply, to: connection)
        }
    }

    /// Queues `message` and writes what the socket takes now; never blocks.
    private func send(_ message: JSON, to connection: Connection) {
        let text = message.serialized
        logger.trace("qmp -> \(text)")
        let wasEmpty = connection.output.isEmpty
        guard connection.output.append((text + QMPMessage.lineTerminator).utf8) else {
            logger.warning("qmp: disconnecting \(connection.name): it left \(connection.output.count) bytes of replies and events unread, the limit is \(outputLimit)")
            drop(connection)
            return
        }
        if wasEmpty { flush(connection) }
    }

    private func flush(_ connection: Connection) {
        switch connection.output.flush(to: connection.fd) {
        case .peerGone: drop(connection)
        case .drained where connection.inputClosed: drop(connection)
        default: break
        }
    }

    private func drop(_ connection: Connection) {
        guard connections.removeValue(forKey: connection.fd) != nil else { return }
        connection.pendingFDs.forEach { $0.close() }
        connection.pendingFDs = []
        connection.output.removeAll()
        loop.unwatch(connection.fd)
        Glibc.close(connection.fd)
        logger.debug("qmp: \(connection.name) disconnected")
        // An fd is free again: a listener that ran out of them can accept now.
        for listener in listeners { listener.acceptor.resume() }
    }

    /// Sends an event to every client that finished capability negotiation.
    public func emit(_ name: String, data: JSON? = nil) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let event = QMPMessage.event(name, data: data, timestamp: QMPTimestamp(seconds: Int64(now.tv_sec), microseconds: Int64(now.tv_nsec / 1000)))
        for connection in connections.values where connection.negotiated { send(event, to: connection) }
    }

    /// Closes every client, after one last non-blocking flush (the `quit` reply and
    /// SHUTDOWN reach every client that reads), and removes the socket files.
    public func close() {
        for connection in Array(connections.values) {
            flush(connection)
            drop(connection)
        }
        for (acceptor, path) in listeners {
            acceptor.close()
            Glibc.close(acceptor.fd)
            unlink(path)
        }
        listeners.removeAll()
    }
}
