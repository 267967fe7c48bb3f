/// Reads a stream v2 (the format before device lifecycles) as v3 sections, so a target
/// of this build accepts a source of the previous one. v2 differs in three ways: a NIC's
/// state came as up to three sections (`<nic>/transport`, `<nic>/net`, in local mode
/// `<nic>/tap` with the TAP queue fds), states had no version, and fds were counted, not
/// named. The fixtures in Tests/Fixtures/streams keep this working.
struct LegacyStreamV2 {
    /// The target's NIC id → its netdev id: v2 TAP queues become `netdev/<id>/tap.<i>`.
    let netdevOf: [String: String]
    private var nicOrder: [String] = []
    private var parts: [String: [String: [UInt8]]] = [:]

    init(netdevOf: [String: String]) { self.netdevOf = netdevOf }

    /// The v3 sections `section` stands for (none while a NIC's parts are collected;
    /// they come out before the end section). Binds the TAP queue fds itself.
    mutating func translate(_ section: MigrationStream.Section, received: ReceivedFDs) throws -> [MigrationStream.Section] {
        var section = section
        switch section.kind {
        case .sharedRAM where section.fdNames.count == 1:
            section.fdNames = [SharedRAM.memfdName]
            return [section]
        case .device:
            section.fdNames = section.fdNames.indices.map { "\(section.name)/fd.\($0)" }
            let parts = section.name.split(separator: "/", maxSplits: 1).map(String.init)
            guard parts.count == 2, ["transport", "net", "tap"].contains(parts[1]) else {
                // serial0, pci0: the same bytes, now version 1 of their state.
                section.payload = Self.version1 + section.payload
                return [section]
            }
            let (nic, part) = (parts[0], parts[1])
            if part == "tap" {
                guard let netdev = netdevOf[nic] else { throw StreamError("state for device '\(section.name)', which this machine does not have") }
                section.fdNames = section.fdNames.indices.map { "netdev/\(netdev)/tap.\($0)" }
            }
            try received.bind(section.fdNames, for: section.label)
            if self.parts[nic] == nil { nicOrder.append(nic) }
            self.parts[nic, default: [:]][part] = section.payload
            return []
        case .end:
            let devices = try nicOrder.map { try assemble($0) }
            nicOrder = []
            return devices + [section]
        default:
            section.fdNames = section.fdNames.indices.map { "\(section.label)/fd.\($0)" }
            return [section]
        }
    }

    static let version1: [UInt8] = [1, 0]

    /// One v3 device section: version 1 of the transport's state is v2's transport bytes
    /// followed by the model blob (version 1 of VirtioNet's state: v2's net bytes, then
    /// the TAP descriptor if the queues came along).
    private func assemble(_ nic: String) throws -> MigrationStream.Section {
        let parts = parts[nic] ?? [:]
        guard let transport = parts["transport"], let net = parts["net"] else {
            throw StreamError("the v2 stream carried only part of \(nic)'s state (\(parts.keys.sorted().joined(separator: ", ")))")
        }
        var model = StreamWriter()
        model.raw(Self.version1)
        model.raw(net)
        if let tap = parts["tap"], let netdev = netdevOf[nic] {
            model.bool(true)
            model.u8(VirtioNet.DatapathDescriptor.kindTapQueues)
            model.string(netdev)
            model.raw(tap)  // queue count:u16, vnet header:bool
        } else {
            model.bool(false)
        }
        var payload = StreamWriter()
        payload.raw(Self.version1)
        payload.raw(transport)
        payload.blob(model.bytes)
        return MigrationStream.Section(kind: .device, name: nic, payload: payload.bytes)
    }
}
