/// Everything the command line asks for, validated, before any resource is created.
public struct VMMConfiguration: Sendable, Equatable {
    public struct MemoryBackend: Sendable, Equatable {
        public var id: String
        public var size: UInt64
        public var backing: MemoryBacking
        public var shared: Bool
    }

    public var name: String?
    public var memorySize: UInt64?
    public var memoryBackends: [MemoryBackend] = []
    public var machineMemoryBackend: String?
    public var kernel: String?
    public var append = ""
    public var startPaused = false
    public var noShutdown = false
    public var noDefaults = false
    public var serial: [ChardevSpec] = []
    public var qmp: [ChardevSpec] = []
    public var netdevs: [NetdevSpec] = []
    /// `-chardev socket,id=,path=[,reconnect=]`, by id.
    public var socketChardevs: [String: SocketChardev] = [:]
    public var devices: [DeviceSpec] = []
    /// Ids of `-device pcie-pci-bridge` aliases: bus names a NIC may give.
    public var pciBridges: [String] = []
    public var showVersion = false
    public var showHelp = false
    public var debugLog = false
    /// `-incoming unix:PATH`, `tcp:HOST:PORT`, `defer` (the main channel comes with QMP
    /// `migrate-incoming`) or a JSON channel (`{"channel-type": "main"|"cpr", "addr": ...}`);
    /// given twice for the main and the cpr channel. Nil: not a migration target.
    public var incoming: MigrationChannels?
    /// `-global migration.x-events=on`: the `events` capability before any client connects.
    public var migrationEvents = false
    /// `-accel kvm,x-halt-poll-ns=N`: see `VCPURunner.defaultHaltPollNanoseconds`.
    public var haltPollNanoseconds = VCPURunner.defaultHaltPollNanoseconds

    public static let defaultMemorySize: UInt64 = 128 << 20

    public struct Error: Swift.Error, CustomStringConvertible, Sendable, Equatable {
        public let description: String
        public init(_ description: String) { self.description = description }
    }

    public init() {}

    public static let usage = """
        usage: vmm -kernel PATH [options]
          -m SIZE                  guest RAM (default 128M; suffixes K, M, G)
          -object memory-backend-memfd,id=ID,size=SIZE[,share=on|off]
          -object memory-backend-file,id=ID,size=SIZE,mem-path=PATH[,share=on|off]
          -machine [microvm|q35,]memory-backend=ID
          -kernel PATH             PVH ELF image (ELF note "Xen" type 18)
          -append STRING           guest command line
          -serial stdio|file:PATH|unix:PATH[,server=on[,wait=off]]|none
          -qmp unix:PATH[,server=on[,wait=off]]
          -netdev tap,id=ID[,ifname=NAME][,queues=N][,vnet_hdr=on|off][,fd=N|fds=N:M:...][,cpr=on],script=no,downscript=no
                   [,vhost=on[,vhostforce=on][,vhostfd=N|vhostfds=N:M:...]]   (kernel vhost-net, /dev/vhost-net)
          -chardev socket,id=ID,path=PATH[,reconnect=SECONDS]   a vhost-user backend's socket
          -netdev vhost-user,id=ID,chardev=ID[,queues=N]
          -device virtio-net-pci,netdev=ID[,id=ID][,mac=MAC][,mq=on|off][,local-migration=on|off][,bus=BUS]
          -device pcie-pci-bridge,id=ID[,bus=pcie.0]   (alias: adds bus name ID, see docs/cli.md)
          -incoming unix:PATH|tcp:HOST:PORT|defer|'{"channel-type": "main"|"cpr", "addr": {...}}'
                                   be a migration target (twice: the main and the cpr channel)
          -global migration.x-events=on|off  MIGRATION events from the start (a target's)
          -S                       stay in 'prelaunch' until QMP 'cont'
          -no-shutdown             on guest poweroff stay in 'shutdown' instead of exiting
          -accel kvm[,x-halt-poll-ns=N]  poll device input N ns after a guest HLT (default 100000)
          -name NAME, -enable-kvm, -smp 1, -cpu host, -display none,
          -nodefaults, -no-user-config, -nographic, -d (debug log), -version, -help
        """

    /// Options with their argument count. Both `-opt` and `--opt` work, as in QEMU.
    static let options: [String: Bool] = [
        "name": true, "m": true, "kernel": true, "append": true, "serial": true, "qmp": true,
        "object": true, "machine": true, "M": true, "accel": true, "display": true, "smp": true,
        "cpu": true, "monitor": true, "netdev": true, "device": true, "incoming": true, "global": true, "chardev": true,
        "S": false, "nodefaults": false, "no-user-config": false, "no-shutdown": false,
        "enable-kvm": false, "nographic": false, "version": false, "help": false, "h": false, "d": false,
    ]

