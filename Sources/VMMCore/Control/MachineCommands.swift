import QMPWire

/// The QMP commands a `Machine` answers. Names, arguments and reply shapes follow QEMU's
/// schema so QEMU's scripts and the `qemu.qmp` client work unchanged.
extension Machine {
    func registerCommands() {
        let d = dispatcher
        d.register("qmp_capabilities", arguments: ["enable": .array]) { args in
            if let enable = args["enable"]?.arrayValue, let first = enable.first {
                throw QMPCommandError("Capability '\(first.stringValue ?? first.serialized)' not available")
            }
            return [:]
        }
        d.register("query-status") { [unowned self] _ in
            ["status": .string(runState.rawValue), "singlestep": false, "running": .bool(runState == .running)]
        }
        d.register("stop") { [unowned self] _ in
            stop()
            return [:]
        }
        d.register("cont") { [unowned self] _ in
            try cont()
            return [:]
        }
        d.register("quit") { [unowned self] _ in
            quit()
            return [:]
        }
        d.register("query-version") { _ in
            [
                "qemu": ["micro": .int(Machine.version.micro), "minor": .int(Machine.version.minor), "major": .int(Machine.version.major)],
                "package": .string(Machine.packageName),
            ]
        }
        d.register("query-name") { [unowned self] _ in
            guard let name = config.name else { return [:] }
            return ["name": .string(name)]
        }
        d.register("query-kvm") { _ in ["enabled": true, "present": true] }
        d.register("query-cpus-fast") { [unowned self] _ in
            [["cpu-index": 0, "qom-path": "/machine/unattached/device[0]", "thread-id": .int(Int64(vcpuRunner.hostThreadID)), "target": "x86_64"]]
        }
        d.register("query-commands") { [unowned d] _ in
            .array(d.commandNames.map { ["name": .string($0)] })
        }
    }
}
