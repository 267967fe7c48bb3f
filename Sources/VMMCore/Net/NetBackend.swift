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
}

extension NetBackend {
    public var queueCount: Int { queueFDs.count }
}

extension TapBackend: NetBackend {}
