/// Which implementation moves a virtio-net device's frames (`query-pci` reports it).
public enum DatapathKind: String, Sendable {
    case userspace
    case vhostKernel = "vhost-kernel"
    case vhostUser = "vhost-user"
}

/// How guest notifies reach a datapath and how it tells the guest about used buffers.
public enum DatapathNotification: Sendable {
    /// The notify exit calls `notified` on the vCPU thread; the datapath wakes the vCPU.
    case inline
    /// Each ring has a kick eventfd (KVM signals it on the guest's notify, or the VMM
    /// relays the exit) and a call eventfd the datapath signals after publishing used
    /// buffers, which wakes a halted vCPU.
    case eventFDs
}

/// A ring as the device hands it to the datapath.
public struct RingHandoff: Sendable {
    /// Layout (validated when the driver enabled it) and progress.
    public var queue: Virtqueue
    /// `.eventFDs` only.
    public let kick: EventFD?
    public let call: EventFD?
}

/// What a datapath needs from the device it serves while its rings run.
public struct DatapathContext: Sendable {
    public let memory: GuestMemory
    /// A ring failed (a bad descriptor, a ring outside RAM): the device needs a reset.
    public let ringFailed: @Sendable (_ index: Int, _ message: String) -> Void
    /// The transport sends ring `index`'s notifies to the kick eventfd (`.eventFDs`).
    public let attachDoorbell: @Sendable (_ index: Int, _ kick: EventFD) -> Void
    public let detachDoorbells: @Sendable () -> Void
}

/// Moves frames between a virtio-net device's RX/TX rings and the host. The device
/// keeps config space, features, the control queue and the queue-pair count; the
/// datapath owns the RX (2p) and TX (2p+1) rings between `start` and `stop`, as
/// Firecracker's and cloud-hypervisor's `activate`/`reset` hand queues over and back.
public protocol NetDatapath: AnyObject, Sendable {
    var netdevID: String { get }
    var ifname: String { get }
    var kind: DatapathKind { get }
    var notification: DatapathNotification { get }
    /// Queue pairs the netdev serves.
    var queuePairs: Int { get }
    /// Watches its host fds on the host's loop once it has them (loop thread; idempotent).
    func attach(to host: DeviceHost)
    func detach()
    /// Takes the rings (by virtqueue index) and runs them.
    func start(_ rings: [Int: RingHandoff], activePairs: Int, context: DatapathContext)
    /// Stops every ring and returns them with their progress; after return nothing
    /// writes guest RAM and host input waits where it is (in the TAP).
    func stop() -> [Int: Virtqueue]
    /// The guest changed the number of queue pairs in use (VQ_PAIRS_SET).
    func setActivePairs(_ pairs: Int)
    /// The guest notified ring `index` (vCPU thread; `.inline` only).
    func notified(_ index: Int)
    /// Per pair: frames received and sent.
    var statistics: (rx: [UInt64], tx: [UInt64]) { get }
    /// Why a migration would lose state with this datapath; nil when it would not.
    var migrationBlocker: String? { get }
    /// virtio-net's VIRTIO_NET_S_LINK_UP: false while a vhost-user backend is away.
    var linkUp: Bool { get }
    /// Dirty logging for pre-copy (see `MachineDevice.startDirtyLog`): a datapath whose
    /// back-end writes guest RAM outside this process logs those pages from here until
    /// `stopDirtyLog`, across its own stops and starts. In-process datapaths mark
    /// `GuestMemory.deviceDirty` and keep the no-op defaults.
    func startDirtyLog() throws
    func collectDirty(into bitmap: inout [UInt64])
    func stopDirtyLog()
    /// The host fds a local migration hands over, under their stream names.
    func handedOverFDs() -> [NamedFD]
    var vnetHeader: Bool { get }
    /// `incoming-fds=on` and the fds have not come yet.
    var awaitsIncomingFDs: Bool { get }
    func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws
    /// The netdev is `cpr=on`: a cpr-transfer hands its fds to the next process.
    var handsOverForCPR: Bool { get }
    /// cpr-transfer, the device paused: stop using the host fds the next process takes
    /// over (a TAP: no more polling; kernel vhost: VHOST_RESET_OWNER; vhost-user: its
    /// equivalent) and return any fds beyond the TAP queues the cpr state must carry.
    /// Default: nothing to let go of.
    func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD]
    /// The inverse after a failed or cancelled handover (idempotent): own and watch the
    /// fds again on `host`, as before `prepareForHandover`.
    func cancelHandover(_ context: HandoverContext, host: DeviceHost)
}

extension NetDatapath {
    public var migrationBlocker: String? { nil }
    public var linkUp: Bool { true }
    public var handsOverForCPR: Bool { false }
    public func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD] { [] }
    public func cancelHandover(_ context: HandoverContext, host: DeviceHost) {}
    public func startDirtyLog() throws {}
    public func collectDirty(into bitmap: inout [UInt64]) {}
    public func stopDirtyLog() {}
}
