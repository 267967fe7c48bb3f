import QMPWire

/// `chardev-add`, `chardev-remove` and `query-chardev` for socket chardevs (the ones a
/// vhost-user netdev connects through), in QEMU 7.2's argument shapes.
extension Machine {
    func registerChardevCommands() {
        let d = dispatcher
        d.register("chardev-add", arguments: ["id": .string, "backend": .object], required: ["id", "backend"]) { [unowned self] args in
            let id = args["id"]!.stringValue!
            let chardev = try Self.socketChardev(id: id, backend: args["backend"]!.objectValue!)
            if let existing = chardevs[id] {
                throw QMPCommandError("Chardev '\(id)' already exists (unix:\(existing.path))")
            }
            chardevs[id] = chardev
            return [:]
        }
        d.register("chardev-remove", arguments: ["id": .string], required: ["id"]) { [unowned self] args in
            let id = args["id"]!.stringValue!
            guard chardevs[id] != nil else { throw QMPCommandError("Chardev '\(id)' not found") }
            if let netdev = chardevUsers[id] {
                throw QMPCommandError("Chardev '\(id)' is busy: netdev '\(netdev)' uses it (netdev_del it first)")
            }
            chardevs[id] = nil
            return [:]
        }
        d.register("query-chardev") { [unowned self] _ in
            .array(chardevs.keys.sorted().map { id in
                let user = chardevUsers[id]
                let connected = user.flatMap { netdevs[$0]?.linkUp } ?? false
                return ["label": .string(id), "filename": .string(chardevs[id]!.filename(connected: connected)),
                        "frontend-open": .bool(user != nil)]
            })
        }
    }

    /// `{"type": "socket", "data": {"addr": {"type": "unix", "data": {"path": P}}, "server": false, "reconnect": N}}`,
    /// checked member by member with QAPI's wording for their names and types.
    static func socketChardev(id: String, backend: JSONObject) throws -> SocketChardev {
        let context = "chardev-add '\(id)'"
        try QMPDispatcher.validate(backend, types: ["type": .string, "data": .object], required: ["type", "data"], path: "backend.")
        let type = backend["type"]!.stringValue!
        guard type == "socket" else {
            throw QMPCommandError("\(context): backend type '\(type)' is not supported (only 'socket', a unix socket the VMM connects to)")
        }
        let data = backend["data"]!.objectValue!
        try QMPDispatcher.validate(data, types: ["addr": .object, "server": .boolean, "wait": .boolean, "reconnect": .integer],
                                   required: ["addr"], path: "backend.data.")
        let addr = data["addr"]!.objectValue!
        try QMPDispatcher.validate(addr, types: ["type": .string, "data": .object], required: ["type", "data"], path: "backend.data.addr.")
        let addressType = addr["type"]!.stringValue!
        guard addressType == "unix" else {
            throw QMPCommandError("\(context): address type '\(addressType)' is not supported (only 'unix')")
        }
        let unix = addr["data"]!.objectValue!
        try QMPDispatcher.validate(unix, types: ["path": .string, "abstract": .boolean, "tight": .boolean], required: ["path"],
                                   path: "backend.data.addr.data.")
        if unix["abstract"]?.boolValue == true {
            throw QMPCommandError("\(context): abstract=true is not supported (a path in the file system only)")
        }
        if data["server"]?.boolValue == true {
            throw QMPCommandError("\(context): server=true is not supported (the VMM connects to the backend)")
        }
        let reconnect = data["reconnect"]?.intValue ?? 0
        do {
            return try SocketChardev(id: id, path: unix["path"]!.stringValue!, reconnect: Int(clamping: reconnect), context: context)
        } catch let error as VMMConfiguration.Error {
            throw QMPCommandError(error.description)
        }
    }
}
