import Testing

/// Which datapath moves a test NIC's frames, so that one test body covers all three:
///
/// ```swift
/// @Test(arguments: Datapath.allCases)
/// func pings(_ datapath: Datapath) async throws {
///     try await NetworkedGuest.with(GuestNetwork(queues: 2, datapath: datapath)) { guest in ... }
/// }
/// ```
///
/// `NetworkedGuest.with` starts what the datapath needs (the bundled `vhost-user-net`
/// backend on the TAP) and cancels the test case, shown as skipped with the reason, when
/// this host cannot run it (kernel vhost without /dev/vhost-net).
public enum Datapath: String, Sendable, CaseIterable, CustomTestStringConvertible {
    /// The VMM moves frames between the rings and the TAP itself (`-netdev tap`).
    case userspace
    /// The bundled `vhost-user-net` backend owns the TAP and the rings
    /// (`-chardev socket` + `-netdev vhost-user`).
    case vhostUser = "vhost-user"
    /// In-kernel vhost-net moves frames between the TAP and the rings (`-netdev tap,vhost=on`).
    case vhostKernel = "vhost-kernel"

    public var testDescription: String { rawValue }

    /// Why this host cannot run the datapath; nil when it can.
    public var unavailableReason: String? {
        switch self {
        case .userspace, .vhostUser: nil
        case .vhostKernel: HostRequirement.vhostNetUnavailable()
        }
    }

    /// The strict-mode key (`TESTKIT_REQUIRE`) whose absence fails instead of skipping.
    var requirementKey: String? { self == .vhostKernel ? "vhost-net" : nil }

    /// Inside a test: cancels the current test case (reported as skipped, with the reason)
    /// when this host cannot run the datapath, or throws `RequirementNotMet` when strict
    /// mode lists its requirement. Outside a test: throws the reason.
    public func requireAvailable(sourceLocation: SourceLocation = #_sourceLocation) throws {
        guard let reason = unavailableReason else { return }
        if let key = requirementKey, StrictRequirements.isStrict(key) { throw RequirementNotMet(key: key, reason: reason) }
        guard Test.current != nil else { throw DatapathUnavailable(datapath: self, reason: reason) }
        try Test.cancel(Comment(rawValue: "\(rawValue) datapath: \(reason)"), sourceLocation: sourceLocation)
    }
}

public struct DatapathUnavailable: Error, CustomStringConvertible {
    public var datapath: Datapath
    public var reason: String
    public var description: String { "the \(datapath.rawValue) datapath cannot run here: \(reason)" }
}
