import Glibc
import Logging
import Synchronization
import Testing
@testable import VMMCore

/// cpr-transfer with kernel vhost (`-netdev tap,...,vhost=on,cpr=on`), at the device level,
/// against a fake kernel that owns each vhost-net device as the real one does: SET_OWNER
/// from a second process while the first still owns the device fails with EBUSY, and
/// RESET_OWNER gives it up. The source releases its devices before the cpr state is
/// built; the target claims the received fds by name and owns them; a cancel takes them back.
@Suite struct CPRVhostKernelTests {
    typealias FakeQueues = VhostKernelTests.FakeQueues

    /// One kernel: every request of every process in order ("source 0: VHOST_SET_OWNER"),
    /// and who owns each device (by its fd's inode, so a received copy is the same device).
    final class FakeKernel: @unchecked Sendable {
        let lines = Mutex<[String]>([])
        private let owners = Mutex<[UInt64: String]>([:])
        var recorded: [String] { lines.withLock { $0 } }
        func clear() { lines.withLock { $0 = [] } }

        /// A new vhost-net device (a pipe stands in: its inode is the device's identity).
        func open(pair: Int) -> FileDescriptor {
            var ends: [Int32] = [-1, -1]
            _ = pipe(&ends)
            close(ends[1])
            return FileDescriptor(adopting: ends[0], label: "netdev n1 vhost-net \(pair)")
        }

        func device(_ process: String, pair: Int, fd: FileDescriptor) -> Device { Device(kernel: self, process: process, pair: pair, fd: fd) }

        final class Device: VhostKernelIO, @unchecked Sendable {
            let kernel: FakeKernel
            let process: String
            let pair: Int
            let fd: FileDescriptor
            var label: String { fd.label }
            init(kernel: FakeKernel, process: String, pair: Int, fd: FileDescriptor) {
                self.kernel = kernel
                self.process = process
                self.pair = pair
                self.fd = fd
            }
            var inode: UInt64 {
                var st = stat()
                _ = fd.withRaw { fstat($0, &st) }
                return UInt64(st.st_ino)
            }
            func perform(_ request: VhostKernelRequest) throws -> UInt64 {
                kernel.lines.withLock { $0.append("\(process) \(pair): \(request.summary)") }
                let owner = kernel.owners.withLock { $0[inode] }
                switch request {
                case .setOwner:
                    guard owner == nil else { throw VhostKernelError("\(request.name): \(String(cString: strerror(EBUSY)))", errno: EBUSY) }
                    kernel.owners.withLock { $0[inode] = process }
                    return 0
                case .resetOwner:
                    kernel.owners.withLock { $0[inode] = nil }
                    return 0
                default:
                    guard owner == process else { throw VhostKernelError("\(request.name): \(String(cString: strerror(EPERM)))", errno: EPERM) }
                }
                switch request {
                case .getFeatures: return VhostKernel.featureVersion1 | VhostKernel.featureLogAll | VhostKernel.featureVirtioNetHeader
                case .getVringBase(let index): return index == 0 ? 5 : 4
                default: return 0
                }
            }
        }
    }

    struct DeviceRig: DriverRig {
        let memory: GuestMemory
        let transport: VirtioPCITransport
        let netdev: VhostKernelNetdev
    }

    /// A NIC on a vhost=on netdev `n1` (one pair) in `process`, running on `kernel`.
    static func nic(_ process: String, kernel: FakeKernel, queues: FakeQueues, devices: [any VhostKernelIO], memory: GuestMemory,
                    loop: EventLoop? = nil) throws -> DeviceRig {
        let netdev = try VhostKernelNetdev(id: "n1", tap: queues, devices: devices, logger: Logger(label: "test"))
        let nic = VirtioNet(id: "nic0", mac: [0x52, 0x54, 0, 1, 2, 3], datapath: try netdev.makeDatapath(pairs: 1, memory: memory, memoryBackend: nil),
                            multiQueue: false, logger: Logger(label: "test"))
        nic.host = DeviceHost(loop: try loop ?? EventLoop(), wakeGuest: {}, setHaltWakeSources: { _, _ in })
        return DeviceRig(memory: memory, transport: VirtioPCITransport(name: "nic0", model: nic, memory: memory, logger: Logger(label: "test")),
                         netdev: netdev)
    }

