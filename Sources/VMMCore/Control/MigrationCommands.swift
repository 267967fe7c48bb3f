import QMPWire

/// QMP's migration commands, with QEMU's names and shapes.
extension Machine {
    func registerMigrationCommands() {
        let d = dispatcher
        d.register("migrate", arguments: ["uri": .string, "channels": .array, "detach": .boolean, "resume": .boolean]) { [unowned self] args in
            try startMigration(to: try outgoingChannels(try Self.migrationChannels(args)))
            return [:]
        }
        d.register("migrate-incoming", arguments: ["uri": .string, "channels": .array, "exit-on-error": .boolean]) { [unowned self] args in
            let channels = try Self.migrationChannels(args)
            // QEMU's rule: the cpr state must be read before the monitor could even run.
            guard channels.cpr == nil else {
                throw QMPCommandError("migrate-incoming takes the main channel only; a cpr channel must be given with -incoming on the command line")
            }
            guard channels.main != nil else { throw QMPCommandError("migrate-incoming needs a main channel") }
            try startIncoming(channels, exitOnError: args["exit-on-error"]?.boolValue ?? true)
            return [:]
        }
        d.register("migrate_cancel") { [unowned self] _ in
            cancelMigration()
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
            if let mode = args["mode"]?.stringValue, !Self.migrationModes.contains(mode) {
                throw QMPCommandError("Parameter 'mode' does not accept value '\(mode)' (normal or cpr-transfer)")
            }
            // Every value is checked before any is applied, as QEMU's migrate_params_check does.
            var updated = migration.parameters
            for (key, value) in args.pairs {
                if let range = Self.parameterRanges[key] {
                    updated[key] = .int(try range.check(value.intValue ?? 0))
                } else {
                    updated[key] = value
                }
            }
            migration.parameters = updated
            return [:]
        }
        d.register("query-migrate-parameters") { [unowned self] _ in
            .object(JSONObject(migration.parameters.keys.sorted().map { ($0, migration.parameters[$0]!) }))
        }
        d.register("query-migrate") { [unowned self] _ in
            guard migration.status != .none else { return [:] }
            return .object(queryMigrate())
        }
    }

    /// QEMU's limits for the numeric parameters (migration/options.c, migrate_params_check),
    /// enforced when a value is set so that `migrate` never meets one it cannot use.
    struct ParameterRange {
        /// QEMU's spelling in its error message.
        var qemuName: String
        var range: ClosedRange<Int64>
        var unit: String

        func check(_ value: Int64) throws -> Int64 {
            guard range.contains(value) else {
                throw QMPCommandError("Parameter '\(qemuName)' expects an integer in the range of \(range.lowerBound) to \(range.upperBound) \(unit), not \(value)")
            }
            return value
        }
    }

    static let parameterRanges: [String: ParameterRange] = [
        // MAX_MIGRATE_DOWNTIME: 2000 seconds.
        "downtime-limit": ParameterRange(qemuName: "downtime_limit", range: 0...2_000_000, unit: "ms"),
        // QEMU's bound is SIZE_MAX; a JSON integer here stops at Int64.max.
        "max-bandwidth": ParameterRange(qemuName: "max_bandwidth", range: 0...Int64.max, unit: "bytes/second"),
    ]

    static let migrationModes: Set<String> = ["normal", "cpr-transfer"]

    static func migrationChannels(_ args: JSONObject) throws -> MigrationChannels {
        do {
            return try MigrationChannels(arguments: args)
        } catch let error as StreamError {
            throw QMPCommandError(error.description)
        }
    }

    /// The source's channels against the migration mode: normal and local use the main
    /// channel only; cpr-transfer needs the main and the cpr channel, both unix sockets
    /// (fds travel on both). Refused here, before anything happens to the guest.
    func outgoingChannels(_ channels: MigrationChannels) throws -> OutgoingChannels {
        let mode = migration.parameters["mode"]?.stringValue ?? "normal"
        if mode == "cpr-transfer" {
            guard let main = channels.main else {
                throw QMPCommandError("migrate: mode 'cpr-transfer' needs a main channel besides the cpr channel (\(channels.cpr.map { "\($0)" } ?? "none")); give channels [main, cpr]")
            }
            guard let cpr = channels.cpr else {
                throw QMPCommandError("migrate: mode 'cpr-transfer' needs a cpr channel besides the main channel (\(main)); give channels [main, cpr]")
            }
            for (type, uri) in [("main", main), ("cpr", cpr)] where !uri.carriesFileDescriptors {
                throw QMPCommandError("migrate: mode 'cpr-transfer' passes file descriptors, which only a unix socket carries; the \(type) channel is '\(uri)'")
            }
            return OutgoingChannels(main: main, cpr: cpr)
        }
        if let cpr = channels.cpr {
            throw QMPCommandError("A cpr channel (\(cpr)) is only used by migration mode 'cpr-transfer', but mode is '\(mode)'")
        }
        guard let main = channels.main else { throw QMPCommandError("migrate needs a main channel") }
        if case .fd = main {
            throw QMPCommandError("migrate: channel \(main) is not supported; an fd channel is for the target's listening socket only")
        }
        return OutgoingChannels(main: main, cpr: nil)
    }

    struct OutgoingChannels: Sendable {
        var main: MigrationURI
        /// cpr-transfer only.
        var cpr: MigrationURI?
    }

    /// QEMU's MigrationInfo; times in ms, plus `x-downtime-us` (the downtime in
    /// microseconds: local migration's is well under QEMU's 1 ms resolution).
    func queryMigrate() -> JSONObject {
        let ms: (Int64) -> JSON = { .int($0 / 1_000_000) }
        var reply: JSONObject = ["status": .string(migration.status.rawValue)]
        let end = migration.isActive ? monotonicNanoseconds() : migration.endTime
        reply["total-time"] = ms(end - migration.startTime)
        if migration.setupDoneTime > 0 { reply["setup-time"] = ms(migration.setupDoneTime - migration.startTime) }
        if migration.isActive && migration.stopTime == 0 {
            reply["expected-downtime"] = .int(migration.expectedDowntime.load(ordering: .relaxed))
        }
        if migration.stopTime > 0 && !migration.isActive {
            let downtime = max(0, migration.endTime - migration.stopTime)
            reply["downtime"] = ms(downtime)
            reply["x-downtime-us"] = .int(downtime / 1000)
        }
        let transferred = migration.ramTransferred.load(ordering: .relaxed)
        let pages = migration.pagesTransferred.load(ordering: .relaxed)
        let seconds = Double(max(end - migration.startTime, 1)) / 1e9
        reply["ram"] = [
            "transferred": .int(Int64(transferred)),
            "total": .int(Int64(migration.ramTotal)),
            "remaining": .int(migration.status == .completed ? 0 : Int64(migration.ramRemaining.load(ordering: .relaxed))),
            "duplicate": .int(Int64(migration.zeroPages.load(ordering: .relaxed))),
            "normal": .int(Int64(pages)),
            "normal-bytes": .int(Int64(pages) * 4096),
            "dirty-sync-count": .int(Int64(migration.dirtySyncCount.load(ordering: .relaxed))),
            "pages-per-second": .int(Int64(Double(pages) / seconds)),
            "mbps": .double(Double(transferred) * 8 / 1e6 / seconds),
            "page-size": 4096,
        ]
        if let error = migration.error { reply["error-desc"] = .string(error) }
        return reply
    }
}
