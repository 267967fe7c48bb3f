import Glibc
import QMPWire

/// A QMP command failure, reported to the client as `{"error": {"class", "desc"}}`.
public struct QMPCommandError: Error, CustomStringConvertible, Sendable {
    public let errorClass: QMPErrorClass
    public let description: String

    public init(_ errorClass: QMPErrorClass, _ description: String) {
        self.errorClass = errorClass
        self.description = description
    }

    public init(_ description: String) { self.init(.genericError, description) }
}

/// File descriptors that arrived (SCM_RIGHTS) with a QMP message. A command such as
/// `getfd` claims them; whatever is left unclaimed is closed after the command ran.
public final class QMPRequestContext {
    private var fds: [FileDescriptor]

    public init(fds: [FileDescriptor] = []) { self.fds = fds }

    /// The most recently received fd, now owned by the caller.
    public func takeFD() -> FileDescriptor? { fds.popLast() }

    /// Closes what no command claimed; returns how many that were.
    @discardableResult
    public func closeUnclaimed() -> Int {
        let count = fds.count
        fds.forEach { $0.close() }
        fds.removeAll()
        return count
    }
}

/// The command table and QEMU's rules for one QMP message: framing checks, capability
/// negotiation, argument validation, `id` echo. It holds no connection state itself.
public final class QMPDispatcher {
    /// Argument types as QEMU's QAPI input visitor checks them, with its error wording, so
    /// that every command refuses a mistyped argument the same way QEMU does.
    public enum ArgumentType: Sendable {
        case string, boolean, integer, object, array, any
        /// QAPI `uint32` (e.g. `queues`): QEMU also takes negative numbers as their
        /// two's complement and then finds them out of range.
        case uint32
        /// QAPI `size` (e.g. `sndbuf`): a non-negative integer.
        case size

        /// Why `value` does not fit, in QEMU's words; nil when it does.
        func mismatch(_ value: JSON, key: String) -> String? {
            switch (self, value) {
            case (.any, _), (.string, .string), (.boolean, .bool), (.integer, .int), (.object, .object), (.array, .array): return nil
            case (.integer, .double(let d)) where Int64(exactly: d) != nil: return nil
            case (.uint32, _):
                guard let n = value.intValue else { return "Parameter '\(key)' expects uint64" }
                return UInt32(exactly: n) == nil ? "Parameter '\(key)' expects uint32_t" : nil
            case (.size, _):
                guard let n = value.intValue, n >= 0 else { return "Parameter '\(key)' expects uint64" }
                return nil
            default: return "Invalid parameter type for '\(key)', expected: \(qapiName)"
            }
        }

        private var qapiName: String {
            switch self {
            case .string: return "string"
            case .boolean: return "boolean"
            case .integer: return "integer"
            case .object: return "object"
            case .array: return "array"
            case .any: return "any"
            case .uint32, .size: return "uint64"
            }
        }
    }

    public struct Command {
        public let name: String
        public let arguments: [String: ArgumentType]
        public let required: Set<String>
        public let handler: (JSONObject, QMPRequestContext) throws -> JSON
    }

    private var commands: [String: Command] = [:]
    public private(set) var commandNames: [String] = []

    public init() {}

    public func register(_ name: String, arguments: [String: ArgumentType] = [:], required: Set<String> = [],
                         handler: @escaping (JSONObject) throws -> JSON) {
        register(name, arguments: arguments, required: required) { args, _ in try handler(args) }
    }

    public func register(_ name: String, arguments: [String: ArgumentType] = [:], required: Set<String> = [],
                         handler: @escaping (JSONObject, QMPRequestContext) throws -> JSON) {
        if commands[name] == nil { commandNames.append(name) }
        commands[name] = Command(name: name, arguments: arguments, required: required, handler: handler)
    }

    /// Handles one input line for a client; `negotiated` is that client's capability state.
    /// Returns the reply to send (every well-formed or malformed line gets exactly one).
    public func handle(line: String, negotiated: inout Bool, context: QMPRequestContext = QMPRequestContext()) -> JSON {
        let message: JSON
        do {
            message = try JSON.parse(line)
        } catch {
            // QEMU words the nesting limit on its own, other parse errors with this prefix.
            let desc = error.message == JSONParseError.nestingLimitMessage ? error.message : "JSON parse error, \(error.message)"
            return QMPMessage.error(.genericError, desc, id: nil)
        }
        guard case .object(let object) = message else {
            return QMPMessage.error(.genericError, "QMP input must be a JSON object", id: nil)
        }
        let id = object["id"]
        for key in object.keys where !["execute", "arguments", "id", "exec-oob"].contains(key) {
            return QMPMessage.error(.genericError, "QMP input member '\(key)' is unexpected", id: id)
        }
        if object["exec-oob"] != nil {
            return QMPMessage.error(.genericError, "Out-of-band execution is not supported by this server", id: id)
        }
        guard let execute = object["execute"] else {
            return QMPMessage.error(.genericError, "QMP input lacks member 'execute'", id: id)
        }
        guard let name = execute.stringValue else {
            return QMPMessage.error(.genericError, "QMP input member 'execute' must be a string", id: id)
        }
        var arguments = JSONObject()
        if let args = object["arguments"] {
            guard let argsObject = args.objectValue else {
                return QMPMessage.error(.genericError, "QMP input member 'arguments' must be an object", id: id)
            }
            arguments = argsObject
        }
        if name == "qmp_capabilities" {
            if negotiated {
                return QMPMessage.error(.commandNotFound, "Capabilities negotiation is already complete, command ignored", id: id)
            }
        } else if !negotiated {
            return QMPMessage.error(.commandNotFound, "Expecting capabilities negotiation with 'qmp_capabilities'", id: id)
        }
        guard let command = commands[name] else {
            return QMPMessage.error(.commandNotFound, "The command \(name) has not been found", id: id)
        }
        do {
            try validate(arguments, for: command)
            let result = try command.handler(arguments, context)
            if name == "qmp_capabilities" { negotiated = true }
            return QMPMessage.reply(result, id: id)
        } catch let error as QMPCommandError {
            return QMPMessage.error(error.errorClass, error.description, id: id)
        } catch {
            return QMPMessage.error(.genericError, "\(error)", id: id)
        }
    }

    func validate(_ arguments: JSONObject, for command: Command) throws {
        try Self.validate(arguments, types: command.arguments, required: command.required)
    }

    /// Checks an object's members as QEMU's QAPI input visitor does; `path` names a nested
    /// object's members as QEMU does (`backend.data.addr`).
    public static func validate(_ object: JSONObject, types: [String: ArgumentType], required: Set<String>, path: String = "") throws {
        for (key, value) in object.pairs {
            guard let type = types[key] else { throw QMPCommandError("Parameter '\(path)\(key)' is unexpected") }
            if let mismatch = type.mismatch(value, key: path + key) { throw QMPCommandError(mismatch) }
        }
        for key in required.sorted() where object[key] == nil {
            throw QMPCommandError("Parameter '\(path)\(key)' is missing")
        }
    }
}
