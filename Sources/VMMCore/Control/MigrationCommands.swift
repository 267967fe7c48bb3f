import QMPWire

/// QMP's migration commands, with QEMU's names and shapes.
extension Machine {
    func registerMigrationCommands() {
        let d = dispatcher
        d.register("migrate", arguments: ["uri": .string, "detach": .boolean, "resume": .boolean], required: ["uri"]) { [unowned self] args in
            try startMigration(uri: args["uri"]!.stringValue!)
            return [:]
        }
        d.register("migrate-incoming", arguments: ["uri": .string], required: ["uri"]) { [unowned self] args in
            try startIncoming(uri: args["uri"]!.stringValue!)
            return [:]
        }
        d.register("migrate-set-capabilities", arguments: ["capabilities": .array], required: ["capabilities"]) { [unowned self] args in
            guard !migration.isActive else { throw QMPCommandError("There's a migration process in progress") }
            var updated = migration.capabilities
            for entry in args["capabilities"]!.arrayValue! {
                guard let name = entry["capability"]?.stringValue, let state = entry["state"]?.boolValue else {
                    throw QMPCommandError("Each capability needs 'capability' (string) and 'state' (bool)")
                }
                guard updated[name] != nil else { throw QMPCommandError("Capability '\(name)' is not supported by this VMM") }
                updated[name] = state
            }
            migration.capabilities = updated
            return [:]
        }
        d.register("query-migrate-capabilities") { [unowned self] _ in
            .array(migration.capabilities.keys.sorted().map { ["capability": .string($0), "state": .bool(migration.capabilities[$0]!)] })
        }
        d.register("migrate-set-parameters", arguments: ["local": .boolean, "mode": .string, "downtime-limit": .integer, "max-bandwidth": .integer]) { [unowned self] args in
            guard !migration.isActive else { throw QMPCommandError("There's a migration process in progress") }
            if let mode = args["mode"]?.stringValue, mode != "normal" {
                throw QMPCommandError("Parameter 'mode' does not accept value '\(mode)' (only 'normal' so far)")
            }
            for (key, value) in args.pairs { migration.parameters[key] = value }
            return [:]
        }
        d.register("query-migrate-parameters") { [unowned self] _ in
            .object(JSONObject(migration.parameters.keys.sorted().map { ($0, migration.parameters[$0]!) }))
        }
        d.register("query-migrate") { [unowned self] _ in
            guard migration.status != .none else { return [:] }
            var reply: JSONObject = ["status": .string(migration.status.rawValue)]
            let end = migration.isActive ? now() : migration.endTime
            reply["total-time"] = .int(end - migration.startTime)
            if migration.stopTime > 0 && !migration.isActive {
                reply["downtime"] = .int(max(0, migration.endTime - migration.stopTime))
            }
            reply["setup-time"] = .int(max(0, migration.setupDoneTime - migration.startTime))
            let transferred = migration.ramTransferred.load(ordering: .relaxed)
            reply["ram"] = [
                "transferred": .int(Int64(transferred)), "total": .int(Int64(migration.ramTotal)),
                "remaining": .int(migration.status == .completed || migration.ramTotal <= transferred ? 0 : Int64(migration.ramTotal - transferred)),
                "normal": .int(Int64(migration.pagesTransferred.load(ordering: .relaxed))),
            ]
            if let error = migration.error { reply["error-desc"] = .string(error) }
            return .object(reply)
        }
    }
}
