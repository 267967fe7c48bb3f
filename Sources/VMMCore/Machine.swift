import CLinux
import Glibc
import Logging
import QMPWire

/// Run states, named and reported as QEMU's `query-status` does.
public enum RunState: String, Sendable {
    case prelaunch
    case running
    case paused
    case shutdown
    case internalError = "internal-error"
    case inmigrate
    case finishMigrate = "finish-migrate"
    case postmigrate
}

/// Composes KVM, guest RAM, the boot image, devices, the console and QMP into one
/// machine, and owns its run state. Everything except the vCPU thread runs on `loop`.
public final class Machine: @unchecked Sendable {
    public static let version = (major: Int64(0), minor: Int64(1), micro: Int64(0))
    public static let packageName = "swift-vmm 0.1.0"
    /// Guest addresses just below 4 GiB that Intel VMX needs for its TSS; never RAM here.
    static let tssAddress: UInt64 = 0xFFFB_D000

    public let config: VMMConfiguration
    public let logger: Logger
    let loop: EventLoop
    let hypervisor: Hypervisor
    let vm: VirtualMachine
    public let memory: GuestMemory
    let serial: Serial16550
    let serialBackends: [SerialBackend]
    let vcpuRunner: VCPURunner
    let pciBus: PCIBus
    var netdevs: [String: NetBackend] = [:]
    /// Every device in plug order (serial0, pci0, then PCI functions): the machine and
    /// the migration code reach devices only through this list.
    var devices: [any MachineDevice] = []
    /// Netdev id → the id of the device using it.
    var netdevUsers: [String: String] = [:]
    /// Socket chardevs (`-chardev`, `chardev-add`) by id, and the netdev using each.
    var chardevs: [String: SocketChardev] = [:]
    var chardevUsers: [String: String] = [:]
    /// fds named by QMP `getfd`, owned here until a netdev claims them.
    var namedFDs: [String: FileDescriptor] = [:]
    let dispatcher = QMPDispatcher()
    let qmp: QMPServer
    /// Created first, before any thread or endpoint, so every wait can watch it.
    let signals: TerminationSignals

    var runState: RunState
    let migration = MigrationState()

    public init(config: VMMConfiguration, logger: Logger) throws {
        self.config = config
        self.logger = logger
        signals = try TerminationSignals()
        loop = try EventLoop()

        let ram = try config.resolvedMemory()
        hypervisor = try Hypervisor()
        vm = try hypervisor.createVM()
        try vm.setTSSAddress(Self.tssAddress)
        do {
            memory = try GuestMemory(size: ram.size, backing: ram.backing, shared: ram.shared)
        } catch let error as GuestMemoryError {
            let units: [(shift: UInt64, suffix: String)] = [(40, "T"), (30, "G"), (20, "M")]
            let size = units.first { ram.size % (1 << $0.shift) == 0 }.map { unit in
                String(ram.size >> unit.shift) + unit.suffix
            } ?? String(ram.size)
            let option = config.machineMemoryBackend.map { "-object memory-backend id=\($0) size=\(size)" } ?? "-m \(size)"
            throw VMMConfiguration.Error("\(option): cannot set up guest memory: \(error)")
        }
        for (slot, region) in memory.regions.enumerated() {
            try vm.setMemoryRegion(slot: UInt32(slot), guestAddress: region.guestAddress, size: region.size,
                                   host: memory.hostAddress(of: region))
        }

        let backends = try config.serial.map { try SerialBackend(spec: $0, logger: logger) }
        serialBackends = backends
        let loop = self.loop
        serial = Serial16550(
            output: { byte in for backend in backends { backend.write(byte) } },
            onInputDrained: { loop.poke() })

        let vcpu = try vm.createVCPU(id: 0)
        try vcpu.setCPUID(try Self.guestCPUID(hypervisor: hypervisor, vcpu: vcpu))
        // An incoming machine gets RAM and registers from the stream; its RAM must stay
        // zero where the source's is (zero pages are not sent).
        if config.incoming == nil { try Self.loadKernel(config: config, memory: memory, vcpu: vcpu) }

        pciBus = try PCIBus()

        // The debug-exit device needs the runner and the runner needs the bus: tie them through a box.
        let exitHandler = GuestExitHandler()
        let bus = try IOBus([
            .init(base: Serial16550.com1, count: 8, device: serial),
            .init(base: DebugExit.port, count: 1, device: DebugExit { exitHandler.handle($0) }),
            .init(base: PCIBus.configAddressPort, count: 8, device: pciBus),
        ])
        vcpuRunner = VCPURunner(vcpu: vcpu, bus: bus, pci: pciBus, haltPollNanoseconds: config.haltPollNanoseconds, logger: logger) { message in
            loop.post { exitHandler.machine?.vcpuFailed(message) }
        }
        qmp = QMPServer(loop: loop, dispatcher: dispatcher,
                        greeting: QMPMessage.greeting(major: Self.version.major, minor: Self.version.minor,
                                                      micro: Self.version.micro, package: Self.packageName),
                        logger: logger)
        runState = config.incoming != nil ? .inmigrate : (config.startPaused ? .prelaunch : .running)
        exitHandler.machine = self
        exitHandler.loop = loop
        devices = [serial, pciBus]
        chardevs = config.socketChardevs
        // cpr-transfer: the netdevs take their fds from the cpr state, which `start` reads first.
        if config.incoming?.cpr == nil { try addConfiguredNICs() }
        registerCommands()
        registerNetworkCommands()
        registerChardevCommands()
        registerMigrationCommands()
        migration.capabilities["events"] = config.migrationEvents
    }

