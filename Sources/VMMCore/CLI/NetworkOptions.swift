import Glibc

/// `-netdev tap,...` as QEMU spells it.
public struct NetdevSpec: Sendable, Equatable {
    public var id: String
    public var ifname: String?
    public var queues: Int
    public var vnetHeader: Bool?
    /// Inherited fds (`fd=N` or `fds=N:M:...`), used instead of opening `ifname`.
    public var fds: [Int32]?
    /// `vhost=on`: the kernel's vhost-net runs the TAP's rings.
    public var vhost: VhostKernelOptions?
    /// `incoming-fds=on`: open nothing; the queues come from a local migration's stream.
    public var incomingFDs = false
    /// `-netdev vhost-user,chardev=ID`: the rings run in the backend behind that socket chardev.
    public var vhostUserChardev: String?
    /// `-netdev vhost-user`: with `incoming-fds=on` its connection comes from a local migration.
    public var vhostUser = false
    /// `cpr=on` (default off): a cpr-transfer hands this TAP's fds to the next process,
    /// and on a cpr-transfer target the netdev takes them from the cpr state by its id.
    public var cpr = false

    static let vhostUserKeys: Set<String> = ["type", "id", "chardev", "queues", "incoming-fds", "cpr"]

    static let keys: Set<String> = ["type", "id", "ifname", "queues", "script", "downscript", "vnet_hdr", "fd", "fds", "vhost", "vhostforce",
                                     "vhostfd", "vhostfds", "sndbuf", "incoming-fds", "helper", "br", "cpr"]
    /// What `incoming-fds` excludes, in the series' order and wording: all of it describes
    /// how to open or configure a TAP, which comes from the source instead. (`vhost=`,
    /// `vhostforce=`, `vhostfd(s)=` stay allowed: the target's own vhost devices are set up
    /// on the TAP once it arrived.)
    static let excludedByIncomingFDs = ["fd", "fds", "helper", "br", "ifname", "sndbuf", "vnet_hdr"]

    /// `script=no` and, as in QEMU, `script=` (empty): no script runs.
    static func isNoScript(_ value: String?) -> Bool { value == "no" || value == "" }

