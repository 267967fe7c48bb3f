import CLinux
import Glibc
import Logging
import Synchronization
import Testing
@testable import VMMCore

/// Kernel vhost-net without the kernel: the ioctl numbers and argument bytes against
/// linux/vhost.h, and the datapath's exact ioctl sequences against a recording fake.
@Suite struct VhostKernelTests {
    // MARK: the ABI

    /// Each number computed in Swift equals the header's macro (C computes it) and the
    /// value QEMU's and the kernel's users see.
    @Test func ioctlNumbersMatchTheHeader() {
        let numbers: [(String, UInt, UInt, UInt)] = [
            ("GET_FEATURES", VhostKernel.getFeatures, UInt(CL_VHOST_GET_FEATURES), 0x8008_AF00),
            ("SET_FEATURES", VhostKernel.setFeatures, UInt(CL_VHOST_SET_FEATURES), 0x4008_AF00),
            ("SET_OWNER", VhostKernel.setOwner, UInt(CL_VHOST_SET_OWNER), 0xAF01),
            ("RESET_OWNER", VhostKernel.resetOwner, UInt(CL_VHOST_RESET_OWNER), 0xAF02),
            ("SET_MEM_TABLE", VhostKernel.setMemTable, UInt(CL_VHOST_SET_MEM_TABLE), 0x4008_AF03),
            ("SET_LOG_BASE", VhostKernel.setLogBase, UInt(CL_VHOST_SET_LOG_BASE), 0x4008_AF04),
            ("SET_VRING_NUM", VhostKernel.setVringNum, UInt(CL_VHOST_SET_VRING_NUM), 0x4008_AF10),
            ("SET_VRING_ADDR", VhostKernel.setVringAddr, UInt(CL_VHOST_SET_VRING_ADDR), 0x4028_AF11),
            ("SET_VRING_BASE", VhostKernel.setVringBase, UInt(CL_VHOST_SET_VRING_BASE), 0x4008_AF12),
            ("GET_VRING_BASE", VhostKernel.getVringBase, UInt(CL_VHOST_GET_VRING_BASE), 0xC008_AF12),
            ("SET_VRING_KICK", VhostKernel.setVringKick, UInt(CL_VHOST_SET_VRING_KICK), 0x4008_AF20),
            ("SET_VRING_CALL", VhostKernel.setVringCall, UInt(CL_VHOST_SET_VRING_CALL), 0x4008_AF21),
            ("SET_VRING_ERR", VhostKernel.setVringErr, UInt(CL_VHOST_SET_VRING_ERR), 0x4008_AF22),
            ("NET_SET_BACKEND", VhostKernel.netSetBackend, UInt(CL_VHOST_NET_SET_BACKEND), 0x4008_AF30),
        ]
        for (name, swift, header, literal) in numbers {
            #expect(swift == header, "\(name): \(hex(swift)) vs linux/vhost.h \(hex(header))")
            #expect(swift == literal, "\(name): \(hex(swift)) vs \(hex(literal))")
        }
        #expect(VhostKernel.featureLogAll == 1 << UInt64(CL_VHOST_F_LOG_ALL))
        #expect(VhostKernel.featureVirtioNetHeader == 1 << UInt64(CL_VHOST_NET_F_VIRTIO_NET_HDR))
        #expect(VhostKernel.vringFlagLog == 1 << UInt32(CL_VHOST_VRING_F_LOG))
    }

    @Test func structLayoutsMatchTheHeader() {
        #expect(VhostMemoryTable.headerSize == Int(CL_VHOST_SIZEOF_MEMORY))
        #expect(VhostMemoryRegion.size == Int(CL_VHOST_SIZEOF_MEMORY_REGION))
        #expect(VhostVringAddress.size == Int(CL_VHOST_SIZEOF_VRING_ADDR))
        #expect(VhostVringState.size == Int(CL_VHOST_SIZEOF_VRING_STATE))
        #expect(VhostVringFile.size == Int(CL_VHOST_SIZEOF_VRING_FILE))
        #expect(CL_VHOST_OFFSETOF_ADDR_USED == 16 && CL_VHOST_OFFSETOF_ADDR_LOG == 32 && CL_VHOST_OFFSETOF_REGION_USER == 16)
    }

