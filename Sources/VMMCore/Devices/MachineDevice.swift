import QMPWire

/// A device's saved state: plain data, untrusted until a device loads it. Each section
/// carries its state's version, so a newer build reads every older version it knows
/// (filling new fields with defaults) and refuses a newer one by name.
public protocol VersionedState: Sendable, Equatable {
    /// The version this build writes.
    static var version: UInt16 { get }
    /// The oldest version this build still reads.
    static var oldestReadableVersion: UInt16 { get }
    func encode(into w: inout StreamWriter)
    /// Parsing only (lengths, enums, the encoding's bounds); no checks against a machine,
    /// which the device's `load` does.
    init(decoding r: inout StreamReader, version: UInt16) throws
}

extension VersionedState {
    public static var oldestReadableVersion: UInt16 { 1 }
    public static var readableVersions: ClosedRange<UInt16> { oldestReadableVersion...version }

    /// `version:u16` then the state.
    public func encoded() -> [UInt8] {
        var w = StreamWriter()
        w.u16(Self.version)
        encode(into: &w)
        return w.bytes
    }

    /// The state `bytes` (from `encoded()`) hold, for `owner`'s messages.
    public static func decode(_ bytes: [UInt8], owner: String) throws -> Self {
        var r = StreamReader(bytes, context: "\(owner) state")
        let version = try r.u16("state version")
        guard readableVersions.contains(version) else {
            let relation = version > Self.version ? "newer than this build reads" : "older than this build reads"
            throw StreamError("\(owner): state version \(version) is \(relation) (\(readableVersions.lowerBound)...\(readableVersions.upperBound)); update the target")
        }
        let state = try Self(decoding: &r, version: version)
        try r.finish()
        return state
    }
}

/// What the source hands over, which decides what the devices put in the stream.
public struct HandoverContext: Sendable {
    /// `local`: fds travel with the device sections; `cprTransfer`: the guest is stopped
    /// first and `cpr=on` netdevs' fds travel in the cpr state, before any device section.
    public enum Mode: Sendable { case normal, local, cprTransfer }
    public var mode: Mode
    public init(mode: Mode) { self.mode = mode }
}

/// An fd a device passes to the migration target under a stream-wide name
/// (`netdev/<id>/tap.<i>`, `machine/ram`); the fd stays the device's.
public struct NamedFD: Sendable {
    public let name: String
    public let fd: FileDescriptor
    public init(name: String, fd: FileDescriptor) {
        self.name = name
        self.fd = fd
    }
}

/// What the machine and the migration code see of any device, and nothing else: no
/// caller downcasts to a concrete device type.
public protocol MachineDevice: AnyObject, Sendable {
    /// The stream's section name and the id in the configuration: "serial0", "pci0", "net0".
    var id: String { get }
    /// The properties that must agree between source and target; nil for none.
    func configuration(_ context: HandoverContext) -> MachineDescription.Device?
    /// Stops everything that writes guest RAM or consumes host input (RX). The vCPU is
    /// parked already. Idempotent; loop thread.
    func pause() throws
    /// Runs (again): at start-up (not on a migration target, whose devices wait for
    /// `cont`), on `cont`, or after a migration failed at the source. Idempotent.
    func resume() throws
    /// The device's section; paused only.
    func saveSection(_ context: HandoverContext) -> (payload: [UInt8], fds: [NamedFD])
    /// Loads a section into a device that never ran (a migration target); a failed load
    /// leaves the device as it was. The device claims its fds from `fds` by name.
    func loadSection(_ payload: [UInt8], fds: ReceivedFDs) throws
    /// At the stream's end, on the target: throws if the device cannot run (e.g. its TAP
    /// queues never came).
    func checkReadyToRun() throws
    /// For query-pci's device entry; nil when the device adds nothing.
    var queryInfo: JSONObject? { get }
    /// Why this device cannot migrate now (`migrate` is refused up front, naming it, as
    /// QEMU's migration blockers are); nil when it can.
    var migrationBlocker: String? { get }
    /// cpr-transfer, after `pause` and before the cpr state is sent (003's setup
    /// notifiers): let go of what the next process takes over, so it can take it at once
    /// (a `cpr=on` TAP stops being polled; a vhost device resets its owner, so that the
    /// target's VHOST_SET_OWNER cannot fail with EBUSY). Returns fds the cpr state carries
    /// beyond the netdev's TAP queues (e.g. `netdev/<id>/vhost.<i>`). Loop thread.
    func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD]
    /// The inverse, when the migration failed or was cancelled after `prepareForHandover`
    /// (or during it): take everything back as it was, before `resume`. Idempotent.
    func cancelHandover(_ context: HandoverContext)
    /// Pre-copy starts (control thread, before the first pass): a device whose host side
    /// writes guest RAM behind the VMM (vhost: the kernel or a vhost-user back-end) starts
    /// logging those pages. Devices that write RAM in this process mark
    /// `GuestMemory.deviceDirty` instead and need nothing here. Throws when the device
    /// cannot log (the migration fails before the first pass, naming it).
    func startDirtyLog() throws
    /// ORs the pages logged since the last call into `bitmap` (indexed by page of host
    /// offset, as `DirtyBitmap`) and clears them (migration thread, any time between
    /// start and stop; after `pause` it includes everything the device wrote).
    func collectDirty(into bitmap: inout [UInt64])
    /// Pre-copy ended (completed, failed or cancelled; control thread). Idempotent.
    func stopDirtyLog()
    /// The machine is going away: stop watching fds, release them.
    func shutdown()
}

/// A device whose section is one `VersionedState`; this extension implements the
/// section methods.
public protocol StatefulDevice: MachineDevice {
    associatedtype SavedState: VersionedState
    func save(_ context: HandoverContext) -> SavedState
    /// Validates everything (parts through throwing initialisers, fds claimed last),
    /// then commits: a failed load leaves the device as it was.
    func load(_ state: SavedState, fds: ReceivedFDs) throws
    func handedOverFDs(_ context: HandoverContext) -> [NamedFD]
}

extension StatefulDevice {
    public func saveSection(_ context: HandoverContext) -> (payload: [UInt8], fds: [NamedFD]) {
        (save(context).encoded(), handedOverFDs(context))
    }

    public func loadSection(_ payload: [UInt8], fds: ReceivedFDs) throws {
        try load(try SavedState.decode(payload, owner: id), fds: fds)
    }

    public func handedOverFDs(_ context: HandoverContext) -> [NamedFD] { [] }
}

extension MachineDevice {
    public func configuration(_ context: HandoverContext) -> MachineDescription.Device? { nil }
    public func pause() throws {}
    public func resume() throws {}
    public func checkReadyToRun() throws {}
    public var queryInfo: JSONObject? { nil }
    public var migrationBlocker: String? { nil }
    public func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD] { [] }
    public func cancelHandover(_ context: HandoverContext) {}
    public func startDirtyLog() throws {}
    public func collectDirty(into bitmap: inout [UInt64]) {}
    public func stopDirtyLog() {}
    public func shutdown() {}
}

/// What a device needs from the machine to run: the loop for its fds and a way to
/// rouse (and let it receive in) a halted vCPU.
public struct DeviceHost: Sendable {
    public let loop: EventLoop
    public let wakeGuest: @Sendable () -> Void
    /// Replaces the sources `owner` registered before.
    public let setHaltWakeSources: @Sendable (_ owner: String, [VCPURunner.HaltWakeSource]) -> Void
}