    /// A running source: its NIC started by the driver (DRIVER_OK), the kernel's progress 5/4.
    static func runningSource(_ kernel: FakeKernel, memory: GuestMemory, loop: EventLoop? = nil) throws -> DeviceRig {
        let queues = FakeQueues(queues: 1)
        queues.cpr = true
        let source = try nic("source", kernel: kernel, queues: queues, devices: [kernel.device("source", pair: 0, fd: kernel.open(pair: 0))],
                             memory: memory, loop: loop)
        source.placeBAR()
        source.configure()
        try memory.store(UInt16(5), at: source.base(0) + 0x2002)
        try memory.store(UInt16(4), at: source.base(1) + 0x2002)
        return source
    }

    static let cpr = HandoverContext(mode: .cprTransfer)
    static let stopped = ["source 0: VHOST_NET_SET_BACKEND 0 -1", "source 0: VHOST_NET_SET_BACKEND 1 -1",
                          "source 0: VHOST_GET_VRING_BASE 0", "source 0: VHOST_GET_VRING_BASE 1"]

    /// The source's half of 003's order and the target's: the pause stops the rings
    /// (unbind, GET_VRING_BASE), the setup notifier gives the device up (RESET_OWNER)
    /// before the cpr state is built, which carries the device's fd beside the TAP queue;
    /// the target claims both by name (no open of /dev/vhost-net), owns the device
    /// (SET_OWNER: no EBUSY) and, when it runs, starts the rings at the source's progress.
    @Test func sourceReleasesBeforeTheCPRStateAndTheTargetOwnsTheReceivedDevice() throws {
        let kernel = FakeKernel()
        let memory = try GuestMemory(size: 4 << 20, backing: .memfd, shared: true)
        let source = try Self.runningSource(kernel, memory: memory)
        kernel.clear()

        try source.transport.pause()
        let section = source.transport.saveSection(Self.cpr)
        #expect(section.fds.isEmpty, "in cpr-transfer the device section names no fds: they travel in the cpr state")
        let extra = try source.transport.prepareForHandover(Self.cpr)
        // What the cpr state is built from, after every device's notifier ran.
        let (entry, tapQueues) = try #require(CPRState.Netdev.handover(of: source.netdev))
        #expect(kernel.recorded == Self.stopped + ["source 0: VHOST_RESET_OWNER"], "nothing after RESET_OWNER, before the state is sent")
        #expect(entry.vhostKind == .kernel && entry.queues == 1)
        #expect(tapQueues.map(\.name) == ["netdev/n1/tap.0"] && extra.map(\.name) == ["netdev/n1/vhost.0"])
        #expect(extra[0].fd === source.netdev.devices[0].fd, "the device itself travels")

        // The cpr channel: RAM, TAP queue and vhost fd, as SCM_RIGHTS would copy them.
        let target = try IncomingMigrationTests.Fixture(expectsCPR: true)
        try target.beginCPR()
        let ram = try GuestMemory(size: IncomingMigrationTests.Fixture.ramSize, shared: true)
        let sent = [NamedFD(name: CPRState.ramFDName, fd: ram.fd)] + tapQueues + extra
        target.cpr.append(try sent.map { try $0.fd.duplicate() })
        let state = CPRState(ramKind: .memfd, ramSize: IncomingMigrationTests.Fixture.ramSize, netdevs: [entry])
        kernel.clear()
        try target.send(.init(kind: .cprState, payload: state.encoded(), fdNames: sent.map(\.name)), on: .cpr)

        // The target's netdev: vhost devices from the cpr state (a missing device node
        // proves nothing is opened), then the TAP queues, then ownership.
        let devices = try VhostKernelNetdev.devices(id: "n1", queues: 1, cpr: target.incoming, inherited: nil, path: "/dev/no-such-vhost-net") {
            kernel.device("target", pair: 0, fd: $0)
        }
        #expect(devices.map(\.label) == ["received netdev/n1/vhost.0"])
        let (_, fds) = try target.incoming.claimCPRNetdev("n1")
        let queues = FakeQueues(queues: 1, incoming: true)
        try queues.adoptIncoming(fds, vnetHeader: true)
        let nic = try Self.nic("target", kernel: kernel, queues: queues, devices: devices, memory: memory)
        #expect(kernel.recorded == ["target 0: VHOST_SET_OWNER", "target 0: VHOST_GET_FEATURES"])
        #expect(target.cpr.closeUnclaimed() == [], "everything the cpr state carried was claimed")

        // As after a local migration: the device state loads, the rings start where the source stopped.
        nic.placeBAR()
        try nic.transport.loadSection(section.payload, fds: ReceivedFDs())
        try nic.transport.checkReadyToRun()
        kernel.clear()
        try nic.transport.resume()
        let lines = kernel.recorded
        #expect(lines.contains("target 0: VHOST_SET_VRING_BASE 0 5") && lines.contains("target 0: VHOST_SET_VRING_BASE 1 4"), "\(lines)")
        #expect(lines.suffix(2) == ["target 0: VHOST_NET_SET_BACKEND 0 received netdev/n1/tap.0", "target 0: VHOST_NET_SET_BACKEND 1 received netdev/n1/tap.0"])
        #expect(!lines.contains { $0.hasPrefix("source") })
        #expect(nic.transport.status & VirtioPCITransport.Status.needsReset == 0)
    }

