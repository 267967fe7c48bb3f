import Synchronization

/// What an incoming migration loads into: the target machine's own description, its
/// devices and RAM, and how its vCPU state is restored (KVM's; a test passes its own).
struct IncomingTarget {
    var description: MachineDescription
    var devices: [any MachineDevice]
    var memory: GuestMemory
    /// The target's NIC id → its netdev id, for v2 streams' TAP queues.
    var netdevOf: [String: String]
    var progress: MigrationState
    var restoreVCPU: (VCPUState) throws -> Void
}

/// The target side of one migration, as a state machine. Every message a channel
/// delivers (a stream header, a section) is a transition that checks the message against
/// the state and the channel it came on; anything out of order fails the migration with
/// what arrived and what was expected. The receive threads only move bytes: they ask
/// this type what each section means.
///
/// ```
///                       waitingForChannels
///                |                              | header on cpr (cpr channel configured)
///                |                              v
///                |                      receivingCPRState
///                |                              | cpr state (cpr channel only)
///                |                              v
///                |                       cprStateApplied
///                | header on main               | header on main
///                v                              v
///                       receivingConfiguration
///                               | configuration (first section, checked)
///                               v
///                       receivingState  <- RAM, shared RAM, vCPU, device sections
///                               | switch-over (answered 0x05; then poll)
///                               v
///                        switchingOver  <- the final RAM pass, vCPU, devices
///                               | end (every device loaded, no fd left unclaimed; 0x06)
///                               v
///                           completed
///
///   any state --(error, out-of-order section, channel closed)--> failed
/// ```
///
/// Normal, local and cpr-transfer migration differ only in which states carry what:
/// normal sends RAM pages in receivingState/switchingOver; local passes TAP queue fds
/// with the device sections (named, claimed from the main channel's `ReceivedFDs`);
/// cpr-transfer sends its fds in the cpr state, before any device exists, and no RAM.
/// Each channel has its own `ReceivedFDs`: an fd is claimed by name from the channel
/// that carried it, and whatever no one claimed is closed and counted at the end.
final class IncomingMigration: @unchecked Sendable {
    enum State: String, Sendable {
        case waitingForChannels, receivingCPRState, cprStateApplied, receivingConfiguration
        case receivingState, switchingOver, completed, failed
    }

    /// What the receive loop does after a section.
    enum Step: Equatable {
        case next
        /// Answer the switch-over (0x05), then poll for what follows.
        case answerReadyToSwitchOver
        /// This channel is done (the main channel acknowledges first, 0x06).
        case finished
    }

    /// Read by the control thread (to know whether a main channel may start yet) while a
    /// receive thread moves it on.
    private let current = Mutex<State>(.waitingForChannels)
    var state: State { current.withLock { $0 } }
    /// A cpr channel was set up: the cpr state must arrive before the main channel's stream.
    let expectsCPR: Bool
    /// Replaced when the main channel starts (`retarget`): a cpr-transfer target reads the
    /// cpr state before its devices exist.
    private var target: IncomingTarget
    /// The cpr state once applied (its RAM adopted); its netdevs' fds wait in the cpr
    /// channel's `ReceivedFDs` until each netdev claims them (`claimCPRNetdev`).
    private(set) var cprState: CPRState?
    private var fds: [MigrationChannelType: ReceivedFDs] = [:]
    private var versions: [MigrationChannelType: UInt32] = [:]
    private var legacy: LegacyStreamV2?
    private var loader: IncomingSections?

    init(expectsCPR: Bool, target: IncomingTarget) {
        self.expectsCPR = expectsCPR
        self.target = target
    }

    /// The machine as it is when its main channel starts: a cpr-transfer target has built
    /// its netdevs and devices since the cpr state arrived. Control thread, before `begin(.main)`.
    func retarget(_ target: IncomingTarget) {
        precondition(state == .cprStateApplied || state == .waitingForChannels, "retarget in state \(state)")
        self.target = target
    }

