import Testing

/// The addresses, names and NIC of a guest on a TAP in a test's namespace, as the QEMU
/// series' test sets it up: the host at 192.168.100.1/24 on `tap0`, the guest at
/// 192.168.100.2/24 on a multi-queue virtio-net NIC. Every value can be changed.
public struct GuestNetwork: Sendable, Equatable {
    /// The host side's TAP (created multi-queue, with `queues` queues).
    public var tap: String
    /// Queue pairs of the TAP and the NIC (`queues=`, `mq=on` when more than one).
    public var queues: Int
    public var hostAddress: String
    public var guestAddress: String
    public var prefixLength: Int
    /// The TAP's MAC. Fixed, so that moving the host address to another TAP with the same
    /// MAC (normal migration) keeps the guest's ARP entry valid.
    public var hostMAC: String
    public var guestMAC: String
    /// `-netdev ...,id=` and `-device ...,id=`.
    public var netdevID: String
    public var deviceID: String
    /// What moves the frames (`Datapath`); the NIC's `-netdev` follows it.
    public var datapath: Datapath

    public init(
        tap: String = "tap0", queues: Int = 1, hostAddress: String = "192.168.100.1", guestAddress: String = "192.168.100.2",
        prefixLength: Int = 24, hostMAC: String = "e6:1d:44:b5:03:5d", guestMAC: String = "52:54:00:12:34:56",
        netdevID: String = "n0", deviceID: String = "nic0", datapath: Datapath = .userspace
    ) {
        self.tap = tap
        self.queues = queues
        self.hostAddress = hostAddress
        self.guestAddress = guestAddress
        self.prefixLength = prefixLength
        self.hostMAC = hostMAC
        self.guestMAC = guestMAC
        self.netdevID = netdevID
        self.deviceID = deviceID
        self.datapath = datapath
    }

    /// `192.168.100.1/24`.
    public var hostCIDR: String { "\(hostAddress)/\(prefixLength)" }
    /// `192.168.100.2/24`.
    public var guestCIDR: String { "\(guestAddress)/\(prefixLength)" }

    /// The NIC's `-netdev` (and `-chardev`) on the TAP named `ifname` (default: `tap`), and the
    /// matching `-device`. `vhostUserSocket`: the backend's socket (`.vhostUser`; see
    /// `startBackend`). `cpr`: `cpr=on`, so a cpr-transfer hands the netdev's host side
    /// (TAP queues, vhost fds) to the next VMM.
    public func arguments(ifname: String? = nil, vhostUserSocket: String? = nil, cpr: Bool = false) -> [String] {
        let tapOptions = "id=\(netdevID),ifname=\(ifname ?? tap),queues=\(queues),script=no,downscript=no"
        let cprOption = cpr ? ",cpr=on" : ""
        switch datapath {
        case .userspace:
            return ["-netdev", "tap,\(tapOptions)\(cprOption)"] + deviceArguments
        case .vhostKernel:
            return ["-netdev", "tap,\(tapOptions),vhost=on\(cprOption)"] + deviceArguments
        case .vhostUser:
            return ["-chardev", "socket,id=\(chardevID),path=\(vhostUserSocket ?? "<no vhost-user socket>")",
                    "-netdev", "vhost-user,id=\(netdevID),chardev=\(chardevID),queues=\(queues)\(cprOption)"] + deviceArguments
        }
    }

    /// `-chardev socket,id=` of a `.vhostUser` NIC.
    public var chardevID: String { "chr-\(netdevID)" }

    /// A migration target's NIC whose host side arrives with the stream (local migration):
    /// the TAP queues, or the vhost-user backend's connection.
    public var incomingArguments: [String] {
        switch datapath {
        case .userspace:
            return ["-netdev", "tap,id=\(netdevID),incoming-fds=on,queues=\(queues),script=no,downscript=no"] + deviceArguments
        case .vhostKernel:
            return ["-netdev", "tap,id=\(netdevID),incoming-fds=on,queues=\(queues),script=no,downscript=no,vhost=on"] + deviceArguments
        case .vhostUser:
            return ["-netdev", "vhost-user,id=\(netdevID),queues=\(queues),incoming-fds=on"] + deviceArguments
        }
    }

