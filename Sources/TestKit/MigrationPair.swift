import Foundation
import QMPWire
import Synchronization
import Testing

/// How a `MigrationPair` moves the guest, with the settings QEMU's series uses for each.
public enum MigrationMode: String, Sendable, CaseIterable, CustomStringConvertible {
    /// RAM and device state over the socket; the target opens its own TAP (`tap1`), and
    /// the host address moves from `tap0` to `tap1` once the migration completed (the
    /// seed's `switch_network_to_tap2`).
    case normal
    /// The TAP queue fds and the RAM memfd travel in the stream (`local` on both sides,
    /// `x-ignore-shared`, the target's netdev `incoming-fds=on`): same TAP, no RAM copied.
    case local
    /// Live update: migration parameter `mode` `cpr-transfer`, the netdev `cpr=on` on both
    /// sides. The target starts during `migrate()` with a main and a cpr channel on its
    /// command line (`MigrationPair.cprTransfer`): it reads the RAM memfd and the TAP
    /// queues from the cpr channel before it opens its monitor. Same TAP, no RAM copied.
    case cprTransfer = "cpr-transfer"

    public var description: String { rawValue }
}

/// A migration source running the bundled guest on a TAP in a namespace of its own, and a
/// target waiting (`-incoming defer`) in the same namespace, both set up for `mode`.
///
/// ```swift
/// try await MigrationPair.with(mode: .local) { pair in
///     let before = try await pair.source.guest.ticks()
///     let result = try await pair.migrate()
///     #expect(result.info["ram"]?["normal"]?.intValue == 0)
///     #expect(try await pair.target.guest.ticks(after: .milliseconds(100)) > before)
/// }
/// ```
public struct MigrationPair: Sendable {
    /// `MigrationPair.Mode.cprTransfer` reads as well as `MigrationMode.cprTransfer`.
    public typealias Mode = MigrationMode
    public let mode: MigrationMode
    public let namespace: NetworkNamespace
    public let network: GuestNetwork
    public let source: Machine
    /// The target VMM. In `cprTransfer` mode it starts during `migrate()` (its monitor
    /// opens only once the cpr state arrived), so it exists only after that.
    public var target: Machine {
        guard let machine = launchedTarget.machine.withLock({ $0 }) else {
            preconditionFailure("MigrationPair(mode: .cprTransfer): the target starts during migrate(); use pair.target after it")
        }
        return machine
    }
    /// The target's own TAP in normal mode (`tap1`); the source's in local and cpr-transfer mode.
    public let targetTap: String
    /// `unix:PATH`, a short path inside the test's artifacts.
    public let uri: String
    /// The vhost-user backend both sides use (`network.datapath == .vhostUser`).
    public let backend: VhostUserBackendProcess?
    /// The target, once launched; and how to launch it in cprTransfer mode.
    let launchedTarget: LaunchedTarget
    let targetOptions: MachineOptions
    let artifacts: ArtifactDirectory

    final class LaunchedTarget: Sendable {
        let machine = Mutex<Machine?>(nil)
        init(_ machine: Machine?) { self.machine.withLock { $0 = machine } }
    }

    /// A pinger from the host to the guest, wherever it runs; `start()` it.
    public func pinger(interval: Duration = .milliseconds(2), count: Int? = nil) throws -> Pinger {
        try Pinger(namespace: namespace, destination: network.guestAddress, interval: interval, count: count)
    }

    /// `migrate-incoming` on the target, `migrate` on the source, waits for both to end
    /// (`MigrationWaiter`, which names the cause when a side failed), moves the host
    /// address to the target's TAP in normal mode, and `cont`s the target. The freeze
    /// window runs from `migrate` to the `cont` reply.
    @discardableResult
    public func migrate(timeout: Duration = .seconds(30)) async throws -> MigrationResult {
        var freeze = FreezeWindow.begin()
        let outcome: MigrationOutcome
        if mode == .cprTransfer {
            let (machine, result) = try await Self.cprTransfer(from: source, launching: targetOptions, in: artifacts, timeout: timeout)
            launchedTarget.machine.withLock { $0 = machine }
            outcome = result
        } else {
            outcome = try await Self.migrate(from: source, to: target, uri: uri, timeout: timeout)
        }
        if mode == .normal {
            try await namespace.moveHostAddress(network.hostCIDR, mac: network.hostMAC, from: network.tap, to: targetTap)
        }
        try await target.qmp.execute("cont")
        freeze.close()
        let info = try await source.qmp.execute("query-migrate")
        if let artifacts = ArtifactDirectory.current {
            let text = "\(mode) migration: \(outcome)\nfreeze window: \(freeze)\nsource query-migrate: \(info.serialized)\n"
            try? text.write(toFile: artifacts.numberedFile("migration", extension: "txt"), atomically: false, encoding: .utf8)
        }
        return MigrationResult(outcome: outcome, info: info, freeze: freeze)
    }
}

