import CLinux
import CNetlink
import Glibc
import Synchronization

/// A failed netlink request: what was asked, of which device, with which value, and
/// libnl's reason ("set MAC 52:54:00:12:34:56 on tap0: No such device (libnl error 31)").
public struct NetlinkError: Error, Equatable, CustomStringConvertible {
    public var operation: String
    /// A libnl `NLE_*` code (positive); libnl maps the kernel's errno onto these.
    public var code: Int32

    public init(_ operation: String, code: Int32) {
        self.operation = operation
        self.code = abs(code)
    }

    public var text: String { String(cString: nl_geterror(code)) }
    public var description: String { "\(operation): \(text) (libnl error \(code))" }
}

/// One network device as the kernel reports it.
public struct LinkInfo: Sendable, Equatable, CustomStringConvertible {
    public var name: String
    public var index: Int32
    /// Lowercase `52:54:00:12:34:56`; nil for devices without one.
    public var mac: String?
    /// IFF_* flags; `isUp` is IFF_UP (administratively up, not "has carrier").
    public var flags: UInt32
    public var mtu: UInt32
    /// The rtnl link kind, e.g. "tun" for TAP devices; nil for lo and physical devices.
    public var kind: String?

    public var isUp: Bool { flags & UInt32(CL_IFF_UP) != 0 }
    public var description: String {
        "\(index): \(name)\(kind.map { " (\($0))" } ?? "") \(isUp ? "UP" : "DOWN") mtu \(mtu)\(mac.map { " " + $0 } ?? "")"
    }
}

/// What the kernel says about a TUN/TAP device (rtnl link info of kind "tun"), e.g. to
/// check that a VMM attached all its queues.
public struct TunInfo: Sendable, Equatable {
    public var isTap: Bool
    public var vnetHeader: Bool
    public var persistent: Bool
    public var multiQueue: Bool
    /// Queues attached by open fds right now (a VMM with 4 queue pairs: 4).
    public var queues: Int
    /// Attached but disabled (TUNSETQUEUE IFF_DETACH_QUEUE) queues.
    public var disabledQueues: Int
}

/// A NETLINK_ROUTE socket (libnl-route) for link and address setup.
///
/// A netlink socket belongs to the network namespace of the thread that opened it, for
/// its whole life: open it inside `NetworkNamespace.run` (or use `withRoute`) to manage
/// that namespace. Requests block briefly on the kernel's reply, so call them from a
/// dedicated thread, i.e. inside `run`, not from Swift's task pool. Thread-safe: one
/// request at a time.
public final class RouteSocket: Sendable {
    private let socket: Mutex<OpaquePointer?>

    public init() throws(NetlinkError) {
        guard let sk = nl_socket_alloc() else { throw NetlinkError("allocate netlink socket", code: NLE_NOMEM) }
        // libnl opens it with SOCK_CLOEXEC, so a VMM spawned meanwhile does not inherit it.
        let rc = nl_connect(sk, NETLINK_ROUTE)
        guard rc == 0 else {
            nl_socket_free(sk)
            throw NetlinkError("connect NETLINK_ROUTE socket", code: rc)
        }
        socket = Mutex(sk)
    }

    public func close() {
        socket.withLock { sk in
            if let open = sk { nl_socket_free(open) }
            sk = nil
        }
    }

    deinit { close() }

    // MARK: Links

    public func link(_ name: String) throws(NetlinkError) -> LinkInfo {
        try withLink(name, "look up link \(name)") { _, link in Self.info(link) }
    }

    public func index(of name: String) throws(NetlinkError) -> Int32 { try link(name).index }

    /// Every device in the socket's namespace.
    public func links() throws(NetlinkError) -> [LinkInfo] {
        try withSocket("list links") { sk throws(NetlinkError) in
            var cache: OpaquePointer?
            let rc = rtnl_link_alloc_cache(sk, AF_UNSPEC, &cache)
            guard rc == 0, let cache else { throw NetlinkError("list links", code: rc) }
            defer { nl_cache_free(cache) }
            var result: [LinkInfo] = []
            var object = nl_cache_get_first(cache)
            while let current = object {
                result.append(Self.info(current))
                object = nl_cache_get_next(current)
            }
            return result
        }
    }

    /// `ip link set NAME up|down`.
    public func setLink(_ name: String, up: Bool) throws(NetlinkError) {
        let operation = "set link \(name) \(up ? "up" : "down")"
        try change(name, operation) { change in
            if up {
                rtnl_link_set_flags(change, UInt32(CL_IFF_UP))
            } else {
                rtnl_link_unset_flags(change, UInt32(CL_IFF_UP))
            }
        }
    }