    /// The TAP queues of `cpr=on` netdev `id`, claimed from the cpr state (control thread,
    /// before the main channel started): its entry and the fds, now the caller's.
    func claimCPRNetdev(_ id: String) throws -> (CPRState.Netdev, [FileDescriptor]) {
        guard let cprState else { throw StreamError("netdev '\(id)': cpr=on, but no cpr state arrived") }
        guard state == .cprStateApplied else {
            throw StreamError("netdev '\(id)': cpr=on netdevs take their fds before the main channel's stream starts (state \(state))")
        }
        guard let entry = cprState.netdev(id) else {
            let carried = cprState.netdevs.map(\.id)
            throw StreamError("netdev '\(id)': cpr=on, but the cpr state carries no netdev '\(id)' (it carries \(carried.isEmpty ? "none" : carried.joined(separator: ", "))): is cpr=on set for it on the source?")
        }
        // A vhost=on netdev claims its vhost fds (`VhostKernelNetdev.devices`) before its
        // TAP: ones still here mean this netdev is not vhost=on, but the source's was.
        if entry.vhostKind == .kernel, holdsCPRFD(entry.vhostFDName(pair: 0)) {
            throw StreamError("netdev '\(id)': the cpr state hands over its TAP with vhost-net devices (the source's netdev was vhost=on); give this netdev vhost=on too")
        }
        let queues = try (0..<Int(entry.queues)).map { try claimCPRFD(entry.tapFDName(queue: $0), by: "netdev '\(id)'") }
        return (entry, queues)
    }

    /// Any fd of the cpr state by its stream name, e.g. a vhost datapath's
    /// `netdev/<id>/vhost.<i>` (what its source's `prepareForHandover` returned).
    func claimCPRFD(_ name: String, by claimant: String) throws -> FileDescriptor {
        guard cprState != nil, let fds = fds[.cpr] else { throw StreamError("\(claimant) expects \(name), but no cpr state arrived") }
        return try fds.claim(name, by: claimant)
    }

    /// Whether the cpr state's fd `name` is still waiting for its claimant.
    func holdsCPRFD(_ name: String) -> Bool { fds[.cpr]?.holds(name) ?? false }

    /// The version of the stream `channel` carries (its header was checked).
    func version(of channel: MigrationChannelType) -> UInt32 { versions[channel] ?? MigrationStream.version }

    /// Poll rather than sleep for the next section: the source is in its downtime (after
    /// the switch-over, or all along in cpr-transfer, whose source stopped first).
    var pollsForNext: Bool { state == .switchingOver || cprState != nil }

    /// A channel's first bytes arrived: its stream header.
    func begin(_ channel: MigrationChannelType, header: [UInt8], fds received: ReceivedFDs) throws {
        try transition { state in
            switch (channel, state) {
            case (.cpr, .waitingForChannels) where expectsCPR:
                state = .receivingCPRState
            case (.cpr, _):
                throw StreamError(expectsCPR ? "the cpr channel opened a second time (in state \(state))"
                                             : "a cpr channel connected, but this target was not given one")
            case (.main, .waitingForChannels) where !expectsCPR, (.main, .cprStateApplied):
                state = .receivingConfiguration
            case (.main, .waitingForChannels), (.main, .receivingCPRState):
                throw StreamError("the main channel's stream arrived before the cpr state; the cpr channel carries it first")
            case (.main, _):
                throw StreamError("the main channel opened a second time (in state \(state))")
            }
            versions[channel] = try MigrationStream.checkHeader(header)
            fds[channel] = received
        }
    }

    /// One section as it arrived on `channel`.
    func receive(_ section: MigrationStream.Section, on channel: MigrationChannelType) throws -> Step {
        try transition { state in
            switch (channel, state) {
            case (.cpr, .receivingCPRState):
                return try receiveCPRState(section, state: &state)
            case (.cpr, _):
                throw StreamError("\(section.label) on the cpr channel in state \(state)")
            case (.main, .receivingConfiguration):
                try receiveConfiguration(section, state: &state)
                return .next
            case (.main, .receivingState), (.main, .switchingOver):
                for translated in try legacy?.translate(section, received: fds[.main]!) ?? [section] {
                    if try receiveState(translated, state: &state) == .finished { return .finished }
                    if translated.kind == .switchover { return .answerReadyToSwitchOver }
                }
                return .next
            case (.main, _):
                throw StreamError("\(section.label) on the main channel in state \(state)")
            }
        }
    }