extension MigrationPair {
    /// One migration between any two machines: `migrate-incoming` on `target`, `migrate`
    /// on `source`, then `MigrationWaiter.waitForFinish` on both (which throws, naming the
    /// cause, unless both completed with the source in `postmigrate` and the target
    /// `paused`). The target is not `cont`ed. For hops beyond a pair and hand-built peers.
    @discardableResult
    public static func migrate(from source: Machine, to target: Machine, uri: String, timeout: Duration = .seconds(30)) async throws -> MigrationOutcome {
        try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
        try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
        return try await MigrationWaiter.waitForFinish(source: source, target: target, timeout: timeout)
    }
}

extension MigrationPair {
    /// Live update in one line: starts the next VMM from `options` (its `-netdev`s with
    /// `cpr=on` as on `source`, a distinct `name`) with a main and a cpr channel on its
    /// command line, runs a cpr-transfer from `source` (mode `cpr-transfer`), waits for both
    /// sides (`MigrationWaiter`, which names the cause when one failed), `cont`s the new
    /// VMM and returns it. `source` is left in `postmigrate`; shut it down when done.
    ///
    /// ```swift
    /// var current = source
    /// for hop in 1...20 {
    ///     let next = try await MigrationPair.liveUpdate(from: current, to: options.named("vm\(hop)"), in: artifacts)
    ///     await current.shutdown()
    ///     current = next
    /// }
    /// ```
    public static func liveUpdate(
        from source: Machine, to options: MachineOptions, in artifacts: ArtifactDirectory, timeout: Duration = .seconds(30)
    ) async throws -> Machine {
        let (target, _) = try await cprTransfer(from: source, launching: options, in: artifacts, timeout: timeout)
        try await target.qmp.execute("cont")
        return target
    }

