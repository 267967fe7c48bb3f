import QMPWire

/// Where one migration channel goes: QEMU's `unix:PATH` and `tcp:HOST:PORT` URIs, or
/// a channel's `addr` object (`MigrationChannels` reads the `channels` form).
public enum MigrationURI: Sendable, Equatable, CustomStringConvertible {
    case unix(path: String)
    case tcp(host: String, port: UInt16)
    /// A socket the process already holds: on the target a listening socket, given as an
    /// inherited fd number (`-incoming`) or a `getfd` name (`migrate-incoming`).
    case fd(String)

    public init(_ text: String) throws {
        if text.hasPrefix("fd:") {
            let name = String(text.dropFirst(3))
            guard !name.isEmpty else { throw StreamError("migration URI '\(text)' has no fd number or name") }
            self = .fd(name)
        } else if text.hasPrefix("unix:") {
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
            throw StreamError("migration URI '\(text)' is not supported (use unix:PATH, tcp:HOST:PORT or fd:N)")
        }
    }

    /// A channel's `addr`: `{"transport": "socket", "type": "unix", "path": P}` or
    /// `{..., "type": "inet", "host": H, "port": "N"}` (QEMU sends the port as a string).
    public init(address addr: JSON) throws {
        guard addr.objectValue != nil else { throw StreamError("the channel has no 'addr'") }
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
        case "fd":
            guard let name = addr["str"]?.stringValue ?? addr["str"]?.intValue.map({ String($0) }), !name.isEmpty else {
                throw StreamError("an fd channel needs 'str' (an fd number or getfd name)")
            }
            self = .fd(name)
        case let other:
            throw StreamError("channel socket type '\(other ?? "(missing)")' is not supported (unix, inet or fd)")
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
        case .fd(let name): "fd:\(name)"
        }
    }
}

/// QEMU's `channel-type`: what a migration connection carries. `main` carries the
/// stream (configuration, RAM, device state); `cpr` carries, for cpr-transfer, the
/// fds the target needs before it can build its devices (docs/migration-format.md).
public enum MigrationChannelType: String, Sendable, CaseIterable {
    case main, cpr
}

/// The channels of one migration, as `migrate`, `migrate-incoming` and `-incoming`
/// give them: a `uri` (the main channel) or `channels: [{channel-type, addr}]`, each
/// type at most once.
public struct MigrationChannels: Sendable, Equatable {
    public var main: MigrationURI?
    public var cpr: MigrationURI?

    public init(main: MigrationURI? = nil, cpr: MigrationURI? = nil) {
        self.main = main
        self.cpr = cpr
    }

    public subscript(type: MigrationChannelType) -> MigrationURI? {
        get { type == .main ? main : cpr }
        set { if type == .main { main = newValue } else { cpr = newValue } }
    }

    /// `[{"channel-type": T, "addr": {...}}, ...]`.
    public init(channels: JSON) throws {
        guard let list = channels.arrayValue, !list.isEmpty else {
            throw StreamError("'channels' must be a non-empty list of channels ('main', and 'cpr' for cpr-transfer)")
        }
        self.init()
        for channel in list { try add(channel) }
    }

    /// Adds one `{"channel-type": T, "addr": {...}}`; a type given twice is refused.
    public mutating func add(_ channel: JSON) throws {
        let name = channel["channel-type"]?.stringValue ?? "(missing)"
        guard let type = MigrationChannelType(rawValue: name) else {
            throw StreamError("channel-type '\(name)' is not supported (main or cpr)")
        }
        guard self[type] == nil else { throw StreamError("the \(type) channel is given twice") }
        self[type] = try MigrationURI(address: channel["addr"] ?? .null)
    }

    /// The `uri` or `channels` argument of migrate/migrate-incoming: exactly one of them.
    public init(arguments: JSONObject) throws {
        switch (arguments["uri"]?.stringValue, arguments["channels"]) {
        case (let uri?, nil): self.init(main: try MigrationURI(uri))
        case (nil, let channels?): try self.init(channels: channels)
        case (nil, nil): throw StreamError("either 'uri' or 'channels' is required")
        case (_?, _?): throw StreamError("'uri' and 'channels' are mutually exclusive")
        }
    }

    /// One `-incoming` value: a URI (the main channel) or a JSON channel object, as
    /// QEMU's `-incoming '{"channel-type": "cpr", "addr": {...}}'`. Several values add up.
    public mutating func add(incoming text: String) throws {
        guard text.hasPrefix("{") else {
            guard main == nil else { throw StreamError("the main channel is given twice") }
            main = try MigrationURI(text)
            return
        }
        let channel: JSON
        do { channel = try JSON.parse(text) } catch { throw StreamError("not a JSON channel object: \(error)") }
        try add(channel)
    }
}
