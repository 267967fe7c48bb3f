import CLinux
import Glibc
import Synchronization
import TestKit
import Testing
@testable import VMMCore

/// A datapath that takes notifies as eventfds (as vhost does) and loops every frame the
/// guest sends on pair 0 back into its RX ring, on a thread of its own: kick in, call out.
final class LoopbackDatapath: NetDatapath, @unchecked Sendable {
    let netdevID = "loop"
    let ifname = ""
    let kind = DatapathKind.userspace
    let notification = DatapathNotification.eventFDs
    let queuePairs = 1
    let vnetHeader = true
    let awaitsIncomingFDs = false
    var statistics: (rx: [UInt64], tx: [UInt64]) { ([moved.load(ordering: .relaxed)], [moved.load(ordering: .relaxed)]) }
    /// Notifies that reached `notified` (the inline path): none may, with eventfds.
    let inlineNotifies = Atomic<Int>(0)
    let moved = Atomic<UInt64>(0)
    private let stopping = EventFD.orFatal()
    private let running = Mutex<(rings: [Int: RingHandoff], context: DatapathContext?, thread: OSThread?)>(([:], nil, nil))

    func attach(to host: DeviceHost) {}
    func detach() {}
    func handedOverFDs() -> [NamedFD] { [] }
    func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws {}
    func setActivePairs(_ pairs: Int) {}
    func notified(_ index: Int) { inlineNotifies.add(1, ordering: .relaxed) }

    func start(_ rings: [Int: RingHandoff], activePairs: Int, context: DatapathContext) {
        // The rings first: a thread that ran before they were stored found none and ended
        // (seen once on a loaded machine).
        running.withLock { $0 = (rings, context, nil) }
        let thread = try! OSThread(name: "loopback") { [self] in serve() }
        running.withLock { $0.thread = thread }
    }

    func stop() -> [Int: Virtqueue] {
        stopping.signal()
        let thread = running.withLock { $0.thread }
        thread?.join()
        stopping.drain()
        return running.withLock { r in defer { r = ([:], nil, nil) }; return r.rings.mapValues(\.queue) }
    }

    private func serve() {
        while true {
            guard let tx = running.withLock({ $0.rings[1] }), let kick = tx.kick else { return }
            var fds = [stopping.fd.pollRequest(), kick.fd.pollRequest()]
            _ = poll(&fds, 2, 5000)
            if fds[0].revents != 0 { return }
            guard fds[1].revents != 0 else { continue }
            kick.drain()
            running.withLock { r in
                guard var tx = r.rings[1]?.queue, var rx = r.rings[0]?.queue, let memory = r.context?.memory else { return }
                while let frame = try? tx.popAvailable(from: memory), let buffer = try? rx.popAvailable(from: memory) {
                    var bytes: [UInt8] = []
                    for segment in frame.readable { bytes += (try? memory.read(at: segment.address, count: Int(segment.length))) ?? [] }
                    try? memory.write(bytes.prefix(Int(buffer.writableLength)), at: buffer.writable[0].address)
                    try? tx.pushUsed(head: frame.head, length: 0, to: memory)
                    try? rx.pushUsed(head: buffer.head, length: UInt32(bytes.count), to: memory)
                    moved.add(1, ordering: .relaxed)
                }
                r.rings[1]?.queue = tx
                r.rings[0]?.queue = rx
                r.rings[0]?.call?.signal()
            }
        }
    }
}

@Suite struct KickCallTests {
    struct LoopRig: DriverRig {
        let memory: GuestMemory
        let datapath = LoopbackDatapath()
        let nic: VirtioNet
        let transport: VirtioPCITransport

        init(ioeventfds: (host: any IOEventFDHost, length: UInt32)? = nil) throws {
            memory = try GuestMemory(size: 4 << 20)
            nic = VirtioNet(id: "nic0", mac: [0x52, 0x54, 0, 1, 2, 3], datapath: datapath, multiQueue: false, logger: .init(label: "t"))
            transport = VirtioPCITransport(name: "nic0", model: nic, memory: memory, logger: .init(label: "t"), ioeventfds: ioeventfds)
            placeBAR()
        }
    }

    /// ioeventfd off (or unavailable): the notify exits, the transport relays it to the
    /// kick, the datapath's thread moves the frame and signals the call.
    @Test func relayedNotifyReachesTheKickAndTheCallFollows() throws {
        let rig = try LoopRig()
        let loop = rig
        rig.configure()
        try rig.post(queue: 0, slot: 0, address: 0x200000, length: 2048, writable: true)
        rig.bar(0x3000, 0, 2)
        try rig.transmitFrame(slot: 0)
        let deadline = monotonicNanoseconds() + 5_000_000_000
        while loop.datapath.moved.load(ordering: .relaxed) == 0 && monotonicNanoseconds() < deadline { usleep(1000) }
        #expect(try rig.usedEntries(queue: 0) == 1)
        #expect(try rig.memory.read(at: 0x200000 + 12, count: VirtioNetTests.frame.count) == VirtioNetTests.frame)
        // Both notifies exited (nothing was registered) and none reached the inline path.
        #expect(loop.transport.notifyExitCounts == [1, 1, 0])
        #expect(loop.datapath.inlineNotifies.load(ordering: .relaxed) == 0)
        let info = try #require(loop.transport.queryInfo?["x-virtio-net"])
        #expect(info["notify-exits"] == [1, 1, 0])
        // Stopped: the rings come back with their progress, the doorbells go.
        try loop.transport.pause()
        let saved = loop.transport.save(.init(mode: .normal))
        #expect(saved.queues[1].usedIndex == 1 && saved.queues[0].usedIndex == 1)
        rig.bar(0x3000 + 4, 1, 2)
        #expect(loop.datapath.inlineNotifies.load(ordering: .relaxed) == 1)
    }