    /// `ip link set NAME address MAC`; `mac` like `52:54:00:12:34:56`.
    public func setMAC(_ mac: String, of name: String) throws(NetlinkError) {
        let operation = "set MAC \(mac) on \(name)"
        guard let bytes = Self.parseMAC(mac) else { throw NetlinkError(operation + " (expected xx:xx:xx:xx:xx:xx)", code: NLE_INVAL) }
        guard let address = bytes.withUnsafeBytes({ nl_addr_build(AF_LLC, $0.baseAddress, 6) }) else {
            throw NetlinkError(operation, code: NLE_NOMEM)
        }
        defer { nl_addr_put(address) }
        try change(name, operation) { change in rtnl_link_set_addr(change, address) }
    }

    /// `ip link set NAME mtu MTU`.
    public func setMTU(_ mtu: UInt32, of name: String) throws(NetlinkError) {
        try change(name, "set MTU \(mtu) on \(name)") { change in rtnl_link_set_mtu(change, mtu) }
    }

    /// `ip link delete NAME`; works for TAPs whether or not a VMM still holds queues.
    public func deleteLink(_ name: String) throws(NetlinkError) {
        try withLink(name, "delete link \(name)") { sk, link throws(NetlinkError) in
            let rc = rtnl_link_delete(sk, link)
            guard rc == 0 else { throw NetlinkError("delete link \(name)", code: rc) }
        }
    }

    // MARK: Addresses

    /// `ip addr add A.B.C.D/N dev NAME` (IPv4; no prefix means /32). An address that is
    /// already there is an error, as with `ip`.
    public func addAddress(_ cidr: String, to name: String) throws(NetlinkError) {
        try address(cidr, name, "add address \(cidr) to \(name)") { sk, address in
            rtnl_addr_add(sk, address, NLM_F_EXCL)
        }
    }

    /// `ip addr del A.B.C.D/N dev NAME`.
    public func removeAddress(_ cidr: String, from name: String) throws(NetlinkError) {
        try address(cidr, name, "remove address \(cidr) from \(name)") { sk, address in
            rtnl_addr_delete(sk, address, 0)
        }
    }

    /// The IPv4 addresses of a device as `A.B.C.D/N`.
    public func addresses(of name: String) throws(NetlinkError) -> [String] {
        let index = try index(of: name)
        return try withSocket("list addresses of \(name)") { sk throws(NetlinkError) in
            var cache: OpaquePointer?
            let rc = rtnl_addr_alloc_cache(sk, &cache)
            guard rc == 0, let cache else { throw NetlinkError("list addresses of \(name)", code: rc) }
            defer { nl_cache_free(cache) }
            var result: [String] = []
            var object = nl_cache_get_first(cache)
            while let current = object {
                if rtnl_addr_get_ifindex(current) == index, rtnl_addr_get_family(current) == AF_INET,
                    let local = rtnl_addr_get_local(current), nl_addr_get_len(local) == 4,
                    let raw = nl_addr_get_binary_addr(local)
                {
                    let bytes = UnsafeRawBufferPointer(start: raw, count: 4)
                    result.append(bytes.map(String.init).joined(separator: ".") + "/\(rtnl_addr_get_prefixlen(current))")
                }
                object = nl_cache_get_next(current)
            }
            return result
        }
    }

    // MARK: TUN/TAP details

    /// The kernel's view of a TUN/TAP device: flags and how many queues are attached.
    /// libnl-route does not parse the "tun" link data, so this asks with RTM_GETLINK and
    /// reads the IFLA_TUN_* attributes itself.
    public func tunInfo(_ name: String) throws(NetlinkError) -> TunInfo {
        let index = try index(of: name)
        let operation = "read TUN info of \(name)"
        let message = try withSocket(operation) { sk throws(NetlinkError) in
            var request = ifinfomsg()
            request.ifi_family = UInt8(AF_UNSPEC)
            request.ifi_index = index
            var rc = nl_send_simple(sk, Int32(RTM_GETLINK), 0, &request, MemoryLayout<ifinfomsg>.size)
            guard rc >= 0 else { throw NetlinkError(operation, code: rc) }
            guard let callbacks = nl_cb_alloc(NL_CB_DEFAULT) else { throw NetlinkError(operation, code: NLE_NOMEM) }
            defer { nl_cb_put(callbacks) }
            let box = Unmanaged.passRetained(MessageBox())
            defer { box.release() }
            nl_cb_set(callbacks, NL_CB_VALID, NL_CB_CUSTOM, { message, context in
                guard let message, let context, let header = nlmsg_hdr(message) else { return Int32(NL_STOP.rawValue) }
                let length = Int(header.pointee.nlmsg_len)
                let bytes = [UInt8](UnsafeRawBufferPointer(start: header, count: length))
                Unmanaged<MessageBox>.fromOpaque(context).takeUnretainedValue().bytes = bytes
                return Int32(NL_OK.rawValue)
            }, box.toOpaque())
            rc = nl_recvmsgs(sk, callbacks)
            guard rc >= 0 else { throw NetlinkError(operation, code: rc) }
            // libnl asked for an ACK (as rtnl_link_get_kernel does); consume it so that it
            // is not taken for the answer to the next request.
            rc = nl_wait_for_ack(sk)
            guard rc >= 0 else { throw NetlinkError(operation, code: rc) }
            return box.takeUnretainedValue().bytes
        }
        guard let info = Self.parseTunInfo(message) else {
            throw NetlinkError(operation + " (not a TUN/TAP device)", code: NLE_OPNOTSUPP)
        }
        return info
    }

