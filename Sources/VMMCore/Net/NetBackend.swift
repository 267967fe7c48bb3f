/// Where a virtio-net device's frames go: one packet-preserving fd per queue pair
/// (TAP queues today; vhost and vhost-user later sit behind the same protocol).
public protocol NetBackend: AnyObject, Sendable {
    /// The `-netdev` id.
    var id: String { get }
    /// Host-side interface name, for queries and messages.
    var ifname: String { get }
    var queueFDs: [FileDescriptor] { get }
    /// Queue pairs this backend serves (its fds may arrive later, with a migration).
    var queueCount: Int { get }
    /// Whether each frame on the fds starts with the 12-byte virtio-net header.
    var vnetHeader: Bool { get }
    /// Only the first `count` queues should receive traffic.
    func attachQueues(count: Int)
    /// `incoming-fds=on` and the queues have not come yet.
    var awaitsIncomingQueues: Bool { get }
    /// Takes over the queues a local migration passed in (closed on failure).
    func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws
    /// `cpr=on`: a cpr-transfer hands this netdev's fds to the next process.
    var cpr: Bool { get }
    /// The vhost devices a cpr-transfer hands over beside the queues (the cpr state's entry).
    var cprVhostKind: CPRState.VhostKind { get }
    /// The datapath a NIC with `pairs` queue pairs runs on this netdev. `memoryBackend`:
    /// the guest RAM's `-object` id, for messages.
    func makeDatapath(pairs: Int, memory: GuestMemory, memoryBackend: String?) throws -> NetDatapath
    /// Whether frames can move (a vhost-user backend is connected); a TAP's always can.
    var linkUp: Bool { get }
    /// The netdev is removed or the machine ends (loop thread): stop watching its fds.
    func shutdown()
}

extension NetBackend {
    public var queueCount: Int { queueFDs.count }
    /// A TAP's frames move in this process.
    public func makeDatapath(pairs: Int, memory: GuestMemory, memoryBackend: String?) throws -> NetDatapath {
        UserspaceTapDatapath(queues: self, pairs: pairs)
    }
    public var awaitsIncomingQueues: Bool { false }
    public var linkUp: Bool { true }
    public func shutdown() {}
    public var cpr: Bool { false }
    public var cprVhostKind: CPRState.VhostKind { .none }
    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws {
        throw StreamError("netdev '\(id)' cannot take queues from a migration")
    }
}

extension TapBackend: NetBackend {
    public var awaitsIncomingQueues: Bool { queueFDs.isEmpty }
    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws { try adopt(fds, vnetHeader: vnetHeader) }
}