    /// With KVM_IOEVENTFD a guest write to a registered notify address signals the kick
    /// inside KVM: no exit. An unregistered queue's notify still exits.
    @Test(.requiresKVM) func registeredNotifySignalsTheKickWithoutAnExit() throws {
        let hypervisor = try Hypervisor()
        try #require(hypervisor.checkExtension(CL_KVM_CAP_IOEVENTFD) > 0, "KVM_CAP_IOEVENTFD")
        let length: UInt32 = hypervisor.checkExtension(CL_KVM_CAP_IOEVENTFD_ANY_LENGTH) > 0 ? 0 : 2
        let vm = try hypervisor.createVM()
        try vm.setTSSAddress(Machine.tssAddress)
        let memory = try GuestMemory(size: 2 << 20)
        try vm.setMemoryRegion(slot: 0, guestAddress: 0, size: memory.size, host: memory.hostAddress(of: memory.regions[0]))
        let model = VirtioPCITransportTests.FakeModel()
        let transport = VirtioPCITransport(name: "t", model: model, memory: memory, logger: .init(label: "t"), ioeventfds: (vm, length))
        transport.configWrite(offset: 0x10, size: 4, value: 0xE000_0000)
        transport.configWrite(offset: 0x04, size: 2, value: 0x6)
        let kick = try EventFD(label: "kick 0")
        transport.attachDoorbell(queue: 0, kick: kick)
        // 32-bit code at 1 MiB: notify queue 0, notify queue 1, hlt.
        try memory.write([0x66, 0xA3, 0x00, 0x30, 0x00, 0xE0, 0x66, 0xA3, 0x04, 0x30, 0x00, 0xE0, 0xF4], at: 0x10_0000)
        let vcpu = try vm.createVCPU(id: 0)
        try vcpu.setCPUID(try hypervisor.supportedCPUID())
        let (regs, apply) = PVHBoot.initialRegisters(entry: 0x10_0000)
        var sregs = try vcpu.getSpecialRegisters()
        apply(&sregs)
        try vcpu.setSpecialRegisters(sregs)
        try vcpu.setRegisters(regs)
        var mmioExits: [UInt64] = []
        run: for _ in 0..<100 {
            switch try vcpu.run() {
            case .mmio(let address, let isWrite, let data):
                mmioExits.append(address)
                if isWrite, address >= 0xE000_0000 { transport.barWrite(0, offset: address - 0xE000_0000, from: UnsafeRawBufferPointer(data)) }
            case .halt: break run
            case .interrupted: continue
            case let exit: Issue.record("unexpected exit \(exit)"); break run
            }
        }
        #expect(mmioExits == [0xE000_3004])
        #expect(kick.drain())
        #expect(transport.notifyExitCounts == [0, 1])
        #expect(model.notified == [1])
        transport.detachDoorbells()
    }

    @Test func ioeventfdPropertyParses() throws {
        let options = try DeviceSpec.parse("virtio-net-pci,netdev=n0,ioeventfd=off", option: "-device")
        #expect(!options.ioeventfd)
        #expect(try DeviceSpec.parse("virtio-net-pci,netdev=n0", option: "-device").ioeventfd)
    }

}

/// Records KVM_IOEVENTFD assigns and deassigns, refusing a second registration of one
/// address as KVM does (EEXIST).
final class RecordingIOEventFDHost: IOEventFDHost, @unchecked Sendable {
    let log = Mutex<[String]>([])
    let assigned = Mutex<Set<UInt64>>([])
    func attachIOEventFD(_ eventFD: EventFD, mmio address: UInt64, length: UInt32) throws -> IOEventFDRegistration {
        guard assigned.withLock({ $0.insert(address).inserted }) else { throw SystemError("KVM_IOEVENTFD \(hex(address))", errno: EEXIST) }
        log.withLock { $0.append("assign \(hex(address))") }
        return IOEventFDRegistration(eventFD: eventFD, address: address, length: length)
    }
    func detach(_ registration: IOEventFDRegistration) {
        assigned.withLock { _ = $0.remove(registration.address) }
        log.withLock { $0.append("deassign \(hex(registration.address))") }
    }
}

@Suite struct DoorbellRegistrationTests {
    /// Deassigning waits for an SRCU grace period, so a stop (a migration's downtime)
    /// leaves the registration in KVM: it goes when the queue gets its next doorbell (no
    /// EEXIST), or at shutdown.
    @Test func aStoppedDoorbellIsDeassignedOnlyWhenReplacedOrAtShutdown() throws {
        let host = RecordingIOEventFDHost()
        let memory = try GuestMemory(size: 2 << 20)
        let transport = VirtioPCITransport(name: "t", model: VirtioPCITransportTests.FakeModel(), memory: memory,
                                           logger: .init(label: "t"), ioeventfds: (host, 0))
        transport.configWrite(offset: 0x10, size: 4, value: 0xE000_0000)
        transport.configWrite(offset: 0x04, size: 2, value: 0x6)
        transport.attachDoorbell(queue: 0, kick: try EventFD(label: "kick 0"))
        transport.detachDoorbells()
        #expect(host.log.withLock { $0 } == ["assign 0xe0003000"], "nothing deassigned at the stop")
        transport.attachDoorbell(queue: 0, kick: try EventFD(label: "kick 0 again"))
        #expect(host.log.withLock { $0 } == ["assign 0xe0003000", "deassign 0xe0003000", "assign 0xe0003000"])
        transport.detachDoorbells()
        transport.shutdown()
        #expect(host.assigned.withLock { $0 }.isEmpty, "\(host.log.withLock { $0 })")
    }
}