    private final class MessageBox {
        var bytes: [UInt8] = []
    }

    /// An RTM_NEWLINK message → IFLA_LINKINFO → IFLA_INFO_KIND "tun" and IFLA_INFO_DATA's IFLA_TUN_*.
    static func parseTunInfo(_ message: [UInt8]) -> TunInfo? {
        let headerSize = align(MemoryLayout<nlmsghdr>.size) + align(MemoryLayout<ifinfomsg>.size)
        guard message.count > headerSize else { return nil }
        let top = attributes(message, from: headerSize)
        guard let linkInfo = top[IFLA_LINKINFO] else { return nil }
        let info = attributes(Array(linkInfo), from: 0)
        guard let kind = info[IFLA_INFO_KIND],
            String(decoding: kind.prefix { $0 != 0 }, as: UTF8.self) == "tun",
            let data = info[IFLA_INFO_DATA]
        else { return nil }
        let tun = attributes(Array(data), from: 0)
        func u8(_ type: Int) -> Bool { tun[type]?.first.map { $0 != 0 } ?? false }
        func u32(_ type: Int) -> Int {
            guard let value = tun[type], value.count >= 4 else { return 0 }
            return Int(value.withUnsafeBytes { $0.loadUnaligned(as: UInt32.self) })
        }
        return TunInfo(
            isTap: tun[IFLA_TUN_TYPE]?.first == UInt8(CL_IFF_TAP),
            vnetHeader: u8(IFLA_TUN_VNET_HDR), persistent: u8(IFLA_TUN_PERSIST),
            multiQueue: u8(IFLA_TUN_MULTI_QUEUE), queues: u32(IFLA_TUN_NUM_QUEUES),
            disabledQueues: u32(IFLA_TUN_NUM_DISABLED_QUEUES))
    }

    /// Netlink attributes (`struct nlattr`: u16 length, u16 type, payload, 4-byte aligned)
    /// by type, nesting flags masked off.
    static func attributes(_ bytes: [UInt8], from start: Int) -> [Int: ArraySlice<UInt8>] {
        var result: [Int: ArraySlice<UInt8>] = [:]
        var offset = start
        while offset + 4 <= bytes.count {
            let length = Int(bytes[offset]) | Int(bytes[offset + 1]) << 8
            let type = (Int(bytes[offset + 2]) | Int(bytes[offset + 3]) << 8) & 0x3fff
            guard length >= 4, offset + length <= bytes.count else { break }
            result[type] = bytes[(offset + 4)..<(offset + length)]
            offset += align(length)
        }
        return result
    }

    private static func align(_ n: Int) -> Int { (n + 3) & ~3 }

    // MARK: Helpers

    private func withSocket<T: Sendable>(_ operation: String, _ body: (OpaquePointer) throws(NetlinkError) -> T) throws(NetlinkError) -> T {
        try socket.withLock { (sk: inout OpaquePointer?) throws(NetlinkError) -> T in
            guard let open = sk else { throw NetlinkError(operation + " (socket closed)", code: NLE_BAD_SOCK) }
            return try body(open)
        }
    }

    /// Fetches the link from the kernel (an rtnl_link is needed for changes and deletes);
    /// `operation` names the whole request in errors.
    private func withLink<T: Sendable>(
        _ name: String, _ operation: String, _ body: (OpaquePointer, OpaquePointer) throws(NetlinkError) -> T
    ) throws(NetlinkError) -> T {
        try withSocket(operation) { sk throws(NetlinkError) in
            var link: OpaquePointer?
            let rc = rtnl_link_get_kernel(sk, 0, name, &link)
            guard rc == 0, let link else { throw NetlinkError(operation, code: rc == 0 ? NLE_OBJ_NOTFOUND : rc) }
            defer { rtnl_link_put(link) }
            return try body(sk, link)
        }
    }

