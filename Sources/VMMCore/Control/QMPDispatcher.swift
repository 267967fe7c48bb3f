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
    private var fds: [Int32]

    public init(fds: [Int32] = []) { self.fds = fds }

    /// The most recently received fd, now owned by the caller.
    public func takeFD() -> Int32? { fds.popLast() }

    /// Closes what no command claimed; returns how many that were.
    @discardableResult
    public func closeUnclaimed() -> Int {
        let count = fds.count
        for fd in fds { close(fd) }
        fds.removeAll()
        return count
    }
}

/// The command table and QEMU's rules for one QMP message: framing checks, capability
/// negotiation, argument validation, `id` echo. It holds no connection state itself.
public final class QMPDispatcher {
    public enum ArgumentType: String, Sendable {
        case string, boolean = "bool", integer = "int", object, array, any

        func accepts(_ value: JSON) -> Bool {
            switch (self, value) {
            case (.any, _), (.string, .string), (.boolean, .bool), (.integer, .int), (.object, .object), (.array, .array): return true
            case (.integer, .double(let d)): return Int64(exactly: d) != nil
            default: return false
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
            return QMPMessage.error(.genericError, "JSON parse error, \(error.message)", id: nil)
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
        for (key, value) in arguments.pairs {
            guard let type = command.arguments[key] else { throw QMPCommandError("Parameter '\(key)' is unexpected") }
            guard type.accepts(value) else {
                throw QMPCommandError("Invalid parameter type for '\(key)', expected: \(type.rawValue)")
            }
        }
        for key in command.required.sorted() where arguments[key] == nil {
            throw QMPCommandError("Parameter '\(key)' is missing")
        }
    }
}