    public static func parse(_ arguments: [String]) throws -> VMMConfiguration {
        var config = VMMConfiguration()
        var nographic = false
        var index = 0
        func fail(_ message: String) -> Error { Error(message) }
        while index < arguments.count {
            let raw = arguments[index]
            index += 1
            guard raw.hasPrefix("-"), raw.count > 1 else { throw fail("unexpected argument '\(raw)'") }
            let name = String(raw.hasPrefix("--") ? raw.dropFirst(2) : raw.dropFirst(1))
            guard let takesValue = options[name] else { throw fail("\(raw): invalid option") }
            var value = ""
            if takesValue {
                guard index < arguments.count else { throw fail("\(raw): requires an argument") }
                value = arguments[index]
                index += 1
            }
            do {
                switch name {
                case "name": config.name = try KeyValueList(value, option: raw, impliedKey: "guest")["guest"]
                case "m": config.memorySize = try parseMemorySize(value, option: raw)
                case "kernel": config.kernel = value
                case "incoming":
                    var channels = config.incoming ?? MigrationChannels()
                    if value != "defer" {
                        do { try channels.add(incoming: value) } catch { throw fail("\(raw) \(value): \(error)") }
                    }
                    config.incoming = channels
                case "global":
                    // QEMU's `-global driver.property=value`; only the migration object's events.
                    let parts = value.split(separator: "=", maxSplits: 1).map(String.init)
                    guard parts.count == 2, parts[0] == "migration.x-events" else {
                        throw fail("\(raw) \(value): only migration.x-events=on|off is supported")
                    }
                    guard let on = ["on": true, "off": false][parts[1]] else {
                        throw fail("\(raw) \(value): migration.x-events takes on or off, not '\(parts[1])'")
                    }
                    config.migrationEvents = on
                case "append": config.append = value
                case "serial": config.serial.append(try ChardevSpec.parse(value, option: raw))
                case "qmp":
                    let spec = try ChardevSpec.parse(value, option: raw)
                    switch spec {
                    case .unixServer, .unixClient: config.qmp.append(spec)
                    default: throw fail("\(raw) \(value): QMP is served on unix sockets only")
                    }
                case "object": config.memoryBackends.append(try parseObject(value, option: raw))
                case "netdev": config.netdevs.append(try NetdevSpec.parse(value, option: raw))
                case "chardev":
                    let chardev = try SocketChardevSpec.parse(value, option: raw)
                    guard config.socketChardevs.updateValue(chardev, forKey: chardev.id) == nil else {
                        throw fail("\(raw) \(value): duplicate chardev id '\(chardev.id)'")
                    }
                case "device":
                    if PCIBridgeSpec.isBridge(value) {
                        config.pciBridges.append(try PCIBridgeSpec.parse(value, option: raw))
                    } else {
                        config.devices.append(try DeviceSpec.parse(value, option: raw))
                    }
                case "machine", "M": config.machineMemoryBackend = try parseMachine(value, option: raw) ?? config.machineMemoryBackend
                case "accel":
                    let accel = try KeyValueList(value, option: raw, impliedKey: "accel")
                    guard accel["accel"] == "kvm" else { throw fail("\(raw) \(value): only the kvm accelerator is supported") }
                    try accel.checkKeys(["accel", "x-halt-poll-ns"], context: value)
                    if let text = accel["x-halt-poll-ns"] {
                        guard let ns = Int64(text), (0...10_000_000).contains(ns) else {
                            throw fail("\(raw) \(value): x-halt-poll-ns=\(text) must be 0..10000000")
                        }
                        config.haltPollNanoseconds = ns
                    }
                case "display", "monitor":
                    guard value == "none" else { throw fail("\(raw) \(value): only 'none' is supported") }
                case "smp":
                    let smp = try KeyValueList(value, option: raw, impliedKey: "cpus")
                    guard smp["cpus"] == "1", smp.pairs.count == 1 else { throw fail("\(raw) \(value): only one vCPU is supported") }
                case "cpu":
                    guard value == "host" || value == "max" else { throw fail("\(raw) \(value): only 'host' and 'max' are supported") }
                case "S": config.startPaused = true
                case "nodefaults": config.noDefaults = true
                case "no-shutdown": config.noShutdown = true
                case "nographic": nographic = true
                case "version": config.showVersion = true
                case "help", "h": config.showHelp = true
                case "d": config.debugLog = true
                default: break  // -no-user-config, -enable-kvm: nothing to do.
                }
            } catch let error as KeyValueList.ParseError {
                throw fail(error.description)
            }
        }
        if config.serial.isEmpty && (!config.noDefaults || nographic) { config.serial = [.stdio] }
        try config.validate()
        return config
    }

