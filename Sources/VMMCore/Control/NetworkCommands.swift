import CLinux
import Glibc
import QMPWire

/// Network devices: creation from the command line and from QMP (`getfd`, `closefd`,
/// `netdev_add`, `netdev_del`, `device_add` before the guest starts or the migration arrives), and `query-pci`.
extension Machine {
    func addNetdev(_ spec: NetdevSpec) throws {
        guard netdevs[spec.id] == nil else { throw QMPCommandError("Duplicate ID '\(spec.id)' for netdev") }
        if let vhost = spec.vhost {
            try addVhostKernelNetdev(spec, vhost)
            return
        }
        if spec.incomingFDs {
            // The seed's wording: such a netdev only makes sense on a migration target.
            guard runState == .inmigrate else { throw QMPCommandError("Peers wait for incoming, but it's not an incoming migration.") }
            netdevs[spec.id] = spec.vhostUser ? VhostUserNetdev(id: spec.id, incomingQueues: spec.queues, loop: loop, logger: logger)
                                              : TapBackend(id: spec.id, incomingQueues: spec.queues)
            return
        }
        if let chardevID = spec.vhostUserChardev {
            guard let chardev = chardevs[chardevID] else {
                throw QMPCommandError("netdev \(spec.id): chardev '\(chardevID)' not found (add it with -chardev socket,id=\(chardevID),path=PATH or chardev-add)")
            }
            if let user = chardevUsers[chardevID] {
                throw QMPCommandError("netdev \(spec.id): chardev '\(chardevID)' is already used by netdev '\(user)'")
            }
            if spec.cpr, let incoming = migration.incoming, incoming.cprState != nil {
                netdevs[spec.id] = try cprVhostUser(spec, chardev: chardev, from: incoming)
            } else {
                let netdev = try VhostUserNetdev(id: spec.id, chardev: chardev, queues: spec.queues, loop: loop, logger: logger)
                netdev.cpr = spec.cpr
                netdevs[spec.id] = netdev
            }
            chardevUsers[chardevID] = spec.id
            return
        }
        let backend: TapBackend
        if spec.cpr, let incoming = migration.incoming, incoming.cprState != nil {
            backend = try cprTap(spec, from: incoming)
        } else if let fds = spec.fds {
            // The backend owns copies; the originals stay with whoever passed them.
            backend = try TapBackend(id: spec.id, adopting: try fds.enumerated().map { index, fd in
                try FileDescriptor.duplicating(inherited: fd, label: TapBackend.queueLabel(spec.id, index))
            }, vnetHeader: spec.vnetHeader)
        } else {
            backend = try TapBackend(id: spec.id, ifname: spec.ifname, queues: spec.queues, vnetHeader: spec.vnetHeader)
        }
        backend.cpr = spec.cpr
        netdevs[spec.id] = backend
        logger.debug("netdev \(spec.id): TAP \(netdevs[spec.id]!.ifname), \(netdevs[spec.id]!.queueFDs.count) queue(s)")
    }

    /// A cpr-transfer target's `cpr=on` vhost-user netdev: the source's backend connection
    /// from the cpr state by the netdev's id, adopted as a local migration's target adopts
    /// it (silently; the handshake without SET_OWNER when the rings first run), so the
    /// backend never sees a second front-end; `chardev` stays for reconnects.
    private func cprVhostUser(_ spec: NetdevSpec, chardev: SocketChardev, from incoming: IncomingMigration) throws -> VhostUserNetdev {
        let (pairs, fd) = try VhostUserNetdev.claimCPRConnection(id: spec.id, queues: spec.queues, from: incoming)
        let netdev = VhostUserNetdev(id: spec.id, incomingQueues: pairs, chardev: chardev, loop: loop, logger: logger)
        try netdev.adoptIncoming([fd], vnetHeader: true)
        netdev.cpr = true
        logger.info("netdev \(spec.id): took over the vhost-user connection (\(pairs) queue pair(s)) from the cpr state")
        return netdev
    }

    /// A cpr-transfer target's `cpr=on` TAP: the source's queues, from the cpr state by the
    /// netdev's id (no fd=, fds= or incoming-fds needed); what the options say must agree.
    private func cprTap(_ spec: NetdevSpec, from incoming: IncomingMigration) throws -> TapBackend {
        let (entry, fds) = try incoming.claimCPRNetdev(spec.id)
        let backend = try TapBackend(id: spec.id, adopting: fds, vnetHeader: entry.vnetHeader)
        if let ifname = spec.ifname, ifname != backend.ifname {
            throw QMPCommandError("netdev \(spec.id): ifname=\(ifname), but the TAP handed over by the cpr state is '\(backend.ifname)'")
        }
        if spec.queues != 1 && spec.queues != backend.queueCount {
            throw QMPCommandError("netdev \(spec.id): queues=\(spec.queues), but the cpr state hands over \(backend.queueCount) TAP queue(s)")
        }
        logger.info("netdev \(spec.id): took over TAP \(backend.ifname) (\(backend.queueCount) queue(s)) from the cpr state")
        return backend
    }