    /// The cpr-transfer under `liveUpdate`, without the `cont`: the target is `paused` on
    /// return. The cpr channel listens on a socket TestKit binds first and passes to the
    /// target (`"type": "fd"`), so `migrate` cannot race the target's start-up; the main
    /// channel is a unix path the target listens on once the cpr state arrived. The target's
    /// MIGRATION events are on from its command line (`-global migration.x-events=on`).
    /// `migrate` waits until the target logs that it waits for the cpr state, so that its
    /// start-up is not downtime. `targetBindsCPRChannel`: for QEMU, whose cpr channel must be
    /// a unix path it binds itself (and which logs no such line): `migrate` waits until the
    /// target has bound it instead.
    public static func cprTransfer(
        from source: Machine, launching options: MachineOptions, in artifacts: ArtifactDirectory,
        targetBindsCPRChannel: Bool = false, timeout: Duration = .seconds(30)
    ) async throws -> (target: Machine, outcome: MigrationOutcome) {
        let leaf = options.name ?? "target"
        let mainPath = try artifacts.socketPath("\(leaf)-main.sock")
        let cprPath = try artifacts.socketPath("\(leaf)-cpr.sock")
        let cprListener = targetBindsCPRChannel ? nil : try UnixListener(path: cprPath)
        // Once the target has it (or failed to start), a connection still queued would keep
        // the source waiting: closing the listener resets it.
        defer { cprListener?.close() }
        var targetOptions = options
        let cprAddress: JSON
        if let cprListener {
            cprAddress = ["transport": "socket", "type": "fd", "str": .string(String(MachineOptions.inheritedNumber(of: targetOptions.inheritedFDs.count)))]
            targetOptions.inheritedFDs.append(cprListener.fd)
        } else {
            cprAddress = ["transport": "socket", "type": "unix", "path": .string(cprPath)]
        }
        targetOptions.arguments += [
            "-incoming", channelJSON("main", ["transport": "socket", "type": "unix", "path": .string(mainPath)]).serialized,
            "-incoming", channelJSON("cpr", cprAddress).serialized,
            "-global", "migration.x-events=on",
        ]
        try await source.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [["capability": "events", "state": true]]])
        try await source.qmp.execute("migrate-set-parameters", arguments: ["mode": "cpr-transfer"])
        // The target's monitor opens only after the cpr state arrived, so its launch finishes
        // only after `migrate`. The source stops the guest first: migrate once the target has
        // started up and waits on the cpr channel, or its start-up counts as downtime.
        targetOptions.name = leaf
        let stderrPath = (try artifacts.directory(forMachine: leaf) as NSString).appendingPathComponent("stderr.log")
        let deadline = ContinuousClock.now + targetOptions.startupTimeout
        let ended = Mutex(false)
        let launch = Task {
            defer { ended.withLock { $0 = true } }
            return try await Machine.launch(targetOptions, in: artifacts)
        }
        func waiting() -> Bool {
            if targetBindsCPRChannel { return FileManager.default.fileExists(atPath: cprPath) }
            return (try? String(contentsOfFile: stderrPath, encoding: .utf8))?.contains(cprWaitingLine) ?? false
        }
        while ContinuousClock.now < deadline, !ended.withLock({ $0 }), !waiting() {
            try await Task.sleep(for: .milliseconds(2))
        }
        let channels: JSON = [
            channelJSON("main", ["transport": "socket", "type": "unix", "path": .string(mainPath)]),
            channelJSON("cpr", ["transport": "socket", "type": "unix", "path": .string(cprPath)]),
        ]
        do {
            while true {
                do {
                    try await source.qmp.execute("migrate", arguments: ["channels": channels])
                    break
                } catch let error as QMPError where targetBindsCPRChannel && "\(error)".contains("Connection refused") && ContinuousClock.now < deadline {
                    // The target's socket file exists between its bind and its listen. QEMU's source
                    // fails such a migrate before it stops the guest, so trying again is harmless.
                    try await Task.sleep(for: .milliseconds(2))
                }
            }
        } catch {
            // The target waits for a cpr state that will not come: its launch ends at its start-up
            // deadline, which kills it. Wait for that, or the process would outlive the test.
            _ = try? await launch.value
            throw error
        }
        let target: Machine
        do {
            target = try await launch.value
        } catch {
            // A target whose load failed fast exits before its launch finished: report it as
            // any failed migration, with the source's end and the target's stderr.
            throw await failedTarget(error, source: source, timeout: timeout)
        }
        let outcome = try await MigrationWaiter.waitForFinish(source: source, target: target, timeout: timeout)
        return (target, outcome)
    }

    private static func failedTarget(_ error: any Error, source: Machine, timeout: Duration) async -> MigrationWaitError {
        let end: String
        do { end = try await MigrationWaiter.waitForEnd(of: source.qmp, timeout: timeout) } catch { end = "no MIGRATION end event: \(error)" }
        let state = (try? await source.qmp.execute("query-status"))?["status"]?.stringValue ?? "unreachable"
        let info = try? await source.qmp.execute("query-migrate")
        return MigrationWaitError(
            outcome: MigrationOutcome(sourceStatus: end, targetStatus: "no end: the target did not start", sourceRunState: state, targetRunState: "exited"),
            expected: MigrationOutcome(sourceStatus: "completed", targetStatus: "completed", sourceRunState: "postmigrate", targetRunState: "paused"),
            sourceError: info?["error-desc"]?.stringValue, details: ["target: \(error)"])
    }

    /// What the VMM logs (info) once it waits for the cpr state.
    static let cprWaitingLine = "cpr-transfer: waiting for the cpr state"

    /// `{"channel-type": type, "addr": addr}`, QEMU's migration channel.
    public static func channelJSON(_ type: String, _ addr: JSON) -> JSON {
        ["channel-type": .string(type), "addr": addr]
    }
}

/// What `MigrationPair.migrate` saw.
public struct MigrationResult: Sendable {
    public let outcome: MigrationOutcome
    /// The source's `query-migrate` after completion: `ram.normal`, `x-downtime-us`, ...
    public let info: JSON
    /// From `migrate` to the target's `cont`: pings may go unanswered only inside it
    /// (`PingReport.checkLoss(inside:)`).
    public let freeze: FreezeWindow
}

