import CLinux
import Glibc
import Logging
import QMPWire

/// Serves QMP on unix sockets (listening, or connecting out like QEMU's `-qmp unix:PATH`),
/// any number of clients at once, one after another or together. Runs on the event loop.
public final class QMPServer {
    private final class Connection {
        let fd: Int32
        var buffer: [UInt8] = []
        var negotiated = false
        init(fd: Int32) { self.fd = fd }
    }

    static let maxLineLength = 1 << 20

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
        let n = chunk.withUnsafeMutableBytes { read(connection.fd, $0.baseAddress, $0.count) }
        if n < 0 && (errno == EINTR || errno == EAGAIN) { return }
        guard n > 0 else {
            drop(connection)
            return
        }
        connection.buffer.append(contentsOf: chunk[0..<n])
        while let newline = connection.buffer.firstIndex(of: UInt8(ascii: "\n")) {
            let lineBytes = connection.buffer[..<newline]
            connection.buffer.removeSubrange(...newline)
            let line = String(decoding: lineBytes, as: UTF8.self)
            guard line.contains(where: { !$0.isWhitespace }) else { continue }
            logger.trace("qmp <- \(line)")
            // A local copy: the command may emit events, which read every connection's state.
            var negotiated = connection.negotiated
            let reply = dispatcher.handle(line: line, negotiated: &negotiated)
            connection.negotiated = negotiated
            // The handler may have closed everything (quit); only answer live clients.
            if connections[connection.fd] === connection { send(reply, to: connection) }
        }
        if connection.buffer.count > Self.maxLineLength {
            connection.buffer.removeAll()
            send(QMPMessage.error(.genericError, "JSON parse error, input line longer than \(Self.maxLineLength) bytes", id: nil), to: connection)
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