    public static func parse(_ value: String, option: String) throws -> NetdevSpec {
        let list = try KeyValueList(value, option: option, impliedKey: "type")
        if list["type"] == "vhost-user" {
            try list.checkKeys(vhostUserKeys, context: value)
            var spec = NetdevSpec(id: try list.required("id", in: value), ifname: nil, queues: 1, vnetHeader: nil, fds: nil)
            spec.vhostUser = true
            // As a TAP's: the connection comes from the source, so no chardev names one here.
            if try list.bool("incoming-fds", default: false) {
                guard list["chardev"] == nil else {
                    throw VMMConfiguration.Error("\(option) \(value): incoming-fds is incompatible with chardev= (the backend connection comes from the migration source)")
                }
                spec.incomingFDs = true
            } else {
                spec.vhostUserChardev = try list.required("chardev", in: value)
            }
            if let queues = list["queues"] {
                guard let n = Int(queues), n >= 1, n <= 128 else { throw VMMConfiguration.Error("\(option) \(value): queues=\(queues) must be 1..128") }
                spec.queues = n
            }
            // cpr=on keeps chardev=: the same options as the source's, and the socket to
            // reconnect through after the update.
            spec.cpr = try list.bool("cpr", default: false)
            if spec.cpr && spec.incomingFDs {
                throw VMMConfiguration.Error("\(option) \(value): cpr=on and incoming-fds=on exclude each other (cpr-transfer passes the connection on the cpr channel, local migration in the stream)")
            }
            return spec
        }
        guard list["type"] == "tap" else {
            throw VMMConfiguration.Error("\(option) \(value): unsupported netdev type '\(list["type"] ?? "")' (only 'tap' and 'vhost-user')")
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
        var spec = NetdevSpec(id: id, ifname: list["ifname"], queues: 1, vnetHeader: nil, fds: nil)
        spec.incomingFDs = incomingFDs
        spec.cpr = try list.bool("cpr", default: false)
        if spec.cpr && incomingFDs {
            throw VMMConfiguration.Error("\(option) \(value): cpr=on and incoming-fds=on exclude each other (cpr-transfer passes the fds on the cpr channel, local migration in the stream)")
        }
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
        spec.vhost = try VhostKernelOptions.parse(list, queues: spec.queues, option: option, value: value)
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

/// A TAP's `vhost=on[,vhostforce=on][,vhostfd=N|vhostfds=N:M:...]`, as QEMU reads them
/// (`tap_parse_vhost_fds`): `vhost=` decides when given; without it, vhostfd(s) or
/// vhostforce=on turn vhost on. There is no fallback to the userspace datapath: vhost
/// that cannot be set up is an error, so `vhostforce` (which once meant "no fallback")
/// changes nothing beyond turning vhost on.
public struct VhostKernelOptions: Sendable, Equatable {
    /// Inherited `/dev/vhost-net` fds, one per queue; nil: the VMM opens its own.
    public var fds: [Int32]?
    /// The option as given, for errors at netdev creation ("-netdev tap,id=n1,vhost=on").
    public var origin: String

    static func parse(_ list: KeyValueList, queues: Int, option: String, value: String) throws -> VhostKernelOptions? {
        let fail = { (message: String) in VMMConfiguration.Error("\(option) \(value): \(message)") }
        let force = try list.bool("vhostforce", default: false)
        let given = list["vhostfd"] ?? list["vhostfds"]
        if list["vhostfd"] != nil && list["vhostfds"] != nil { throw fail("vhostfd= and vhostfds= exclude each other") }
        let wanted = list["vhost"] != nil ? try list.bool("vhost", default: false) : (given != nil || force)
        guard wanted else {
            if let key = ["vhostfd", "vhostfds"].first(where: { list[$0] != nil }) { throw fail("\(key)= needs vhost=on, but vhost=off was given") }
            return nil
        }
        var options = VhostKernelOptions(fds: nil, origin: "\(option) \(value)")
        if let given {
            let key = list["vhostfd"] != nil ? "vhostfd" : "vhostfds"
            let fds = try NetdevSpec.parseFDs(given, option: option, value: value)
            guard fds.count == queues else {
                throw fail("\(key)=\(given) gives \(fds.count) vhost-net fd\(fds.count == 1 ? "" : "s") for netdev '\(list["id"] ?? "")', which has \(queues) queue\(queues == 1 ? "" : "s") (one per queue)")
            }
            options.fds = fds
        }
        return options
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
    /// `bus=`: the root bus (`pcie.0`, `pci.0`) or a `pcie-pci-bridge` alias's id.
    public var bus: String?
    /// Accepted for QEMU's command lines (the series' device_add passes them) with no
    /// effect here; `notes` says why, for the debug log.
    public var vectors: Int?
    public var romfile: String?
    public var disableLegacy: String?
    public var addr: String?

    /// `ioeventfd=on|off` (QEMU's spelling, default on): a datapath that takes guest
    /// notifies as eventfds gets them from KVM (KVM_IOEVENTFD) with no exit to the VMM;
    /// off: every notify exits and the VMM relays it.
    public var ioeventfd = true

    static let keys: Set<String> = ["driver", "id", "netdev", "mac", "mq", "vectors", "romfile", "addr", "bus", "local-migration", "disable-legacy", "ioeventfd"]
    static let rootBuses: Set<String> = ["pcie.0", "pci.0"]

    /// Why each property given that this machine cannot honour changes nothing.
    public func notes(msixVectors: Int) -> [String] {
        var notes: [String] = []
        if let vectors { notes.append("vectors=\(vectors) has no effect: the MSI-X table has \(msixVectors) entries and no interrupt is delivered (the guest polls)") }
        if let romfile { notes.append("romfile=\(romfile.isEmpty ? "\"\"" : romfile) has no effect: no firmware runs, so no option ROM is loaded") }
        if disableLegacy == "off" { notes.append("disable-legacy=off has no effect: the device is modern-only (virtio 1.0, no legacy I/O BAR)") }
        if let addr { notes.append("addr=\(addr) has no effect: NICs take PCI slots in order from 1") }
        if let bus, !Self.rootBuses.contains(bus) { notes.append("bus=\(bus) names a pcie-pci-bridge alias: the device sits on bus 0, the only bus") }
        return notes
    }

    public static func parse(_ value: String, option: String) throws -> DeviceSpec {
        let list = try KeyValueList(value, option: option, impliedKey: "driver")
        if list["driver"] == PCIBridgeSpec.driver {
            throw VMMConfiguration.Error("\(option) \(value): \(PCIBridgeSpec.driver) is an alias on the command line only (-device \(PCIBridgeSpec.driver),id=ID,bus=pcie.0): this machine has one PCI bus")
        }
        guard list["driver"] == "virtio-net-pci" else {
            throw VMMConfiguration.Error("\(option) \(value): unsupported device '\(list["driver"] ?? "")' (only virtio-net-pci)")
        }
        try list.checkKeys(keys, context: value)
        let netdev = try list.required("netdev", in: value)
        var spec = DeviceSpec(id: list["id"], netdev: netdev, mac: nil, multiQueue: try list.bool("mq", default: false))
        spec.localMigration = try list.bool("local-migration", default: true)
        spec.ioeventfd = try list.bool("ioeventfd", default: true)
        spec.bus = list["bus"]
        spec.romfile = list["romfile"]
        spec.addr = list["addr"]
        if let vectors = list["vectors"] {
            // QEMU's limit: PCI_MSIX_FLAGS_QSIZE + 1.
            guard let n = Int(vectors), (0...2048).contains(n) else { throw VMMConfiguration.Error("\(option) \(value): vectors=\(vectors) must be 0..2048") }
            spec.vectors = n
        }
        if let legacy = list["disable-legacy"] {
            guard ["on", "off", "auto"].contains(legacy) else {
                throw VMMConfiguration.Error("\(option) \(value): disable-legacy=\(legacy) must be on, off or auto")
            }
            spec.disableLegacy = legacy
        }
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

/// `-device pcie-pci-bridge,id=ID[,bus=pcie.0]`, as QEMU's q35 command lines (the series'
/// test) spell a bus for their NICs. A documented alias: this machine has one PCI bus and
/// adds nothing the guest could see; a device with `bus=ID` goes on bus 0.
public enum PCIBridgeSpec {
    static let driver = "pcie-pci-bridge"

    /// The bridge's id, the bus name devices may give.
    public static func parse(_ value: String, option: String) throws -> String {
        let list = try KeyValueList(value, option: option, impliedKey: "driver")
        try list.checkKeys(["driver", "id", "bus", "addr"], context: value)
        let id = try list.required("id", in: value)
        if let bus = list["bus"], !DeviceSpec.rootBuses.contains(bus) {
            throw VMMConfiguration.Error("\(option) \(value): bus=\(bus): the bridge alias sits on the root bus, use bus=pcie.0")
        }
        guard !DeviceSpec.rootBuses.contains(id) else { throw VMMConfiguration.Error("\(option) \(value): id=\(id) is the root bus's name") }
        return id
    }

    static func isBridge(_ value: String) -> Bool {
        (try? KeyValueList(value, option: "-device", impliedKey: "driver"))?["driver"] == driver
    }
}

/// `-chardev socket,id=ID,path=PATH[,reconnect=SECONDS]` (and QMP `chardev-add`'s socket
/// backend): a unix socket the VMM connects to, a vhost-user backend's. Only the client
/// side: server=on is not supported. The netdev using it connects (QEMU connects at
/// chardev creation; here a chardev nobody uses holds no socket).
public struct SocketChardev: Sendable, Equatable {
    public var id: String
    public var path: String
    /// QEMU 7.2's `reconnect`: seconds between connection attempts once the peer went
    /// away (or could not be reached at start-up); 0, the default, never reconnects.
    public var reconnect: Int

    /// The largest `reconnect` taken: a day. (QEMU takes any int64; past that the
    /// nanosecond timer would overflow, and nobody means it.)
    public static let maxReconnect = 86_400

    /// Validates what both spellings share; `context` starts each message
    /// (`-chardev socket,id=c,...` or `chardev-add`).
    public init(id: String, path: String, reconnect: Int = 0, context: String) throws {
        guard !path.isEmpty else { throw VMMConfiguration.Error("\(context): the socket path is empty") }
        guard path.utf8.count <= UnixSocket.maxPathLength else {
            throw VMMConfiguration.Error("\(context): UNIX socket path '\(path)' is too long (\(path.utf8.count) bytes, at most \(UnixSocket.maxPathLength))")
        }
        guard (0...Self.maxReconnect).contains(reconnect) else {
            throw VMMConfiguration.Error("\(context): reconnect=\(reconnect) must be 0..\(Self.maxReconnect) seconds (0: never)")
        }
        self.id = id
        self.path = path
        self.reconnect = reconnect
    }

    /// `query-chardev`'s `filename`, as QEMU's char-socket writes it.
    public func filename(connected: Bool) -> String { (connected ? "" : "disconnected:") + "unix:\(path)" }

    /// How messages name it: `chardev 'c' (unix:/run/vu.sock)`.
    public var described: String { "chardev '\(id)' (unix:\(path))" }
}

public enum SocketChardevSpec {
    static let keys: Set<String> = ["backend", "id", "path", "server", "wait", "reconnect"]

    public static func parse(_ value: String, option: String) throws -> SocketChardev {
        let list = try KeyValueList(value, option: option, impliedKey: "backend")
        guard list["backend"] == "socket" else {
            throw VMMConfiguration.Error("\(option) \(value): unsupported chardev backend '\(list["backend"] ?? "")' (only 'socket')")
        }
        try list.checkKeys(keys, context: value)
        if try list.bool("server", default: false) {
            throw VMMConfiguration.Error("\(option) \(value): server=on is not supported (the VMM connects to the backend)")
        }
        var reconnect = 0
        if let text = list["reconnect"] {
            guard let seconds = Int(text), seconds >= 0 else {
                throw VMMConfiguration.Error("\(option) \(value): reconnect=\(text) is not a number of seconds (0 or more)")
            }
            reconnect = seconds
        }
        return try SocketChardev(id: try list.required("id", in: value), path: try list.required("path", in: value),
                                 reconnect: reconnect, context: "\(option) \(value)")
    }
}
