import QMPWire

/// Where a migration goes: QEMU's `unix:PATH` and `tcp:HOST:PORT` URIs, or the
/// `channels` form of `migrate`/`migrate-incoming` (one channel of type "main").
public enum MigrationURI: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: UInt16)

    public init(_ text: String) throws {
        if text.hasPrefix("unix:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw StreamError("migration URI '\(text)' has no socket path") }
            self = .unix(path: path)
        } else if text.hasPrefix("tcp:") {
            let rest = text.dropFirst(4)
            // [v6::addr]:port or host:port; the port follows the last colon.
            guard let colon = rest.lastIndex(of: ":") else { throw StreamError("migration URI '\(text)' has no port (tcp:HOST:PORT)") }
            var host = String(rest[..<colon])
            if host.hasPrefix("[") && host.hasSuffix("]") { host = String(host.dropFirst().dropLast()) }
            self = .tcp(host: host, port: try Self.port(String(rest[rest.index(after: colon)...]), in: text))
        } else {
            throw StreamError("migration URI '\(text)' is not supported (use unix:PATH or tcp:HOST:PORT)")
        }
    }

    /// `[{"channel-type": "main", "addr": {"transport": "socket", "type": "unix", "path": P}}]`
    /// or with `"type": "inet", "host": H, "port": "N"` (QEMU sends the port as a string).
    public init(channels: JSON) throws {
        guard let list = channels.arrayValue, list.count == 1, let channel = list.first else {
            throw StreamError("'channels' must hold exactly one channel (of channel-type 'main')")
        }
        guard channel["channel-type"]?.stringValue == "main" else {
            throw StreamError("channel-type '\(channel["channel-type"]?.stringValue ?? "(missing)")' is not supported (only 'main')")
        }
        guard let addr = channel["addr"], addr.objectValue != nil else { throw StreamError("the channel has no 'addr'") }
        let transport = addr["transport"]?.stringValue ?? "(missing)"
        guard transport == "socket" else { throw StreamError("channel transport '\(transport)' is not supported (only 'socket')") }
        switch addr["type"]?.stringValue {
        case "unix":
            guard let path = addr["path"]?.stringValue, !path.isEmpty else { throw StreamError("a unix channel needs 'path'") }
            self = .unix(path: path)
        case "inet":
            guard let host = addr["host"]?.stringValue else { throw StreamError("an inet channel needs 'host'") }
            let portText = addr["port"]?.stringValue ?? addr["port"]?.intValue.map { String($0) } ?? ""
            self = .tcp(host: host, port: try Self.port(portText, in: "channel inet \(host)"))
        case let other:
            throw StreamError("channel socket type '\(other ?? "(missing)")' is not supported (unix or inet)")
        }
    }

    /// The `uri` or `channels` argument of migrate/migrate-incoming: exactly one of them.
    public init(arguments: JSONObject) throws {
        switch (arguments["uri"]?.stringValue, arguments["channels"]) {
        case (let uri?, nil): try self.init(uri)
        case (nil, let channels?): try self.init(channels: channels)
        case (nil, nil): throw StreamError("either 'uri' or 'channels' is required")
        case (_?, _?): throw StreamError("'uri' and 'channels' are mutually exclusive")
        }
    }

    static func port(_ text: String, in context: String) throws -> UInt16 {
        guard let port = UInt16(text), port > 0 else { throw StreamError("\(context): port '\(text)' is not a number in 1...65535") }
        return port
    }

    /// Only a unix socket carries file descriptors.
    public var carriesFileDescriptors: Bool { if case .unix = self { true } else { false } }

    public var description: String {
        switch self {
        case .unix(let path): "unix:\(path)"
        case .tcp(let host, let port): host.contains(":") ? "tcp:[\(host)]:\(port)" : "tcp:\(host):\(port)"
        }
    }
}