    static func loadKernel(config: VMMConfiguration, memory: GuestMemory, vcpu: VCPU) throws {
        guard let path = config.kernel else { throw VMMConfiguration.Error("-kernel: a guest kernel is required") }
        let entry: UInt32
        do {
            let image = try ELFImage(contentsOf: path, maxSize: memory.size)
            entry = try PVHBoot.load(image, into: memory, commandLine: config.append, flags: PVHBoot.flagHaltWakes)
        } catch {
            throw VMMConfiguration.Error("-kernel \(path): \(error)")
        }
        let (regs, setSegments) = PVHBoot.initialRegisters(entry: entry)
        var sregs = try vcpu.getSpecialRegisters()
        setSegments(&sregs)
        try vcpu.setSpecialRegisters(sregs)
        try vcpu.setRegisters(regs)
    }

    /// KVM's CPUID plus the TSC frequency in the hypervisor timing leaf (0x40000010, as
    /// VMware and QEMU define it), so a guest without a timer device can measure time.
    static func guestCPUID(hypervisor: Hypervisor, vcpu: VCPU) throws -> CPUIDTable {
        let table = try hypervisor.supportedCPUID()
        let khz = cl_ioctl_val(vcpu.fd, CL_KVM_GET_TSC_KHZ, 0)
        guard khz > 0 else { return table }
        return table.adding(leaf: 0x4000_0010, eax: UInt32(khz), raisingMaxOf: 0x4000_0000)
    }

    /// Opens the endpoints, starts the guest and runs until `quit`, a guest exit or a
    /// termination signal; returns the exit status. A start-up failure throws, after
    /// cleaning up, so that `vmm` reports it in its one-line form.
    public func run() throws -> Int32 {
        do {
            try start()
        } catch let signal as TerminationRequested {
            // A signal while waiting for a first client (`wait=on`) ends the VMM as one later would.
            logger.info("\(signal)")
            cleanUp()
            return 0
        } catch {
            cleanUp()
            throw error
        }
        let status = loop.run()
        cleanUp()
        return status
    }

    private func addConfiguredNICs() throws {
        for netdev in config.netdevs { try addNetdev(netdev) }
        for device in config.devices { try addNIC(device) }
    }

    private func start() throws {
        installSignalHandling()
        // The vCPU thread waits (paused) for the run state; it needs nothing the cpr state
        // brings, so a cpr-transfer target starts it before its downtime.
        try vcpuRunner.start()
        // cpr-transfer, as QEMU's cpr_state_load: the RAM and the `cpr=on` netdevs' fds
        // come before any netdev, device or monitor exists.
        if let cpr = config.incoming?.cpr {
            if let main = config.incoming?.main {
                do {
                    try listenEarly(main)
                } catch {
                    throw VMMConfiguration.Error("-incoming \(main): \(error)")
                }
            }
            do {
                try receiveCPRState(cpr)
            } catch let error as VMMConfiguration.Error {
                throw error
            } catch let signal as TerminationRequested {
                throw signal
            } catch {
                throw VMMConfiguration.Error("-incoming cpr channel \(cpr): \(error)")
            }
            try addConfiguredNICs()
            migration.mark("devices built")
        }
        // The cpr channel, if any, was read above; the main one may wait for migrate-incoming.
        // Before the monitor opens: a cpr-transfer source's main stream waits already, and
        // loads on its own thread while the rest starts up.
        if let main = config.incoming?.main {
            do {
                try startIncoming(MigrationChannels(main: main))
            } catch {
                throw VMMConfiguration.Error("-incoming \(main): \(error)")
            }
        }
        for backend in serialBackends { try backend.waitForFirstClient(signals) }
        try qmp.open(config.qmp, signals: signals)
        for backend in serialBackends {
            backend.attach(to: loop, wantsInput: { [serial] in serial.inputSpace > 0 }) { [serial, vcpuRunner] bytes in
                let accepted = serial.enqueueInput(bytes)
                vcpuRunner.wake()
                return accepted
            }
        }
        // A migration target's devices stay paused until `cont`: it must not take frames
        // from a TAP before it has the state they belong after.
        if runState != .inmigrate { resumeDevices() }
        if runState == .running { vcpuRunner.resume() }
    }