    /// The fake kernel is the real one's model: without the source's RESET_OWNER the
    /// target's SET_OWNER is refused with EBUSY, the failure 003's order prevents.
    @Test func withoutTheResetTheTargetsSetOwnerFailsWithEBUSY() throws {
        let kernel = FakeKernel()
        let source = try Self.runningSource(kernel, memory: try GuestMemory(size: 4 << 20, backing: .memfd, shared: true))
        try source.transport.pause()
        let received = try source.netdev.devices[0].fd.duplicate()
        #expect {
            _ = try VhostKernelNetdev(id: "n1", tap: FakeQueues(queues: 1), devices: [kernel.device("target", pair: 0, fd: received)], logger: Logger(label: "test"))
        } throws: { "\($0)" == "netdev 'n1': vhost-net queue pair 0: VHOST_SET_OWNER: Device or resource busy" }
    }

    /// A cancelled or failed handover: SET_OWNER (and the features) again at once, then the
    /// resume starts the rings from their progress without asking for ownership twice.
    @Test func aCancelTakesTheDevicesBackBeforeTheResume() throws {
        let kernel = FakeKernel()
        let source = try Self.runningSource(kernel, memory: try GuestMemory(size: 4 << 20, backing: .memfd, shared: true))
        try source.transport.pause()
        _ = try source.transport.prepareForHandover(Self.cpr)
        kernel.clear()
        source.transport.cancelHandover(Self.cpr)
        #expect(kernel.recorded == ["source 0: VHOST_SET_OWNER", "source 0: VHOST_GET_FEATURES"])
        source.transport.cancelHandover(Self.cpr)
        #expect(kernel.recorded.count == 2, "a second cancel sends nothing")
        kernel.clear()
        try source.transport.resume()
        let lines = kernel.recorded
        #expect(lines.first == "source 0: VHOST_SET_FEATURES \(hex(VhostKernel.featureVersion1))", "\(lines)")
        #expect(lines.contains("source 0: VHOST_SET_VRING_BASE 0 5") && lines.contains("source 0: VHOST_SET_VRING_BASE 1 4"))
        #expect(lines.suffix(2) == ["source 0: VHOST_NET_SET_BACKEND 0 netdev n1 TAP queue 0", "source 0: VHOST_NET_SET_BACKEND 1 netdev n1 TAP queue 0"])
        #expect(source.transport.status & VirtioPCITransport.Status.needsReset == 0)
    }

    /// Every pair: a handover of running rings stops them all before the first RESET_OWNER,
    /// and names each pair's device.
    @Test func everyPairStopsThenEveryDeviceIsReleased() throws {
        let rig = try VhostKernelTests.Rig(pairs: 2)
        rig.datapath.start(try rig.handoffs([0, 1, 2, 3]), activePairs: 2, context: rig.context)
        rig.recorder.clear()
        let named = try rig.datapath.prepareForHandover(Self.cpr)
        #expect(rig.recorder.recorded == rig.stopSequence(pair: 0, rings: [0, 1]) + rig.stopSequence(pair: 1, rings: [2, 3])
            + ["0: VHOST_RESET_OWNER", "1: VHOST_RESET_OWNER"])
        #expect(named.map(\.name) == ["netdev/n1/vhost.0", "netdev/n1/vhost.1"])
        #expect(named.map(\.fd.label) == ["vhost 0", "vhost 1"])
    }

    /// The target's netdev and the source's must agree on vhost; the cpr state's entry
    /// keeps its vhost kind, and a kind this build does not know is refused by name.
    @Test func vhostKindTravelsAndMustAgree() throws {
        let f = try IncomingMigrationTests.Fixture(expectsCPR: true)
        try f.beginCPR()
        try f.send(try f.cprState(netdevs: [("n1", 1)]), on: .cpr)
        #expect {
            _ = try VhostKernelNetdev.devices(id: "n1", queues: 1, cpr: f.incoming, inherited: nil)
        } throws: { "\($0)" == "netdev 'n1' is cpr=on, but the cpr state hands over no vhost-net devices for it (was the source's netdev vhost=on and cpr=on?)" }
        // Without a cpr state, the device node is opened (here: missing, named).
        #expect {
            _ = try VhostKernelNetdev.devices(id: "n1", queues: 1, cpr: nil, inherited: nil, path: "/dev/no-such-vhost-net")
        } throws: { "\($0)" == "cannot open /dev/no-such-vhost-net for netdev 'n1': No such file or directory" }

        // The other way round: the source's netdev was vhost=on, this one is not.
        let kernel = FakeKernel()
        let source = try Self.runningSource(kernel, memory: try GuestMemory(size: 4 << 20, backing: .memfd, shared: true))
        try source.transport.pause()
        let extra = try source.transport.prepareForHandover(Self.cpr)
        let (entry, queues) = try #require(CPRState.Netdev.handover(of: source.netdev))
        let g = try IncomingMigrationTests.Fixture(expectsCPR: true)
        try g.beginCPR()
        let ram = try GuestMemory(size: IncomingMigrationTests.Fixture.ramSize, shared: true)
        let sent = [NamedFD(name: CPRState.ramFDName, fd: ram.fd)] + queues + extra
        g.cpr.append(try sent.map { try $0.fd.duplicate() })
        try g.send(.init(kind: .cprState, payload: CPRState(ramKind: .memfd, ramSize: IncomingMigrationTests.Fixture.ramSize, netdevs: [entry]).encoded(),
                         fdNames: sent.map(\.name)), on: .cpr)
        #expect { _ = try g.incoming.claimCPRNetdev("n1") } throws: {
            "\($0)" == "netdev 'n1': the cpr state hands over its TAP with vhost-net devices (the source's netdev was vhost=on); give this netdev vhost=on too"
        }
        _ = try VhostKernelNetdev.devices(id: "n1", queues: 1, cpr: g.incoming, inherited: nil) { kernel.device("target", pair: 0, fd: $0) }
        #expect(try g.incoming.claimCPRNetdev("n1").1.count == 1, "after its vhost fds, the TAP")

        let state = CPRState(ramKind: .memfd, ramSize: 4096, netdevs: [.init(id: "n1", queues: 2, vnetHeader: true, ifname: "tap0", vhostKind: .kernel)])
        #expect(try CPRState.decode(state.encoded(), owner: "cpr").netdevs == state.netdevs)
        var bytes = state.encoded()
        bytes[bytes.count - 1] = 9
        #expect { _ = try CPRState.decode(bytes, owner: "cpr") } throws: { "\($0)" == "cpr state: netdev 'n1' has vhost kind 9, unknown to this build" }
    }
}