    /// Byte fixtures: little-endian fields at the header's offsets.
    @Test func argumentBytes() {
        #expect(VhostVringState(index: 1, num: 0x0102_0304).bytes == [1, 0, 0, 0, 4, 3, 2, 1])
        #expect(VhostVringFile(index: 1, fd: -1).bytes == [1, 0, 0, 0, 0xFF, 0xFF, 0xFF, 0xFF])
        #expect(VhostVringFile(index: 0, fd: 7).bytes == [0, 0, 0, 0, 7, 0, 0, 0])
        let address = VhostVringAddress(index: 1, flags: 1, descriptor: 0x1122_3344_5566_7788, used: 0xA0, available: 0xB0, log: 0x3000)
        #expect(address.bytes == [1, 0, 0, 0, 1, 0, 0, 0,
                                  0x88, 0x77, 0x66, 0x55, 0x44, 0x33, 0x22, 0x11,
                                  0xA0, 0, 0, 0, 0, 0, 0, 0,
                                  0xB0, 0, 0, 0, 0, 0, 0, 0,
                                  0, 0x30, 0, 0, 0, 0, 0, 0])
        let table = VhostMemoryTable.bytes([
            VhostMemoryRegion(guestAddress: 0, size: 0x8000_0000, userAddress: 0x7F00_0000_0000),
            VhostMemoryRegion(guestAddress: 0x1_0000_0000, size: 0x1000, userAddress: 0x7F00_8000_0000),
        ])
        #expect(table.count == 8 + 2 * 32)
        #expect(Array(table[0..<8]) == [2, 0, 0, 0, 0, 0, 0, 0])
        #expect(Array(table[8..<40]) == [0, 0, 0, 0, 0, 0, 0, 0,  0, 0, 0, 0x80, 0, 0, 0, 0,
                                         0, 0, 0, 0, 0, 0x7F, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0])
        #expect(Array(table[40..<72]) == [0, 0, 0, 0, 1, 0, 0, 0,  0, 0x10, 0, 0, 0, 0, 0, 0,
                                          0, 0, 0, 0x80, 0, 0x7F, 0, 0,  0, 0, 0, 0, 0, 0, 0, 0])
        // fds are lent by number for the ioctl only; an unbind is -1.
        let fd = FileDescriptor(adopting: open("/dev/null", O_RDONLY), label: "null")
        let raw = fd.withRaw { $0 }
        VhostKernelRequest.netSetBackend(index: 1, fd).withArgument { #expect($0 == VhostVringFile(index: 1, fd: raw).bytes) }
        VhostKernelRequest.netSetBackend(index: 0, nil).withArgument { #expect($0 == VhostVringFile(index: 0, fd: -1).bytes) }
        VhostKernelRequest.setOwner.withArgument { #expect($0 == nil) }
        VhostKernelRequest.setFeatures(1 << 32).withArgument { #expect($0 == [0, 0, 0, 0, 1, 0, 0, 0]) }
        #expect(VhostKernelRequest.getVringBase(index: 1).result(from: [1, 0, 0, 0, 0x34, 0x12, 0, 0]) == 0x1234)
        #expect(VhostKernelRequest.getFeatures.result(from: [0, 0, 0, 4, 1, 0, 0, 0]) == 0x1_0400_0000)
    }

    // MARK: the recording fake

    /// Every request of every device in one list, in order; scripted answers and failures.
    final class Recorder: @unchecked Sendable {
        let lines = Mutex<[String]>([])
        let features = Mutex<UInt64>(VhostKernel.featureVersion1 | VhostKernel.featureLogAll | VhostKernel.featureVirtioNetHeader)
        /// GET_VRING_BASE's answer per "pair/ring".
        let bases = Mutex<[String: UInt32]>([:])
        /// Fail the first request whose summary starts with this, once, with this errno.
        let failure = Mutex<(prefix: String, errno: Int32)?>(nil)
        /// What the datapath reported through `ringFailed`.
        let ringFailures = Mutex<[String]>([])
        var recorded: [String] { lines.withLock { $0 } }
        func clear() { lines.withLock { $0 = [] } }
    }

    final class RecordingVhost: VhostKernelIO, @unchecked Sendable {
        let label: String
        let pair: Int
        let recorder: Recorder
        init(pair: Int, recorder: Recorder) {
            self.pair = pair
            label = "vhost \(pair)"
            self.recorder = recorder
        }
        func perform(_ request: VhostKernelRequest) throws -> UInt64 {
            let line = "\(pair): \(request.summary)"
            recorder.lines.withLock { $0.append(line) }
            if let failure = recorder.failure.withLock({ $0 }), line.hasPrefix(failure.prefix) {
                recorder.failure.withLock { $0 = nil }
                throw VhostKernelError("\(request.name): \(String(cString: strerror(failure.errno)))", errno: failure.errno)
            }
            switch request {
            case .getFeatures: return recorder.features.withLock { $0 }
            case .getVringBase(let index): return UInt64(recorder.bases.withLock { $0["\(pair)/\(index)"] ?? 0 })
            default: return 0
            }
        }
    }

    /// A TAP stand-in: one socketpair end per queue, or none until a migration brings them.
    final class FakeQueues: NetBackend, @unchecked Sendable {
        let id = "n1"
        let ifname = "tap-test"
        let queueCount: Int
        let vnetHeader: Bool
        private let fds: Mutex<[FileDescriptor]>
        private(set) var peers: [Int32] = []
        var queueFDs: [FileDescriptor] { fds.withLock { $0 } }
        var awaitsIncomingQueues: Bool { queueFDs.isEmpty }
        let attached = Mutex<[Int]>([])
        init(queues: Int, vnetHeader: Bool = true, incoming: Bool = false) {
            queueCount = queues
            self.vnetHeader = vnetHeader
            fds = Mutex([])
            if !incoming { fds.withLock { $0 = Self.make(queues, peers: &peers) } }
        }
        static func make(_ count: Int, peers: inout [Int32]) -> [FileDescriptor] {
            (0..<count).map { index in
                var pair: [Int32] = [0, 0]
                socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &pair)
                peers.append(pair[1])
                return FileDescriptor(adopting: pair[0], label: "netdev n1 TAP queue \(index)")
            }
        }
        deinit { peers.forEach { close($0) } }
        func attachQueues(count: Int) { attached.withLock { $0.append(count) } }
        func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws { self.fds.withLock { $0 = fds } }
    }

    /// A guest's RAM with rings laid out per virtqueue index, and a device's context.
    final class Rig: @unchecked Sendable {
        let memory: GuestMemory
        let recorder = Recorder()
        let queues: FakeQueues
        let netdev: VhostKernelNetdev
        let datapath: VhostKernelDatapath

        init(pairs: Int, vnetHeader: Bool = true, incoming: Bool = false) throws {
            memory = try GuestMemory(size: 4 << 20)
            queues = FakeQueues(queues: pairs, vnetHeader: vnetHeader, incoming: incoming)
            let recorder = self.recorder
            netdev = try VhostKernelNetdev(id: "n1", tap: queues, devices: (0..<pairs).map { RecordingVhost(pair: $0, recorder: recorder) },
                                           logger: Logger(label: "test"))
            datapath = try #require(try netdev.makeDatapath(pairs: pairs, memory: memory, memoryBackend: nil) as? VhostKernelDatapath)
        }

        static func ringBase(_ index: Int) -> UInt64 { 0x10000 + UInt64(index) * 0x4000 }

        func queue(_ index: Int, lastAvailable: UInt16 = 0) -> Virtqueue {
            var q = Virtqueue(maxSize: 256)
            q.ready = true
            q.descriptorTable = Self.ringBase(index)
            q.driverArea = Self.ringBase(index) + 0x1000
            q.deviceArea = Self.ringBase(index) + 0x2000
            q.lastAvailable = lastAvailable
            return q
        }

        func user(_ gpa: UInt64) -> String { hex(UInt64(UInt(bitPattern: try! memory.slice(at: gpa, count: 1).baseAddress!))) }

        var context: DatapathContext {
            let recorder = self.recorder
            return DatapathContext(memory: memory, ringFailed: { index, message in recorder.ringFailures.withLock { $0.append("ring \(index): \(message)") } },
                                   attachDoorbell: { _, _ in }, detachDoorbells: {})
        }

        func handoffs(_ indices: [Int], lastAvailable: UInt16 = 0) throws -> [Int: RingHandoff] {
            var rings: [Int: RingHandoff] = [:]
            for index in indices {
                rings[index] = RingHandoff(queue: queue(index, lastAvailable: lastAvailable), kick: try EventFD(label: "net0 kick \(index)"),
                                           call: try EventFD(label: "net0 call \(index)"))
            }
            return rings
        }

        /// QEMU's `vhost_dev_start` + `vhost_net_start_one` for `pair`'s rings.
        func startSequence(pair: Int, rings: [Int], base: UInt16 = 0, features: UInt64 = VhostKernel.featureVersion1) -> [String] {
            let table = memory.regions.map { "\(hex($0.guestAddress))+\(hex($0.size))@\(hex(UInt64(UInt(bitPattern: memory.hostAddress(of: $0)))))" }
            var lines = ["\(pair): VHOST_SET_FEATURES \(hex(features))", "\(pair): VHOST_SET_MEM_TABLE \(table.joined(separator: " "))"]
            for index in rings {
                let local = index % 2
                let b = Self.ringBase(index)
                lines += [
                    "\(pair): VHOST_SET_VRING_NUM \(local) 256",
                    "\(pair): VHOST_SET_VRING_BASE \(local) \(base)",
                    "\(pair): VHOST_SET_VRING_ADDR \(local) flags 0 desc \(user(b)) used \(user(b + 0x2000)) avail \(user(b + 0x1000)) log \(hex(b + 0x2000))",
                    "\(pair): VHOST_SET_VRING_KICK \(local) net0 kick \(index)",
                    "\(pair): VHOST_SET_VRING_CALL \(local) net0 call \(index)",
                    "\(pair): VHOST_SET_VRING_ERR \(local) netdev n1 vhost error \(index)",
                ]
            }
            lines += rings.map { "\(pair): VHOST_NET_SET_BACKEND \($0 % 2) netdev n1 TAP queue \(pair)" }
            return lines
        }

        func stopSequence(pair: Int, rings: [Int]) -> [String] {
            rings.map { "\(pair): VHOST_NET_SET_BACKEND \($0 % 2) -1" } + rings.map { "\(pair): VHOST_GET_VRING_BASE \($0 % 2)" }
        }
    }

    // MARK: sequences

    @Test func creationTakesOwnershipAndReadsFeaturesPerPair() throws {
        let rig = try Rig(pairs: 2)
        #expect(rig.recorder.recorded == ["0: VHOST_SET_OWNER", "0: VHOST_GET_FEATURES", "1: VHOST_SET_OWNER", "1: VHOST_GET_FEATURES"])
        #expect(rig.datapath.kind == .vhostKernel && rig.datapath.notification == .eventFDs)
    }

    @Test func startStopRestartSequences() throws {
        let rig = try Rig(pairs: 2)
        rig.recorder.clear()
        rig.datapath.start(try rig.handoffs([0, 1, 2, 3]), activePairs: 1, context: rig.context)
        #expect(rig.recorder.recorded == rig.startSequence(pair: 0, rings: [0, 1]) + rig.startSequence(pair: 1, rings: [2, 3]))
        #expect(rig.queues.attached.withLock { $0 } == [1])
        rig.datapath.setActivePairs(2)
        #expect(rig.queues.attached.withLock { $0 } == [1, 2])

        // The kernel's progress: GET_VRING_BASE's next available index, used index from RAM.
        rig.recorder.bases.withLock { $0 = ["0/0": 7, "0/1": 5, "1/0": 3, "1/1": 65535] }
        try rig.memory.store(UInt16(6), at: Rig.ringBase(0) + 0x2002)
        try rig.memory.store(UInt16(5), at: Rig.ringBase(1) + 0x2002)
        rig.recorder.clear()
        let returned = rig.datapath.stop()
        #expect(rig.recorder.recorded == rig.stopSequence(pair: 0, rings: [0, 1]) + rig.stopSequence(pair: 1, rings: [2, 3]))
        #expect(returned.mapValues(\.lastAvailable) == [0: 7, 1: 5, 2: 3, 3: 65535])
        #expect(returned[0]?.usedIndex == 6 && returned[1]?.usedIndex == 5 && returned[2]?.usedIndex == 0)
        #expect(rig.recorder.ringFailures.withLock { $0 } == [])
        #expect(rig.datapath.stop().isEmpty)

        // Restart (cont, or a failed migration resuming): the same sequence from the returned bases.
        rig.recorder.clear()
        var rings = try rig.handoffs([0, 1])
        for (index, queue) in returned where index < 2 { rings[index]!.queue = queue }
        rig.datapath.start(rings, activePairs: 1, context: rig.context)
        let restarted = rig.recorder.recorded
        #expect(restarted.contains("0: VHOST_SET_VRING_BASE 0 7") && restarted.contains("0: VHOST_SET_VRING_BASE 1 5"))
        #expect(restarted.count == rig.startSequence(pair: 0, rings: [0, 1]).count)
        #expect(!restarted.contains { $0.hasPrefix("1:") }, "a pair without rings is left alone")
    }

    /// A TAP without IFF_VNET_HDR: vhost adds the header (VHOST_NET_F_VIRTIO_NET_HDR).
    @Test func tapWithoutVnetHeaderAsksVhostForIt() throws {
        let rig = try Rig(pairs: 1, vnetHeader: false)
        rig.recorder.clear()
        rig.datapath.start(try rig.handoffs([0, 1]), activePairs: 1, context: rig.context)
        #expect(rig.recorder.recorded.first == "0: VHOST_SET_FEATURES \(hex(VhostKernel.featureVersion1 | VhostKernel.featureVirtioNetHeader))")
    }

    @Test func aFailedStepMarksTheDeviceAndUndoesWhatRan() throws {
        let rig = try Rig(pairs: 2)
        rig.recorder.clear()
        rig.recorder.failure.withLock { $0 = ("1: VHOST_SET_VRING_ADDR 1", EINVAL) }
        rig.recorder.bases.withLock { $0 = ["0/0": 4, "0/1": 2] }
        rig.datapath.start(try rig.handoffs([0, 1, 2, 3], lastAvailable: 1), activePairs: 2, context: rig.context)
        let lines = rig.recorder.recorded
        let failedAt = try #require(lines.firstIndex { $0.hasPrefix("1: VHOST_SET_VRING_ADDR 1") })
        #expect(Array(lines[..<failedAt]) == rig.startSequence(pair: 0, rings: [0, 1], base: 1) + Array(rig.startSequence(pair: 1, rings: [2, 3], base: 1).prefix(failedAt - 16)))
        // Pair 0 ran: unbound and read back; pair 1 never got its TAP.
        #expect(Array(lines[(failedAt + 1)...]) == rig.stopSequence(pair: 0, rings: [0, 1]))
        #expect(rig.recorder.ringFailures.withLock { $0 } == ["ring 2: netdev 'n1': vhost-net queue pair 1: VHOST_SET_VRING_ADDR: Invalid argument"])
        let returned = rig.datapath.stop()
        #expect(returned.mapValues(\.lastAvailable) == [0: 4, 1: 2, 2: 1, 3: 1])
    }

    /// QEMU's fallback when the ring state cannot be read: resume at the used index.
    @Test func unreadableBaseResumesAtTheUsedIndex() throws {
        let rig = try Rig(pairs: 1)
        rig.datapath.start(try rig.handoffs([0, 1]), activePairs: 1, context: rig.context)
        try rig.memory.store(UInt16(9), at: Rig.ringBase(1) + 0x2002)
        rig.recorder.bases.withLock { $0 = ["0/0": 3] }
        rig.recorder.failure.withLock { $0 = ("0: VHOST_GET_VRING_BASE 1", EIO) }
        let returned = rig.datapath.stop()
        #expect(returned[0]?.lastAvailable == 3)
        #expect(returned[1]?.lastAvailable == 9 && returned[1]?.usedIndex == 9)
    }

    @Test func creationRefusesDevicesWithoutVersion1() throws {
        let recorder = Recorder()
        recorder.features.withLock { $0 = VhostKernel.featureLogAll }
        #expect {
            _ = try VhostKernelNetdev(id: "n1", tap: FakeQueues(queues: 1), devices: [RecordingVhost(pair: 0, recorder: recorder)], logger: Logger(label: "test"))
        } throws: { "\($0)" == "netdev 'n1': vhost-net queue pair 0 lacks features 0x100000000 (offers 0x4000000)" }
        recorder.features.withLock { $0 = VhostKernel.featureVersion1 }
        #expect {
            _ = try VhostKernelNetdev(id: "n1", tap: FakeQueues(queues: 1, vnetHeader: false), devices: [RecordingVhost(pair: 0, recorder: recorder)], logger: Logger(label: "test"))
        } throws: { "\($0)" == "netdev 'n1': vhost-net queue pair 0 lacks features 0x8000000 (offers 0x100000000)" }
        recorder.failure.withLock { $0 = ("0: VHOST_SET_OWNER", EBUSY) }
        #expect {
            _ = try VhostKernelNetdev(id: "n1", tap: FakeQueues(queues: 1), devices: [RecordingVhost(pair: 0, recorder: recorder)], logger: Logger(label: "test"))
        } throws: { "\($0)" == "netdev 'n1': vhost-net queue pair 0: VHOST_SET_OWNER: Device or resource busy" }
    }

    /// The series' target: the vhost devices exist from the start, but are set up only
    /// once the TAP queues arrived (tap_post_load → tap_setup_vhost), with its wording.
    @Test func incomingTapSetsVhostUpAfterTheLoad() throws {
        let rig = try Rig(pairs: 2, incoming: true)
        #expect(rig.recorder.recorded == [])
        #expect(rig.datapath.awaitsIncomingFDs)
        var peers: [Int32] = []
        defer { peers.forEach { close($0) } }
        try rig.datapath.adoptIncoming(FakeQueues.make(2, peers: &peers), vnetHeader: true)
        #expect(rig.recorder.recorded == ["0: VHOST_SET_OWNER", "0: VHOST_GET_FEATURES", "1: VHOST_SET_OWNER", "1: VHOST_GET_FEATURES"])
        #expect(rig.datapath.handedOverFDs().map(\.name) == ["netdev/n1/tap.0", "netdev/n1/tap.1"])

        let failing = try Rig(pairs: 1, incoming: true)
        failing.recorder.failure.withLock { $0 = ("0: VHOST_SET_OWNER", EBUSY) }
        #expect {
            try failing.datapath.adoptIncoming(FakeQueues.make(1, peers: &peers), vnetHeader: true)
        } throws: { "\($0)" == "Failed to setup vhost during TAP post-load: netdev 'n1': vhost-net queue pair 0: VHOST_SET_OWNER: Device or resource busy" }
    }

    @Test func deviceCountMustMatchTheQueues() {
        #expect {
            _ = try VhostKernelNetdev(id: "n1", tap: FakeQueues(queues: 2), devices: [RecordingVhost(pair: 0, recorder: Recorder())], logger: Logger(label: "test"))
        } throws: { "\($0)" == "netdev 'n1': 1 vhost-net devices for 2 TAP queues" }
    }

    /// Without /dev/vhost-net (this machine): the error names the netdev and the errno.
    @Test func openingAMissingDeviceNamesNetdevAndErrno() {
        #expect {
            _ = try VhostKernelNetdev.openDevices(id: "n1", count: 1, path: "/dev/no-such-vhost-net")
        } throws: { "\($0)" == "cannot open /dev/no-such-vhost-net for netdev 'n1': No such file or directory" }
    }
}
