/// A character backend in QEMU's `-serial`/`-qmp` spelling.
public enum ChardevSpec: Sendable, Equatable {
    case none
    case stdio
    case file(path: String)
    /// We listen on `path`; with `wait`, start-up blocks until a client connects.
    case unixServer(path: String, wait: Bool)
    /// We connect to a socket someone else listens on (QEMU's default for `unix:` without `server`).
    case unixClient(path: String)

    public static func parse(_ text: String, option: String) throws -> ChardevSpec {
        switch text {
        case "none", "null": return .none
        case "stdio", "mon:stdio": return .stdio
        default: break
        }
        if text.hasPrefix("file:") {
            let path = String(text.dropFirst(5))
            guard !path.isEmpty else { throw KeyValueList.ParseError(description: "\(option) \(text): missing file path") }
            return .file(path: path)
        }
        if text.hasPrefix("unix:") {
            let list = try KeyValueList(String(text.dropFirst(5)), option: option, impliedKey: "path")
            try list.checkKeys(["path", "server", "wait"], context: text)
            guard let path = list["path"], !path.isEmpty else {
                throw KeyValueList.ParseError(description: "\(option) \(text): missing socket path")
            }
            if try list.bool("server", default: false) {
                return .unixServer(path: path, wait: try list.bool("wait", default: true))
            }
            return .unixClient(path: path)
        }
        throw KeyValueList.ParseError(description: "\(option) \(text): unsupported backend (use stdio, file:PATH, unix:PATH[,server=on,wait=off] or none)")
    }
}
