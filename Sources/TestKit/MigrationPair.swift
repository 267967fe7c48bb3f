import Foundation
import QMPWire
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
    public let mode: MigrationMode
    public let namespace: NetworkNamespace
    public let network: GuestNetwork
    public let source: Machine
    public let target: Machine
    /// The target's own TAP in normal mode (`tap1`); the source's in local mode.
    public let targetTap: String
    /// `unix:PATH`, a short path inside the test's artifacts.
    public let uri: String

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
        let outcome = try await Self.migrate(from: source, to: target, uri: uri, timeout: timeout)
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
    /// and, in normal mode, the target's (`targetTap`); launches the source with the
    /// bundled guest and waits for its prompt, configures its network (unless
    /// `configureGuest` is false), launches the target with `-incoming defer` and the NIC
    /// its mode needs, sets the migration capabilities (`events`, and `x-ignore-shared`
    /// in local mode) and parameters (`local`) on both sides, runs `body`, and shuts
    /// everything down. Artifacts (`source/`, `target/`) are kept when `body` throws.
    ///
    /// `options` is the template for both machines (memory, extra arguments); RAM comes
    /// from `-m`, a shared memfd, which local mode hands over.
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
            if mode == .normal { try await network.createTap(in: namespace, name: targetTap, address: false) }
            return try await withArtifacts(sourceLocation: sourceLocation) { artifacts in
                var sourceOptions = options
                sourceOptions.name = "source"
                sourceOptions.namespace = namespace
                sourceOptions.arguments = network.arguments() + options.arguments
                var targetOptions = options
                targetOptions.name = "target"
                targetOptions.namespace = namespace
                let targetNIC = mode == .local ? network.incomingArguments : network.arguments(ifname: targetTap)
                targetOptions.arguments = targetNIC + options.arguments + ["-incoming", "defer"]

                let source = try await Machine.launch(sourceOptions, in: artifacts)
                let target = try await Machine.launch(targetOptions, in: artifacts)
                for machine in [source, target] { try await prepare(machine, for: mode) }
                try await source.console.waitForPrompt(timeout: .seconds(20))
                if configureGuest { try await source.guest.configureNetwork(address: network.guestCIDR) }
                let pair = MigrationPair(
                    mode: mode, namespace: namespace, network: network, source: source, target: target,
                    targetTap: mode == .local ? network.tap : targetTap,
                    uri: "unix:" + (try artifacts.socketPath("migration.sock")))
                return try await body(pair)
            }
        }
    }

    /// The capabilities and parameters `mode` needs, on one side.
    public static func prepare(_ machine: Machine, for mode: MigrationMode) async throws {
        var capabilities: [JSON] = [["capability": "events", "state": true]]
        if mode == .local { capabilities.append(["capability": "x-ignore-shared", "state": true]) }
        try await machine.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": .array(capabilities)])
        try await machine.qmp.execute("migrate-set-parameters", arguments: ["local": .bool(mode == .local)])
    }
}