    func addNIC(_ spec: DeviceSpec) throws {
        guard let backend = netdevs[spec.netdev] else { throw QMPCommandError("Property 'netdev' can't find value '\(spec.netdev)'") }
        guard netdevUsers[spec.netdev] == nil else {
            throw QMPCommandError("Property 'netdev' can't take value '\(spec.netdev)', it's in use")
        }
        let nicCount = netdevUsers.count
        let id = spec.id ?? "net\(nicCount)"
        guard !devices.contains(where: { $0.id == id }) else { throw QMPCommandError("Duplicate device ID '\(id)'") }
        if let bus = spec.bus, !DeviceSpec.rootBuses.contains(bus), !config.pciBridges.contains(bus) {
            throw QMPCommandError("Bus '\(bus)' not found")
        }
        let mac = spec.mac ?? [0x52, 0x54, 0x00, 0x12, 0x34, UInt8(truncatingIfNeeded: 0x56 + nicCount)]
        let datapath = try backend.makeDatapath(pairs: VirtioNet.queuePairs(multiQueue: spec.multiQueue, netdev: backend),
                                                memory: memory, memoryBackend: config.machineMemoryBackend)
        let nic = VirtioNet(id: id, mac: mac, datapath: datapath, multiQueue: spec.multiQueue, logger: logger)
        nic.localMigration = spec.localMigration
        nic.host = DeviceHost(loop: loop, wakeGuest: { [vcpuRunner] in vcpuRunner.wake() },
                              setHaltWakeSources: { [vcpuRunner] in vcpuRunner.setHaltWakeSources(owner: $0, $1) })
        // Doorbells for a datapath that takes notifies as eventfds: KVM signals them with no
        // exit, any write size where KVM allows it (QEMU's modern notify region does the same).
        let ioeventfds = spec.ioeventfd && hypervisor.checkExtension(CL_KVM_CAP_IOEVENTFD) > 0
            ? (host: vm as any IOEventFDHost, length: UInt32(hypervisor.checkExtension(CL_KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0 ? 0 : 2))
            : nil
        let transport = VirtioPCITransport(name: id, model: nic, memory: memory, logger: logger, ioeventfds: ioeventfds)
        try pciBus.plug(transport)
        devices.append(transport)
        netdevUsers[spec.netdev] = id
        for note in spec.notes(msixVectors: transport.msixVectors) { logger.debug("\(id): \(note)") }
    }

    /// `-netdev tap,...,vhost=on`: the TAP exactly as without vhost (opened, passed in,
    /// awaiting a migration's queues, or taken from a cpr state), wrapped with its vhost
    /// devices (`VhostKernelNetdev.devices`: a `cpr=on` netdev's come from the cpr state too). The devices are
    /// opened first, so failing there creates no TAP; every error names the option. Never
    /// a fallback to the userspace datapath.
    private func addVhostKernelNetdev(_ spec: NetdevSpec, _ vhost: VhostKernelOptions) throws {
        do {
            let cpr = spec.cpr ? migration.incoming.flatMap { $0.cprState != nil ? $0 : nil } : nil
            let devices = try VhostKernelNetdev.devices(id: spec.id, queues: spec.queues, cpr: cpr, inherited: vhost.fds)
            var tapOnly = spec
            tapOnly.vhost = nil
            try addNetdev(tapOnly)
            guard let tap = netdevs.removeValue(forKey: spec.id) else { return }
            netdevs[spec.id] = try VhostKernelNetdev(id: spec.id, tap: tap, devices: devices, logger: logger)
        } catch let error as QMPCommandError {
            throw error  // the TAP's own refusals, in their (the seed's) words
        } catch {
            throw QMPCommandError("\(vhost.origin): \(error)")
        }
        logger.debug("netdev \(spec.id): on vhost-net, \(spec.queues) queue pair(s)")
    }

    /// QMP arguments as a QEMU option string, so QMP and the command line share one parser.
    /// Named fds (from `getfd`) are replaced by their numbers.
    func optionString(_ leading: String, _ args: JSONObject, skip: Set<String>, resolveFDs: Bool) throws -> (String, [String]) {
        var parts = [leading]
        var claimed: [String] = []
        for (key, value) in args.pairs where !skip.contains(key) {
            var text: String
            switch value {
            case .string(let s): text = s
            case .bool(let b): text = b ? "on" : "off"
            case .int(let i): text = String(i)
            default: throw QMPCommandError("Invalid parameter type for '\(key)', expected: string")
            }
            if resolveFDs && ["fd", "fds", "vhostfd", "vhostfds"].contains(key) {
                text = try text.split(separator: ":").map { name -> String in
                    if Int32(name) != nil { return String(name) }
                    guard let fd = namedFDs[String(name)] else { throw QMPCommandError("File descriptor named '\(name)' has not been found") }
                    claimed.append(String(name))
                    // The number is valid while namedFDs holds the fd: until the command ran.
                    return fd.withRaw { String($0) }
                }.joined(separator: ":")
            }
            parts.append("\(key)=\(text.split(separator: ",", omittingEmptySubsequences: false).joined(separator: ",,"))")
        }
        return (parts.joined(separator: ","), claimed)
    }

    /// QAPI's types for `netdev_add` arguments (NetdevTapOptions, NetdevVhostUserOptions); every other key is a string.
    static let netdevArgumentTypes: [String: QMPDispatcher.ArgumentType] = [
        "queues": .uint32, "poll-us": .uint32, "sndbuf": .size,
        "vnet_hdr": .boolean, "vhost": .boolean, "vhostforce": .boolean, "incoming-fds": .boolean, "cpr": .boolean,
    ]

    func registerNetworkCommands() {
        let d = dispatcher
        d.register("getfd", arguments: ["fdname": .string], required: ["fdname"]) { [unowned self] args, context in
            guard let fd = context.takeFD() else { throw QMPCommandError("No file descriptor supplied via SCM_RIGHTS") }
            let name = args["fdname"]!.stringValue!
            // QEMU's rule (qmp_getfd): a name must not start with a digit, so it can never look like an fd number.
            guard !(name.utf8.first.map { (UInt8(ascii: "0")...UInt8(ascii: "9")).contains($0) } ?? false) else {
                throw QMPCommandError("Parameter 'fdname' expects a name not starting with a digit")
            }
            namedFDs[name] = fd.take(label: "getfd '\(name)'")
            return [:]
        }
        d.register("closefd", arguments: ["fdname": .string], required: ["fdname"]) { [unowned self] args in
            let name = args["fdname"]!.stringValue!
            guard namedFDs.removeValue(forKey: name) != nil else { throw QMPCommandError("File descriptor named '\(name)' not found") }
            return [:]
        }
        let netdevArgs = Dictionary(uniqueKeysWithValues: NetdevSpec.keys.union(NetdevSpec.vhostUserKeys).map { ($0, Self.netdevArgumentTypes[$0] ?? .string) })
        d.register("netdev_add", arguments: netdevArgs, required: ["type", "id"]) { [unowned self] args in
            let (text, claimed) = try optionString(args["type"]?.stringValue ?? "", args, skip: ["type"], resolveFDs: true)
            // Parse errors become GenericError replies in the dispatcher, with their text.
            try addNetdev(try NetdevSpec.parse(text, option: "netdev_add"))
            for name in claimed { namedFDs.removeValue(forKey: name) }
            return [:]
        }
        d.register("netdev_del", arguments: ["id": .string], required: ["id"]) { [unowned self] args in
            let id = args["id"]!.stringValue!
            guard netdevs[id] != nil else { throw QMPCommandError("Device '\(id)' not found") }
            guard netdevUsers[id] == nil else { throw QMPCommandError("Device '\(id)' is in use by a NIC") }
            netdevs.removeValue(forKey: id)?.shutdown()
            chardevUsers = chardevUsers.filter { $0.value != id }
            return [:]
        }
        let deviceArgs = Dictionary(uniqueKeysWithValues: DeviceSpec.keys.map { ($0, QMPDispatcher.ArgumentType.any) })
        d.register("device_add", arguments: deviceArgs, required: ["driver"]) { [unowned self] args in
            // A migration target gets its devices before the stream arrives, as in the seed's test.
            guard runState == .prelaunch || (runState == .inmigrate && !migration.isActive) else {
                throw QMPCommandError("device_add is only supported before the guest starts (-S, state 'prelaunch', or 'inmigrate' before the migration begins); there is no hotplug yet")
            }
            let (text, _) = try optionString(args["driver"]?.stringValue ?? "", args, skip: ["driver"], resolveFDs: false)
            try addNIC(try DeviceSpec.parse(text, option: "device_add"))
            if runState != .inmigrate { try devices[devices.count - 1].resume() }
            return [:]
        }
        d.register("query-pci") { [unowned self] _ in
            let entries: [JSON] = pciBus.devices.map { slot, device in
                let config = device.configSpace
                var regions: [JSON] = []
                for index in 0..<6 {
                    guard let bar = config.bars[index] else { continue }
                    regions.append([
                        "bar": .int(Int64(index)), "type": bar.isIO ? "io" : "memory",
                        "address": .int(Int64(bitPattern: config.barAddress(index) ?? 0)), "size": .int(Int64(bar.size)),
                        "prefetch": false, "mem_type_64": .bool(bar.is64Bit),
                    ])
                }
                let classCode = config.read(offset: 0x0A, size: 2)
                var entry: JSONObject = [
                    "bus": 0, "slot": .int(Int64(slot)), "function": 0,
                    "class_info": ["class": .int(Int64(classCode))],
                    "id": [
                        "vendor": .int(Int64(config.read(offset: 0, size: 2))), "device": .int(Int64(config.read(offset: 2, size: 2))),
                        "subsystem-vendor": .int(Int64(config.read(offset: 0x2C, size: 2))), "subsystem": .int(Int64(config.read(offset: 0x2E, size: 2))),
                    ],
                    "qdev_id": .string(device.name),
                    "regions": .array(regions),
                ]
                let info = self.devices.first(where: { $0.id == device.name })?.queryInfo ?? [:]
                for (key, value) in info.pairs { entry[key] = value }
                return .object(entry)
            }
            return [["bus": 0, "devices": .array(entries)]]
        }
    }
}