    private func change(_ name: String, _ operation: String, _ edit: (OpaquePointer) -> Void) throws(NetlinkError) {
        try withLink(name, operation) { sk, link throws(NetlinkError) in
            guard let change = rtnl_link_alloc() else { throw NetlinkError(operation, code: NLE_NOMEM) }
            defer { rtnl_link_put(change) }
            edit(change)
            let rc = rtnl_link_change(sk, link, change, 0)
            guard rc == 0 else { throw NetlinkError(operation, code: rc) }
        }
    }

    private func address(
        _ cidr: String, _ name: String, _ operation: String, _ request: (OpaquePointer, OpaquePointer) -> Int32
    ) throws(NetlinkError) {
        guard let (bytes, prefix) = Self.parseIPv4(cidr) else {
            throw NetlinkError(operation + " (expected A.B.C.D/N)", code: NLE_INVAL)
        }
        let index = try withLink(name, operation) { _, link in rtnl_link_get_ifindex(link) }
        try withSocket(operation) { sk throws(NetlinkError) in
            guard let address = rtnl_addr_alloc() else { throw NetlinkError(operation, code: NLE_NOMEM) }
            defer { rtnl_addr_put(address) }
            guard let local = bytes.withUnsafeBytes({ nl_addr_build(AF_INET, $0.baseAddress, 4) }) else {
                throw NetlinkError(operation, code: NLE_NOMEM)
            }
            defer { nl_addr_put(local) }
            nl_addr_set_prefixlen(local, Int32(prefix))
            rtnl_addr_set_ifindex(address, index)
            rtnl_addr_set_family(address, AF_INET)
            var rc = rtnl_addr_set_local(address, local)
            guard rc == 0 else { throw NetlinkError(operation, code: rc) }
            rtnl_addr_set_prefixlen(address, Int32(prefix))
            rc = request(sk, address)
            guard rc == 0 else { throw NetlinkError(operation, code: rc) }
        }
    }

    private static func info(_ link: OpaquePointer) -> LinkInfo {
        var mac: String?
        if let address = rtnl_link_get_addr(link), nl_addr_get_len(address) == 6, let raw = nl_addr_get_binary_addr(address) {
            mac = UnsafeRawBufferPointer(start: raw, count: 6).map { byte in
                let hex = String(byte, radix: 16)
                return byte < 16 ? "0" + hex : hex
            }.joined(separator: ":")
        }
        return LinkInfo(
            name: rtnl_link_get_name(link).map { String(cString: $0) } ?? "",
            index: rtnl_link_get_ifindex(link), mac: mac, flags: rtnl_link_get_flags(link),
            mtu: rtnl_link_get_mtu(link), kind: rtnl_link_get_type(link).map { String(cString: $0) })
    }

    /// `52:54:00:12:34:56` (or with `-`) → 6 bytes.
    static func parseMAC(_ text: String) -> [UInt8]? {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        let fields = parts.count == 6 ? parts : text.split(separator: "-", omittingEmptySubsequences: false)
        guard fields.count == 6 else { return nil }
        let bytes = fields.compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
        return bytes.count == 6 ? bytes : nil
    }

    /// `A.B.C.D/N` (N defaults to 32) → 4 bytes and the prefix length.
    static func parseIPv4(_ text: String) -> ([UInt8], Int)? {
        let parts = text.split(separator: "/", omittingEmptySubsequences: false)
        guard parts.count == 1 || parts.count == 2 else { return nil }
        var prefix = 32
        if parts.count == 2 {
            guard let n = Int(parts[1]), (0...32).contains(n) else { return nil }
            prefix = n
        }
        var address = in_addr()
        guard inet_pton(AF_INET, String(parts[0]), &address) == 1 else { return nil }
        return (withUnsafeBytes(of: address.s_addr) { Array($0) }, prefix)
    }
}

extension NetworkNamespace {
    /// Opens a `RouteSocket` in the namespace and runs `body` with it on a thread inside
    /// the namespace: `try await ns.withRoute { try $0.setLink("tap0", up: true) }`.
    public func withRoute<T: Sendable>(_ body: @escaping @Sendable (RouteSocket) throws -> T) async throws -> T {
        try await run {
            let route = try RouteSocket()
            defer { route.close() }
            return try body(route)
        }
    }

    /// The host side of a migration to a new TAP, like the QEMU seed's
    /// switch_network_to_tap2: both links go down, `to` takes `mac` (the old TAP's) and
    /// the address `cidr`, so the guest's ARP entry for the host stays valid, and comes up.
    public func moveHostAddress(_ cidr: String, mac: String, from old: String, to new: String) async throws {
        try await withRoute { route in
            try route.setLink(new, up: false)
            try route.setLink(old, up: false)
            try route.removeAddress(cidr, from: old)
            try route.setMAC(mac, of: new)
            try route.addAddress(cidr, to: new)
            try route.setLink(new, up: true)
        }
    }
}
