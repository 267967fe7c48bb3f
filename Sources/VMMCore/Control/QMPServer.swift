import CLinux
import Glibc
import Logging
import QMPWire

/// Serves QMP on unix sockets (listening, or connecting out like QEMU's `-qmp unix:PATH`),
/// any number of clients at once, one after another or together. Runs on the event loop.
public final class QMPServer {
    private final class Connection {
        let fd: Int32
        var splitter = JSONStreamSplitter()
        /// fds received (SCM_RIGHTS) and not yet handed to a command.
        var pendingFDs: [Int32] = []
        var negotiated = false
        init(fd: Int32) { self.fd = fd }
    }

    private let loop: EventLoop
    private let logger: Logger
    private let dispatcher: QMPDispatcher
    private let greeting: JSON
    private var listeners: [(fd: Int32, path: String)] = []
    private var connections: [Int32: Connection] = [:]

    public init(loop: EventLoop, dispatcher: QMPDispatcher, greeting: JSON, logger: Logger) {
        self.loop = loop
        self.dispatcher = dispatcher
        self.greeting = greeting
        self.logger = logger
    }

    /// Opens every `-qmp` endpoint; `wait=on` servers block here until a client connects.
    public func open(_ specs: [ChardevSpec]) throws {
        for spec in specs {
            switch spec {
            case .unixServer(let path, let wait):
                let fd = try UnixSocket.listen(path: path)
                listeners.append((fd, path))
                loop.watch(fd) { [unowned self] _ in
                    if let client = UnixSocket.accept(fd) { accept(client) }
                }
                if wait, let client = UnixSocket.accept(fd) { accept(client) }
            case .unixClient(let path):
                accept(try UnixSocket.connect(path: path))
            default:
                throw QMPCommandError("QMP is served on unix sockets only")
            }
        }
    }

    private func accept(_ fd: Int32) {
        let connection = Connection(fd: fd)
        connections[fd] = connection
        loop.watch(fd) { [unowned self] _ in readable(connection) }
        send(greeting, to: connection)
        logger.debug("qmp: client connected (fd \(fd))")
    }

    private func readable(_ connection: Connection) {
        var chunk = [UInt8](repeating: 0, count: 4096)
        var fds = [Int32](repeating: -1, count: 16)
        var fdCount: Int32 = 0
        let n = chunk.withUnsafeMutableBytes { cl_recv_with_fds(connection.fd, $0.baseAddress, $0.count, &fds, 16, &fdCount) }
        connection.pendingFDs += fds.prefix(Int(fdCount))
        if n == -Int(EINTR) || n == -Int(EAGAIN) { return }
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
            // The handler may have closed everything (quit); only answer live clients.
            guard connections[connection.fd] === connection else { return }
            send(reply, to: connection)
        }
    }

    private func send(_ message: JSON, to connection: Connection) {
        let text = message.serialized + QMPMessage.lineTerminator
        logger.trace("qmp -> \(message.serialized)")
        let ok = Array(text.utf8).withUnsafeBytes { UnixSocket.writeAll(connection.fd, $0) }
        if !ok { drop(connection) }
    }

    private func drop(_ connection: Connection) {
        guard connections.removeValue(forKey: connection.fd) != nil else { return }
        connection.pendingFDs.forEach { Glibc.close($0) }
        connection.pendingFDs = []
        loop.unwatch(connection.fd)
        Glibc.close(connection.fd)
        logger.debug("qmp: client disconnected (fd \(connection.fd))")
    }

    /// Sends an event to every client that finished capability negotiation.
    public func emit(_ name: String, data: JSON? = nil) {
        var now = timespec()
        clock_gettime(CLOCK_REALTIME, &now)
        let event = QMPMessage.event(name, data: data, timestamp: QMPTimestamp(seconds: Int64(now.tv_sec), microseconds: Int64(now.tv_nsec / 1000)))
        for connection in connections.values where connection.negotiated { send(event, to: connection) }
    }

    public func close() {
        for connection in Array(connections.values) { drop(connection) }
        for (fd, path) in listeners {
            loop.unwatch(fd)
            Glibc.close(fd)
            unlink(path)
        }
        listeners.removeAll()
    }
}