    static func parseMemorySize(_ value: String, option: String) throws -> UInt64 {
        let list = try KeyValueList(value, option: option, impliedKey: "size")
        try list.checkKeys(["size"], context: value)
        guard let size = try list.size("size", defaultUnit: 1 << 20), size > 0 else {
            throw Error("\(option) \(value): missing memory size")
        }
        return size
    }

    static func parseObject(_ value: String, option: String) throws -> MemoryBackend {
        let list = try KeyValueList(value, option: option, impliedKey: "qom-type")
        let type = list["qom-type"] ?? ""
        let id = try list.required("id", in: value)
        guard let size = try list.size("size") else { throw Error("\(option) \(value): parameter 'size' is missing") }
        switch type {
        case "memory-backend-memfd", "memory-backend-ram":
            try list.checkKeys(["qom-type", "id", "size", "share"], context: value)
            return MemoryBackend(id: id, size: size, backing: .memfd, shared: try list.bool("share", default: type == "memory-backend-memfd"))
        case "memory-backend-file":
            try list.checkKeys(["qom-type", "id", "size", "share", "mem-path"], context: value)
            let path = try list.required("mem-path", in: value)
            return MemoryBackend(id: id, size: size, backing: .file(path: path), shared: try list.bool("share", default: false))
        default:
            throw Error("\(option) \(value): unsupported object type '\(type)' (memory-backend-memfd, memory-backend-file, memory-backend-ram)")
        }
    }

    /// Returns the `memory-backend` property, if any.
    static func parseMachine(_ value: String, option: String) throws -> String? {
        let list = try KeyValueList(value, option: option, impliedKey: "type")
        try list.checkKeys(["type", "memory-backend", "accel"], context: value)
        // q35 is an alias of the one machine, so that QEMU's command lines run (docs/cli.md).
        if let type = list["type"], !["microvm", "none", "swiftvmm", "q35"].contains(type) {
            throw Error("\(option) \(value): unsupported machine type '\(type)' (this VMM provides one machine, 'microvm'; 'q35' is accepted as an alias of it)")
        }
        if let accel = list["accel"], accel != "kvm" { throw Error("\(option) \(value): only accel=kvm is supported") }
        return list["memory-backend"]
    }

    func validate() throws {
        var seen = Set<String>()
        for backend in memoryBackends where !seen.insert(backend.id).inserted {
            throw Error("-object: duplicate id '\(backend.id)'")
        }
        if !showHelp && !showVersion && kernel == nil { throw Error("-kernel: a guest kernel is required") }
        var netdevIDs = Set<String>()
        for netdev in netdevs where !netdevIDs.insert(netdev.id).inserted {
            throw Error("-netdev: duplicate id '\(netdev.id)'")
        }
        var used = Set<String>()
        for device in devices {
            guard netdevIDs.contains(device.netdev) else { throw Error("-device virtio-net-pci: netdev '\(device.netdev)' not found") }
            guard used.insert(device.netdev).inserted else { throw Error("-device virtio-net-pci: netdev '\(device.netdev)' is already used by another device") }
            if let bus = device.bus, !DeviceSpec.rootBuses.contains(bus), !pciBridges.contains(bus) {
                throw Error("-device virtio-net-pci: Bus '\(bus)' not found (the root bus is pcie.0; -device pcie-pci-bridge,id=\(bus),bus=pcie.0 adds that name)")
            }
        }
        _ = try resolvedMemory()
    }

    /// The RAM the machine gets: the backend named by `-machine memory-backend=`, else `-m` on a private memfd.
    public func resolvedMemory() throws -> (size: UInt64, backing: MemoryBacking, shared: Bool) {
        guard let id = machineMemoryBackend else {
            // Shared like QEMU's memory-backend-memfd: pre-copy then finds untouched pages as holes.
            return (memorySize ?? Self.defaultMemorySize, .memfd, true)
        }
        guard let backend = memoryBackends.first(where: { $0.id == id }) else {
            throw Error("-machine memory-backend=\(id): no -object with id '\(id)'")
        }
        if let memorySize, memorySize != backend.size {
            throw Error("-machine memory-backend=\(id): backend size \(backend.size) must equal -m \(memorySize)")
        }
        return (backend.size, backend.backing, backend.shared)
    }
}