extension CPRVhostKernelTests {
    /// A target that took the devices over and then ends (its migration failed, or it was
    /// shut down) gives them up, so the source can take them back; a source whose
    /// handover completed owns nothing any more and sends nothing at its end.
    @Test func anEndingNetdevGivesUpOnlyWhatItOwns() throws {
        let kernel = FakeKernel()
        let memory = try GuestMemory(size: 4 << 20, backing: .memfd, shared: true)
        let source = try Self.runningSource(kernel, memory: memory)
        try source.transport.pause()
        _ = try source.transport.prepareForHandover(Self.cpr)
        let target = try VhostKernelNetdev(id: "n1", tap: FakeQueues(queues: 1),
                                           devices: [kernel.device("target", pair: 0, fd: try source.netdev.devices[0].fd.duplicate())], logger: Logger(label: "test"))
        kernel.clear()
        source.netdev.shutdown()
        #expect(kernel.recorded == [], "the source's end after the handover")
        target.shutdown()
        #expect(kernel.recorded == ["target 0: VHOST_RESET_OWNER"])
        // The migration failed: the source owns its device again.
        source.transport.cancelHandover(Self.cpr)
        #expect(kernel.recorded.suffix(2) == ["source 0: VHOST_SET_OWNER", "source 0: VHOST_GET_FEATURES"])
        target.shutdown()
        #expect(kernel.recorded.count == 3, "once")
    }