    /// Starts what the datapath needs beside the VMM in `namespace`: for `.vhostUser`, the
    /// bundled backend on `tap` (its log in `artifacts`, stopped when `artifacts` ends, after
    /// the machines launched later), returning its socket for `arguments(vhostUserSocket:)`.
    /// nil for the others. Cancels the test case when this host cannot run the datapath.
    public func startBackend(in namespace: NetworkNamespace, artifacts: ArtifactDirectory) async throws -> String? {
        try await startBackendProcess(in: namespace, artifacts: artifacts)?.socketPath
    }

    /// `startBackend`, returning the backend itself (its pid and log, for tests that
    /// check who talked to it).
    public func startBackendProcess(in namespace: NetworkNamespace, artifacts: ArtifactDirectory) async throws -> VhostUserBackendProcess? {
        try datapath.requireAvailable()
        guard datapath == .vhostUser else { return nil }
        let backend = try await VhostUserBackendProcess.start(tap: tap, queues: queues, in: namespace, logDirectory: artifacts.path)
        artifacts.addCleanup { backend.stop() }
        return backend
    }

    public var deviceArguments: [String] {
        ["-device", "virtio-net-pci,netdev=\(netdevID),id=\(deviceID),mac=\(guestMAC),mq=\(queues > 1 ? "on" : "off")"]
    }

    /// Creates `name` (default: `tap`) with `queues` queues in `namespace`; with `address`,
    /// gives it the host MAC and address. The link is brought up.
    public func createTap(in namespace: NetworkNamespace, name: String? = nil, address: Bool = true) async throws {
        let name = name ?? tap
        _ = try await namespace.createTap(name, queues: queues, multiQueue: true)
        let (mac, cidr) = (hostMAC, hostCIDR)
        try await namespace.withRoute { route in
            if address {
                try route.setMAC(mac, of: name)
                try route.addAddress(cidr, to: name)
            }
            try route.setLink(name, up: true)
        }
    }
}

/// A booted bundled guest with its NIC configured, in a namespace of its own.
public struct NetworkedGuest: Sendable {
    public let machine: Machine
    public let namespace: NetworkNamespace
    public let network: GuestNetwork

    /// A pinger from the host side to the guest; `start()` it.
    public func pinger(interval: Duration = .milliseconds(10), count: Int? = nil) throws -> Pinger {
        try Pinger(namespace: namespace, destination: network.guestAddress, interval: interval, count: count)
    }
}

extension NetworkedGuest {
    /// Creates a namespace with `network.tap` (host address and MAC, up), boots the bundled
    /// guest there with a NIC on it, configures the guest's `eth0`, runs `body`, and shuts
    /// everything down; the machine's artifacts are kept when `body` throws.
    ///
    /// ```swift
    /// try await NetworkedGuest.with(GuestNetwork(queues: 4)) { guest in
    ///     let pinger = try guest.pinger(interval: .milliseconds(2), count: 500)
    ///     try pinger.start()
    ///     #expect(await pinger.finish(timeout: .seconds(30)).lost == 0)
    /// }
    /// ```
    public static func with<T>(
        _ network: GuestNetwork = GuestNetwork(),
        options: MachineOptions = .bundledGuest(),
        isolation: isolated (any Actor)? = #isolation,
        sourceLocation: SourceLocation = #_sourceLocation,
        _ body: (NetworkedGuest) async throws -> T
    ) async throws -> T {
        try network.datapath.requireAvailable(sourceLocation: sourceLocation)
        return try await NetworkNamespace.with { namespace in
            try await network.createTap(in: namespace)
            return try await withArtifacts(sourceLocation: sourceLocation) { artifacts in
                let socket = try await network.startBackend(in: namespace, artifacts: artifacts)
                var options = options
                options.namespace = namespace
                options.arguments = network.arguments(vhostUserSocket: socket) + options.arguments
                let machine = try await Machine.launch(options, in: artifacts)
                try await machine.console.waitForPrompt(timeout: .seconds(20))
                try await machine.guest.configureNetwork(address: network.guestCIDR)
                return try await body(NetworkedGuest(machine: machine, namespace: namespace, network: network))
            }
        }
    }
}

extension MachineOptions {
    /// The bundled VMM (or `$TESTKIT_VMM`) booting the bundled guest with `memory` of RAM.
    public static func bundledGuest(
        memory: String = "64M", startPaused: Bool = false, arguments: [String] = [], connectQMP: Bool = true, name: String? = nil
    ) -> MachineOptions {
        MachineOptions(name: name, kernel: BundledGuest.image, memory: memory, startPaused: startPaused, connectQMP: connectQMP,
                       arguments: arguments)
    }
}