    private func cleanUp() {
        vcpuRunner.terminate()
        qmp.close()
        for backend in serialBackends { backend.close() }
        closeIncomingListeners()
        for device in devices { device.shutdown() }
        for netdev in netdevs.values { netdev.shutdown() }
        namedFDs.removeAll()
        loop.unwatch(signals.fd)
        signals.close()
    }

    /// SIGINT/SIGTERM/SIGHUP end the VMM like QEMU's `host-signal` shutdown; they are read
    /// from a signalfd on the loop so no handler runs on an arbitrary thread.
    private func installSignalHandling() {
        cl_install_kick_signal(VCPURunner.kickSignal)
        cl_ignore_signal(SIGPIPE)
        loop.watch(signals.fd) { [unowned self] _ in
            guard let signal = signals.take() else { return }
            logger.info("terminating on signal \(signal)")
            qmp.emit("SHUTDOWN", data: ["guest": false, "reason": "host-signal"])
            loop.stop(exitStatus: 0)
        }
    }

    // MARK: run-state transitions (loop thread)

    func stop() {
        guard runState == .running else { return }
        vcpuRunner.pause()
        runState = .paused
        qmp.emit("STOP")
    }

    func cont() throws {
        switch runState {
        case .running: return
        case .prelaunch, .paused:
            runState = .running
            resumeDevices()  // an incoming migration's devices wait for this
            vcpuRunner.resume()
            qmp.emit("RESUME")
        case .shutdown, .internalError:
            throw QMPCommandError("Resetting the Virtual Machine is required")
        case .inmigrate:
            throw QMPCommandError("Guest can not be started while an incoming migration is pending")
        case .finishMigrate:
            throw QMPCommandError("Migration is finishing; wait for it")
        case .postmigrate:
            throw QMPCommandError("The guest now runs in the migration target; this VMM must not resume it")
        }
    }

    /// Resumes every device; one that cannot is logged and the others still run.
    func resumeDevices() {
        for device in devices {
            do { try device.resume() } catch { logger.error("\(device.id): cannot resume: \(error)") }
        }
    }

    /// Like QEMU, the `quit` reply goes out first, then SHUTDOWN, then the process ends.
    func quit() {
        loop.post { [self] in
            qmp.emit("SHUTDOWN", data: ["guest": false, "reason": "host-qmp-quit"])
            loop.stop(exitStatus: 0)
        }
    }

    func guestExit(status: UInt32) {
        logger.info("guest requested exit with status \(status)")
        qmp.emit("SHUTDOWN", data: ["guest": true, "reason": "guest-shutdown"])
        if config.noShutdown {
            vcpuRunner.pause()
            runState = .shutdown
            qmp.emit("STOP")
        } else {
            loop.stop(exitStatus: Int32(truncatingIfNeeded: status & 0xFF))
        }
    }

    func vcpuFailed(_ message: String) {
        logger.error("vCPU stopped: \(message)")
        runState = .internalError
        qmp.emit("STOP")
    }
}

/// Lets the debug-exit device, created before the machine exists, reach it on the loop thread.
private final class GuestExitHandler: @unchecked Sendable {
    weak var machine: Machine?
    var loop: EventLoop?

    func handle(_ value: UInt32) {
        // Stop executing guest code right away (we are on the vCPU thread), then let the
        // loop thread decide between exiting and the -no-shutdown state.
        machine?.vcpuRunner.requestStop()
        loop?.post { [self] in machine?.guestExit(status: value) }
    }
}