    /// Cancelled while the target still owns the devices (it took them at start-up and ends
    /// only once its migration failed): the source's SET_OWNER is refused with EBUSY, and
    /// its rings wait for the devices instead of needing a reset; once the target's end
    /// gave them up, the source owns them and its rings start at their progress.
    @Test func aCancelWaitsForATargetThatStillOwnsTheDevices() throws {
        let kernel = FakeKernel()
        let loop = try VhostUserFrontEndTests.LoopThread()
        let source = try Self.runningSource(kernel, memory: try GuestMemory(size: 4 << 20, backing: .memfd, shared: true), loop: loop.loop)
        try loop.run()
        defer { loop.finish() }
        try source.transport.pause()
        _ = try source.transport.prepareForHandover(Self.cpr)
        let target = try VhostKernelNetdev(id: "n1", tap: FakeQueues(queues: 1),
                                           devices: [kernel.device("target", pair: 0, fd: try source.netdev.devices[0].fd.duplicate())], logger: Logger(label: "test"))
        kernel.clear()
        source.transport.cancelHandover(Self.cpr)
        try source.transport.resume()
        usleep(50_000)
        // The cancel's SET_OWNER, the resume's, then the loop's retries: nothing else.
        #expect(kernel.recorded.count >= 3 && kernel.recorded.allSatisfy { $0 == "source 0: VHOST_SET_OWNER" }, "\(kernel.recorded)")
        #expect(source.transport.status & VirtioPCITransport.Status.needsReset == 0)
        target.shutdown()
        #expect(VhostUserFrontEndTests.eventually { kernel.recorded.last == "source 0: VHOST_NET_SET_BACKEND 1 netdev n1 TAP queue 0" }, "\(kernel.recorded)")
        let lines = kernel.recorded
        #expect(lines.contains("source 0: VHOST_SET_VRING_BASE 0 5") && lines.contains("source 0: VHOST_SET_VRING_BASE 1 4"))
        #expect(source.transport.status & VirtioPCITransport.Status.needsReset == 0)
    }
}