extension MigrationPair {
    /// Creates a namespace with the source's TAP (`network.tap`, host address and MAC)
    /// and, in normal mode, the target's (`targetTap`); starts what `network.datapath`
    /// needs (`GuestNetwork.startBackend`: the vhost-user backend both sides use, or the
    /// test is cancelled where the datapath cannot run); launches the source with the
    /// bundled guest and waits for its prompt, configures its network (unless
    /// `configureGuest` is false), launches the target with `-incoming defer` and the NIC
    /// its mode needs (in cpr-transfer mode `migrate()` launches it), sets the migration
    /// capabilities (`events`, and `x-ignore-shared` in local mode) and parameters
    /// (`local`, `mode`) on both sides, runs `body`, and shuts everything down. Artifacts
    /// (`source/`, `target/`) are kept when `body` throws.
    ///
    /// `options` is the template for both machines (memory, extra arguments); RAM comes
    /// from `-m`, a shared memfd, which local mode and cpr-transfer hand over.
    public static func with<T>(
        mode: MigrationMode,
        network: GuestNetwork = GuestNetwork(),
        options: MachineOptions = .bundledGuest(),
        targetTap: String = "tap1",
        configureGuest: Bool = true,
        isolation: isolated (any Actor)? = #isolation,
        sourceLocation: SourceLocation = #_sourceLocation,
        _ body: (MigrationPair) async throws -> T
    ) async throws -> T {
        try await NetworkNamespace.with { namespace in
            try await network.createTap(in: namespace)
            let cpr = mode == .cprTransfer
            if mode == .normal { try await network.createTap(in: namespace, name: targetTap, address: false) }
            return try await withArtifacts(sourceLocation: sourceLocation) { artifacts in
                // A vhost-user NIC's backend serves both sides (one connection, handed over).
                let backend = try await network.startBackendProcess(in: namespace, artifacts: artifacts)
                let socket = backend?.socketPath
                var sourceOptions = options
                sourceOptions.name = "source"
                sourceOptions.namespace = namespace
                sourceOptions.arguments = network.arguments(vhostUserSocket: socket, cpr: cpr) + options.arguments
                var targetOptions = options
                targetOptions.name = "target"
                targetOptions.namespace = namespace
                switch mode {
                case .normal: targetOptions.arguments = network.arguments(ifname: targetTap) + options.arguments + ["-incoming", "defer"]
                case .local: targetOptions.arguments = network.incomingArguments + options.arguments + ["-incoming", "defer"]
                case .cprTransfer: targetOptions.arguments = network.arguments(vhostUserSocket: socket, cpr: true) + options.arguments
                }

                let source = try await Machine.launch(sourceOptions, in: artifacts)
                // A cpr-transfer target starts with the migration (`cprTransfer`).
                let target = cpr ? nil : try await Machine.launch(targetOptions, in: artifacts)
                for machine in [source] + (target.map { [$0] } ?? []) { try await prepare(machine, for: mode) }
                try await source.console.waitForPrompt(timeout: .seconds(20))
                if configureGuest { try await source.guest.configureNetwork(address: network.guestCIDR) }
                let pair = MigrationPair(
                    mode: mode, namespace: namespace, network: network, source: source,
                    targetTap: mode == .normal ? targetTap : network.tap,
                    uri: "unix:" + (try artifacts.socketPath("migration.sock")), backend: backend,
                    launchedTarget: LaunchedTarget(target), targetOptions: targetOptions, artifacts: artifacts)
                return try await body(pair)
            }
        }
    }

    /// The capabilities and parameters `mode` needs, on one side.
    public static func prepare(_ machine: Machine, for mode: MigrationMode) async throws {
        var capabilities: [JSON] = [["capability": "events", "state": true]]
        if mode == .local { capabilities.append(["capability": "x-ignore-shared", "state": true]) }
        try await machine.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": .array(capabilities)])
        try await machine.qmp.execute("migrate-set-parameters", arguments: [
            "local": .bool(mode == .local), "mode": .string(mode == .cprTransfer ? "cpr-transfer" : "normal"),
        ])
    }
}