    /// The migration failed (`error`): closes every fd received and not claimed, on
    /// every channel, and returns the message that says so.
    func fail(_ error: any Error) -> String {
        current.withLock { $0 = .failed }
        let unclaimed = closeUnclaimed()
        return unclaimed.isEmpty ? "\(error)"
            : "\(error) (closed \(unclaimed.count) received file descriptor(s) no device claimed: \(unclaimed.joined(separator: ", ")))"
    }

    private func transition<T>(_ body: (inout State) throws -> T) throws -> T {
        var state = self.state
        do {
            let result = try body(&state)
            current.withLock { $0 = state }
            return result
        } catch {
            current.withLock { $0 = .failed }
            throw error
        }
    }

    private func closeUnclaimed() -> [String] {
        MigrationChannelType.allCases.flatMap { fds[$0]?.closeUnclaimed() ?? [] }
    }

    private func receiveCPRState(_ section: MigrationStream.Section, state: inout State) throws -> Step {
        guard section.kind == .cprState else {
            throw StreamError("the cpr channel carries the cpr state only, not \(section.label)")
        }
        try fds[.cpr]!.bind(section.fdNames, for: section.label)
        let cpr = try CPRState.decode(section.payload, owner: "cpr")
        target.progress.mark("cpr state arrived")
        try cpr.adoptRAM(into: target.memory, fds: fds[.cpr]!)
        cprState = cpr
        target.progress.mark("cpr state applied")
        state = .cprStateApplied
        return .finished
    }

    private func receiveConfiguration(_ section: MigrationStream.Section, state: inout State) throws {
        guard section.kind == .configuration else { throw StreamError("the stream starts with \(section.label), not the configuration") }
        let source = try MachineDescription.decode(section.payload)
        try source.check(target: target.description)
        target.progress.mark("configuration checked")
        let main = fds[.main]!
        legacy = version(of: .main) == 2 ? LegacyStreamV2(netdevOf: target.netdevOf) : nil
        loader = IncomingSections(devices: target.devices, memory: target.memory, sourceRAMFile: source.properties["ram-file"],
                                  fds: main, progress: target.progress)
        // cpr-transfer: the RAM came with the cpr state, and the main channel carries none.
        loader!.ramArrived = cprState != nil
        state = .receivingState
    }

    /// RAM, shared RAM, the vCPU and devices, in receivingState or switchingOver.
    private func receiveState(_ section: MigrationStream.Section, state: inout State) throws -> Step {
        switch section.kind {
        case .vcpu:
            target.progress.mark("vcpu state arrived")
            guard section.name == "cpu0" else { throw StreamError("state for vCPU '\(section.name)', this machine has cpu0 only") }
            try fds[.main]!.bind(section.fdNames, for: section.label)
            try target.restoreVCPU(try VCPUState.decode(section.payload))
            loader!.loaded.insert("cpu0")
        case .switchover:
            guard state == .receivingState else { throw StreamError("a second switch-over section") }
            target.progress.mark("ready to switch over")
            state = .switchingOver
        case .end:
            target.progress.mark("end arrived")
            try loader!.load(section)
            // Checked before acknowledging: the source must not report success for this.
            let unclaimed = closeUnclaimed()
            if !unclaimed.isEmpty {
                throw StreamError("received \(unclaimed.count) file descriptor(s) that no section claimed: \(unclaimed.joined(separator: ", "))")
            }
            state = .completed
            return .finished
        case .cprState:
            throw StreamError("a cpr state on the main channel; it belongs on the cpr channel")
        case .configuration:
            throw StreamError("a second configuration section")
        case .ram, .sharedRAM, .device:
            try loader!.load(section)
        }
        return .next
    }
}
