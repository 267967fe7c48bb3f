import Glibc

/// `-netdev tap,...` as QEMU spells it.
public struct NetdevSpec: Sendable, Equatable {
    public var id: String
    public var ifname: String?
    public var queues: Int
    public var vnetHeader: Bool?
    /// Inherited fds (`fd=N` or `fds=N:M:...`), used instead of opening `ifname`.
    public var fds: [Int32]?
    /// `incoming-fds=on`: open nothing; the queues come from a local migration's stream.
    public var incomingFDs = false

    static let keys: Set<String> = ["type", "id", "ifname", "queues", "script", "downscript", "vnet_hdr", "fd", "fds", "vhost", "sndbuf", "incoming-fds", "helper", "br"]
    /// What `incoming-fds` excludes, in the series' order and wording: all of it describes
    /// how to open or configure a TAP, which comes from the source instead. (The series
    /// accepts `vhost=`, `vhostfds=`, `vhostforce=` and `poll-us=` beside it: vhost is set
    /// up after the load. They join `keys` when vhost does.)
    static let excludedByIncomingFDs = ["fd", "fds", "helper", "br", "ifname", "sndbuf", "vnet_hdr"]

    /// `script=no` and, as in QEMU, `script=` (empty): no script runs.
    static func isNoScript(_ value: String?) -> Bool { value == "no" || value == "" }

    public static func parse(_ value: String, option: String) throws -> NetdevSpec {
        let list = try KeyValueList(value, option: option, impliedKey: "type")
        guard list["type"] == "tap" else {
            throw VMMConfiguration.Error("\(option) \(value): unsupported netdev type '\(list["type"] ?? "")' (only 'tap')")
        }
        try list.checkKeys(keys, context: value)
        let id = try list.required("id", in: value)
        var incomingFDs = false
        if try list.bool("incoming-fds", default: false) {
            // The seed series' rules: the TAP comes from the source, so nothing may describe
            // how to open or configure one here.
            guard excludedByIncomingFDs.allSatisfy({ list[$0] == nil }) else {
                let names = excludedByIncomingFDs.map { "\($0)=" }
                throw VMMConfiguration.Error("\(option) \(value): incoming-fds is incompatible with \(names.dropLast().joined(separator: ", ")) and \(names.last!)")
            }
            // The series also takes an empty script as "no", without saying so in the message.
            guard isNoScript(list["script"]), isNoScript(list["downscript"]) else {
                throw VMMConfiguration.Error("\(option) \(value): incoming-fds requires script=no and downscript=no")
            }
            incomingFDs = true
        }
        for key in ["script", "downscript"] {
            if let script = list[key], !isNoScript(script) {
                throw VMMConfiguration.Error("\(option) \(value): \(key)=\(script) is not supported, use \(key)=no and set the TAP up beforehand")
            }
        }
        if try list.bool("vhost", default: false) {
            throw VMMConfiguration.Error("\(option) \(value): vhost=on is not supported yet")
        }
        var spec = NetdevSpec(id: id, ifname: list["ifname"], queues: 1, vnetHeader: nil, fds: nil)
        spec.incomingFDs = incomingFDs
        if let queues = list["queues"] {
            guard let n = Int(queues), n >= 1, n <= 256 else { throw VMMConfiguration.Error("\(option) \(value): queues=\(queues) must be 1..256") }
            spec.queues = n
        }
        if list["vnet_hdr"] != nil { spec.vnetHeader = try list.bool("vnet_hdr", default: true) }
        if let fd = list["fd"] { spec.fds = try parseFDs(fd, option: option, value: value) }
        if let fds = list["fds"] {
            guard spec.fds == nil else { throw VMMConfiguration.Error("\(option) \(value): fd= and fds= exclude each other") }
            spec.fds = try parseFDs(fds, option: option, value: value)
        }
        if list["sndbuf"] != nil && !spec.incomingFDs { throw VMMConfiguration.Error("\(option) \(value): sndbuf= is not supported") }
        // Known tap keys, so that incoming-fds names them; this VMM runs no bridge helper.
        for key in ["helper", "br"] where list[key] != nil {
            throw VMMConfiguration.Error("\(option) \(value): \(key)= is not supported (no bridge helper): create the TAP and attach it to the bridge beforehand, then use ifname= or fd=")
        }
        if let fds = spec.fds {
            if spec.ifname != nil { throw VMMConfiguration.Error("\(option) \(value): ifname= cannot be combined with fd=/fds=") }
            if list["queues"] != nil && spec.queues != fds.count {
                throw VMMConfiguration.Error("\(option) \(value): queues=\(spec.queues) but \(fds.count) fds were given")
            }
            spec.queues = fds.count
        }
        return spec
    }

    static func parseFDs(_ text: String, option: String, value: String) throws -> [Int32] {
        try text.split(separator: ":", omittingEmptySubsequences: false).map { part in
            guard let fd = Int32(part), fd >= 0 else { throw VMMConfiguration.Error("\(option) \(value): '\(part)' is not a file descriptor number") }
            guard fcntl(fd, F_GETFD) >= 0 else { throw VMMConfiguration.Error("\(option) \(value): fd \(fd) is not open in this process") }
            return fd
        }
    }
}

/// `-device virtio-net-pci,netdev=ID,...`.
public struct DeviceSpec: Sendable, Equatable {
    public var id: String?
    public var netdev: String
    public var mac: [UInt8]?
    public var multiQueue: Bool
    /// `local-migration=on|off` (default on): hand the TAP fds to the target when the
    /// migration parameter `local` is set.
    public var localMigration = true

    static let keys: Set<String> = ["driver", "id", "netdev", "mac", "mq", "vectors", "romfile", "addr", "bus", "local-migration"]

    public static func parse(_ value: String, option: String) throws -> DeviceSpec {
        let list = try KeyValueList(value, option: option, impliedKey: "driver")
        guard list["driver"] == "virtio-net-pci" else {
            throw VMMConfiguration.Error("\(option) \(value): unsupported device '\(list["driver"] ?? "")' (only virtio-net-pci)")
        }
        try list.checkKeys(keys, context: value)
        let netdev = try list.required("netdev", in: value)
        var spec = DeviceSpec(id: list["id"], netdev: netdev, mac: nil, multiQueue: try list.bool("mq", default: false))
        spec.localMigration = try list.bool("local-migration", default: true)
        if let mac = list["mac"] {
            guard let bytes = parseMAC(mac) else { throw VMMConfiguration.Error("\(option) \(value): mac=\(mac) is not a MAC address like 52:54:00:12:34:56") }
            guard bytes[0] & 1 == 0 else { throw VMMConfiguration.Error("\(option) \(value): mac=\(mac) is a multicast address") }
            spec.mac = bytes
        }
        return spec
    }

    public static func parseMAC(_ text: String) -> [UInt8]? {
        let parts = text.split(separator: ":", omittingEmptySubsequences: false)
        guard parts.count == 6 else { return nil }
        let bytes = parts.compactMap { $0.count == 2 ? UInt8($0, radix: 16) : nil }
        return bytes.count == 6 ? bytes : nil
    }
}
