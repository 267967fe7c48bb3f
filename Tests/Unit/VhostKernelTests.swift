import Glibc
import Logging
import Synchronization
import Testing
@testable import VMMCore

/// Kernel vhost-net without the kernel: the ioctl numbers and argument bytes against
/// linux/vhost.h, and the datapath's exact ioctl sequences against a recording fake.
@Suite struct VhostKernelTests {
    // MARK: the ABI

    /// Each number computed in Swift equals the header's macro: the literals are what a C
    /// program including linux/vhost.h printed (gcc, linux-libc-dev for 6.x), e.g.
    /// `printf("%lx", VHOST_SET_VRING_ADDR)` → 4028af11.
    @Test func ioctlNumbersMatchTheHeader() {
        let numbers: [(String, UInt, UInt)] = [
            ("GET_FEATURES", VhostKernel.getFeatures, 0x8008_AF00),
            ("SET_FEATURES", VhostKernel.setFeatures, 0x4008_AF00),
            ("SET_OWNER", VhostKernel.setOwner, 0xAF01),
            ("RESET_OWNER", VhostKernel.resetOwner, 0xAF02),
            ("SET_MEM_TABLE", VhostKernel.setMemTable, 0x4008_AF03),
            ("SET_LOG_BASE", VhostKernel.setLogBase, 0x4008_AF04),
            ("SET_VRING_NUM", VhostKernel.setVringNum, 0x4008_AF10),
            ("SET_VRING_ADDR", VhostKernel.setVringAddr, 0x4028_AF11),
            ("SET_VRING_BASE", VhostKernel.setVringBase, 0x4008_AF12),
            ("GET_VRING_BASE", VhostKernel.getVringBase, 0xC008_AF12),
            ("SET_VRING_KICK", VhostKernel.setVringKick, 0x4008_AF20),
            ("SET_VRING_CALL", VhostKernel.setVringCall, 0x4008_AF21),
            ("SET_VRING_ERR", VhostKernel.setVringErr, 0x4008_AF22),
            ("NET_SET_BACKEND", VhostKernel.netSetBackend, 0x4008_AF30),
        ]
        for (name, swift, header) in numbers {
            #expect(swift == header, "VHOST_\(name): \(hex(swift)), linux/vhost.h has \(hex(header))")
        }
        // VHOST_F_LOG_ALL 26, VHOST_NET_F_VIRTIO_NET_HDR 27, VHOST_VRING_F_LOG 0.
        #expect(VhostKernel.featureLogAll == 1 << 26 && VhostKernel.featureVirtioNetHeader == 1 << 27 && VhostKernel.vringFlagLog == 1)
    }

    /// sizeof/offsetof as the same C program printed them.
    @Test func structLayoutsMatchTheHeader() {
        #expect(VhostMemoryTable.headerSize == 8)  // struct vhost_memory
        #expect(VhostMemoryRegion.size == 32)
        #expect(VhostVringAddress.size == 40 && VhostVringAddress(index: 0, flags: 0, descriptor: 0, used: 0, available: 0, log: 0).bytes.count == 40)
        #expect(VhostVringState.size == 8 && VhostVringState(index: 0, num: 0).bytes.count == 8)
        #expect(VhostVringFile.size == 8 && VhostVringFile(index: 0, fd: 0).bytes.count == 8)
        // offsetof(vhost_vring_addr, used_user_addr) 16, avail 24, log_guest_addr 32;
        // offsetof(vhost_memory_region, userspace_addr) 16: checked by the byte fixtures below.
        #expect(VhostMemoryTable.bytes([VhostMemoryRegion(guestAddress: 0, size: 0, userAddress: 0)]).count == 8 + 32)
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
        let pair: Int
        let recorder: Recorder
        /// What a cpr-transfer hands over: /dev/null stands in, or the fd it received.
        let fd: FileDescriptor
        var label: String { fd.label }
        init(pair: Int, recorder: Recorder, fd: FileDescriptor? = nil) {
            self.pair = pair
            self.recorder = recorder
            self.fd = fd ?? FileDescriptor(adopting: open("/dev/null", O_RDWR | O_CLOEXEC), label: "vhost \(pair)")
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
        var cpr = false
        init(queues: Int, vnetHeader: Bool = true, incoming: Bool = false) {
            queueCount = queues
            self.vnetHeader = vnetHeader
            fds = Mutex([])
            if !incoming { fds.withLock { $0 = Self.make(queues, peers: &peers) } }
        }
        static func make(_ count: Int, peers: inout [Int32]) -> [FileDescriptor] {
            (0..<count).map { index in
                // Any fd stands in for a queue: the fake kernel never reads it.
                var pair: [Int32] = [0, 0]
                _ = pipe(&pair)
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
        /// `logBase`: the dirty log's address while pre-copy runs.
        func startSequence(pair: Int, rings: [Int], base: UInt16 = 0, features: UInt64 = VhostKernel.featureVersion1, logBase: String? = nil) -> [String] {
            let table = memory.regions.map { "\(hex($0.guestAddress))+\(hex($0.size))@\(hex(UInt64(UInt(bitPattern: memory.hostAddress(of: $0)))))" }
            var lines = logBase.map { ["\(pair): VHOST_SET_LOG_BASE \($0)"] } ?? []
            lines += ["\(pair): VHOST_SET_FEATURES \(hex(features | (logBase != nil ? VhostKernel.featureLogAll : 0)))",
                      "\(pair): VHOST_SET_MEM_TABLE \(table.joined(separator: " "))"]
            for index in rings {
                let local = index % 2
                lines += [
                    "\(pair): VHOST_SET_VRING_NUM \(local) 256",
                    "\(pair): VHOST_SET_VRING_BASE \(local) \(base)",
                    ringAddress(pair: pair, index: index, logging: logBase != nil),
                    "\(pair): VHOST_SET_VRING_KICK \(local) net0 kick \(index)",
                    "\(pair): VHOST_SET_VRING_CALL \(local) net0 call \(index)",
                    "\(pair): VHOST_SET_VRING_ERR \(local) netdev n1 vhost error \(index)",
                ]
            }
            lines += rings.map { "\(pair): VHOST_NET_SET_BACKEND \($0 % 2) netdev n1 TAP queue \(pair)" }
            return lines
        }

        func ringAddress(pair: Int, index: Int, logging: Bool) -> String {
            let b = Self.ringBase(index)
            return "\(pair): VHOST_SET_VRING_ADDR \(index % 2) flags \(logging ? 1 : 0) desc \(user(b)) used \(user(b + 0x2000)) avail \(user(b + 0x1000)) log \(hex(b + 0x2000))"
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

    /// A pair that fails set-up is given up again, so a later start retries exactly it.
    @Test func aFailedSetUpIsRetriedFromThePairThatFailed() throws {
        let rig = try Rig(pairs: 2, incoming: true)
        rig.recorder.failure.withLock { $0 = ("1: VHOST_GET_FEATURES", EIO) }
        var peers: [Int32] = []
        defer { peers.forEach { close($0) } }
        #expect(throws: StreamError.self) { try rig.datapath.adoptIncoming(FakeQueues.make(2, peers: &peers), vnetHeader: true) }
        #expect(rig.recorder.recorded == ["0: VHOST_SET_OWNER", "0: VHOST_GET_FEATURES", "1: VHOST_SET_OWNER", "1: VHOST_GET_FEATURES", "1: VHOST_RESET_OWNER"])
        rig.recorder.clear()
        rig.datapath.start(try rig.handoffs([0, 1]), activePairs: 1, context: rig.context)
        #expect(rig.recorder.recorded == ["1: VHOST_SET_OWNER", "1: VHOST_GET_FEATURES"] + rig.startSequence(pair: 0, rings: [0, 1]))
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

    // MARK: dirty log (pre-copy)

    /// Pre-copy on a running device: QEMU's vhost_migration_log(true) per pair (log base,
    /// LOG_ALL, each ring's address with VHOST_VRING_F_LOG); the kernel's marks reach the
    /// migration's bitmap at host offsets; off again without LOG_ALL and the flag.
    @Test func dirtyLogOnAndOffWhileRunning() throws {
        let rig = try Rig(pairs: 2)
        rig.datapath.start(try rig.handoffs([0, 1, 2, 3]), activePairs: 2, context: rig.context)
        rig.recorder.clear()
        try rig.datapath.startDirtyLog()
        let lines = rig.recorder.recorded
        let base = try #require(lines.first?.split(separator: " ").last.map(String.init))
        let logOn = { (pair: Int) in
            ["\(pair): VHOST_SET_LOG_BASE \(base)", "\(pair): VHOST_SET_FEATURES \(hex(VhostKernel.featureVersion1 | VhostKernel.featureLogAll))",
             rig.ringAddress(pair: pair, index: 2 * pair, logging: true), rig.ringAddress(pair: pair, index: 2 * pair + 1, logging: true)]
        }
        #expect(lines == logOn(0) + logOn(1))

        // The kernel marks guest-physical page 0x12 (bit 2 of byte 2): the next collection
        // holds host page 0x12 (low RAM maps 1:1), once.
        let address = try #require(UInt(base.dropFirst(2), radix: 16))
        let log = try #require(UnsafeMutablePointer<UInt8>(bitPattern: address))
        log[2] |= 1 << 2
        var bitmap = [UInt64](repeating: 0, count: rig.memory.deviceDirty.wordCount)
        rig.datapath.collectDirty(into: &bitmap)
        #expect(bitmap[0] == 1 << 0x12 && bitmap.dropFirst().allSatisfy { $0 == 0 })
        bitmap[0] = 0
        rig.datapath.collectDirty(into: &bitmap)
        #expect(bitmap.allSatisfy { $0 == 0 })

        rig.recorder.clear()
        rig.datapath.stopDirtyLog()
        let logOff = { (pair: Int) in
            ["\(pair): VHOST_SET_FEATURES \(hex(VhostKernel.featureVersion1))",
             rig.ringAddress(pair: pair, index: 2 * pair, logging: false), rig.ringAddress(pair: pair, index: 2 * pair + 1, logging: false)]
        }
        #expect(rig.recorder.recorded == logOff(0) + logOff(1))
        rig.recorder.clear()
        rig.datapath.stopDirtyLog()
        #expect(rig.recorder.recorded == [], "stopping twice sends nothing")
    }

    /// Pre-copy that starts while the rings are stopped (a paused guest, or between the
    /// source's stop and a failed migration's resume): the next start logs from its first ioctl.
    @Test func aStartDuringPreCopyLogsFromTheBeginning() throws {
        let rig = try Rig(pairs: 1)
        rig.recorder.clear()
        try rig.datapath.startDirtyLog()
        #expect(rig.recorder.recorded == [])
        rig.datapath.start(try rig.handoffs([0, 1]), activePairs: 1, context: rig.context)
        let lines = rig.recorder.recorded
        let base = try #require(lines.first?.split(separator: " ").last.map(String.init))
        #expect(lines == rig.startSequence(pair: 0, rings: [0, 1], logBase: base))
        // After the migration ends, a restart runs unlogged again.
        _ = rig.datapath.stop()
        rig.datapath.stopDirtyLog()
        rig.recorder.clear()
        rig.datapath.start(try rig.handoffs([0, 1]), activePairs: 1, context: rig.context)
        #expect(rig.recorder.recorded == rig.startSequence(pair: 0, rings: [0, 1]))
    }

    @Test func aDeviceWithoutLogAllRefusesPreCopy() throws {
        let rig = try Rig(pairs: 1)
        rig.recorder.features.withLock { $0 = VhostKernel.featureVersion1 }
        try rig.netdev.resetOwner()
        try rig.netdev.setUp()
        #expect {
            try rig.datapath.startDirtyLog()
        } throws: { "\($0)" == "netdev 'n1': vhost-net does not offer VHOST_F_LOG_ALL, so its writes to guest RAM cannot be logged for pre-copy" }
    }

    /// A failure while switching logging on leaves the rings unlogged and names the step.
    @Test func aFailedLogSwitchTurnsLoggingBackOff() throws {
        let rig = try Rig(pairs: 1)
        rig.datapath.start(try rig.handoffs([0, 1]), activePairs: 1, context: rig.context)
        rig.recorder.clear()
        rig.recorder.failure.withLock { $0 = ("0: VHOST_SET_VRING_ADDR 1 flags 1", EFAULT) }
        #expect {
            try rig.datapath.startDirtyLog()
        } throws: { "\($0)" == "netdev 'n1': vhost-net queue pair 0: VHOST_SET_VRING_ADDR: Bad address" }
        let lines = rig.recorder.recorded
        #expect(Array(lines.suffix(3)) == ["0: VHOST_SET_FEATURES \(hex(VhostKernel.featureVersion1))",
                                           rig.ringAddress(pair: 0, index: 0, logging: false), rig.ringAddress(pair: 0, index: 1, logging: false)])
    }

    // MARK: ownership

    /// RESET_OWNER after the rings stopped (a cpr handover); a later start owns the devices again.
    @Test func releaseAndRetakeOwnership() throws {
        let rig = try Rig(pairs: 2)
        rig.datapath.start(try rig.handoffs([0, 1, 2, 3]), activePairs: 2, context: rig.context)
        rig.recorder.bases.withLock { $0 = ["0/0": 2, "0/1": 3] }
        rig.recorder.clear()
        let rings = try rig.datapath.releaseOwnership()
        #expect(rig.recorder.recorded == rig.stopSequence(pair: 0, rings: [0, 1]) + rig.stopSequence(pair: 1, rings: [2, 3])
            + ["0: VHOST_RESET_OWNER", "1: VHOST_RESET_OWNER"])
        #expect(rings[0]?.lastAvailable == 2 && rings[1]?.lastAvailable == 3)
        rig.recorder.clear()
        rig.datapath.start(try rig.handoffs([0, 1]), activePairs: 1, context: rig.context)
        #expect(rig.recorder.recorded == ["0: VHOST_SET_OWNER", "0: VHOST_GET_FEATURES", "1: VHOST_SET_OWNER", "1: VHOST_GET_FEATURES"]
            + rig.startSequence(pair: 0, rings: [0, 1]))
    }

    // MARK: the real device

    /// The ioctl path itself, on an fd that is no vhost device (this machine has none):
    /// each request reaches the kernel and comes back as ENOTTY, named.
    @Test func realIoctlsOnANonVhostFDNameRequestAndErrno() throws {
        let device = VhostNetDevice(fd: FileDescriptor(adopting: open("/dev/null", O_RDWR | O_CLOEXEC), label: "not vhost"))
        let tap = FileDescriptor(adopting: open("/dev/null", O_RDWR | O_CLOEXEC), label: "not a tap")
        let requests: [VhostKernelRequest] = [.setOwner, .getFeatures, .setFeatures(VhostKernel.featureVersion1),
                                              .getVringBase(index: 1), .netSetBackend(index: 0, tap), .netSetBackend(index: 0, nil),
                                              .setMemTable([VhostMemoryRegion(guestAddress: 0, size: 4096, userAddress: 0x10000)])]
        for request in requests {
            #expect { try device.perform(request) } throws: { "\($0)" == "\(request.name): Inappropriate ioctl for device" }
        }
    }

    // MARK: through the device

    /// The whole path a guest drives: DRIVER_OK hands the transport's rings to the kernel
    /// (addresses from the driver's queue registers, the device's kick/call eventfds),
    /// pause takes the kernel's progress back into the transport, resume starts from it,
    /// and a driver reset stops the rings.
    @Test func deviceLifecycleDrivesTheKernelSequence() throws {
        struct DeviceRig: DriverRig {
            let memory: GuestMemory
            let transport: VirtioPCITransport
        }
        let recorder = Recorder()
        let memory = try GuestMemory(size: 4 << 20)
        let netdev = try VhostKernelNetdev(id: "n1", tap: FakeQueues(queues: 1), devices: [RecordingVhost(pair: 0, recorder: recorder)],
                                           logger: Logger(label: "test"))
        let datapath = try netdev.makeDatapath(pairs: 1, memory: memory, memoryBackend: nil)
        let nic = VirtioNet(id: "nic0", mac: [0x52, 0x54, 0, 1, 2, 3], datapath: datapath, multiQueue: false, logger: Logger(label: "test"))
        let rig = DeviceRig(memory: memory, transport: VirtioPCITransport(name: "nic0", model: nic, memory: memory, logger: Logger(label: "test")))
        rig.placeBAR()
        recorder.clear()
        rig.configure()

        func user(_ gpa: UInt64) -> String { hex(UInt64(UInt(bitPattern: try! memory.slice(at: gpa, count: 1).baseAddress!))) }
        let table = memory.regions.map { "\(hex($0.guestAddress))+\(hex($0.size))@\(hex(UInt64(UInt(bitPattern: memory.hostAddress(of: $0)))))" }
        func started(bases: [UInt16]) -> [String] {
            var lines = ["0: VHOST_SET_FEATURES \(hex(VhostKernel.featureVersion1))", "0: VHOST_SET_MEM_TABLE \(table.joined(separator: " "))"]
            for q in 0..<2 {
                let b = rig.base(q)
                lines += ["0: VHOST_SET_VRING_NUM \(q) 8", "0: VHOST_SET_VRING_BASE \(q) \(bases[q])",
                          "0: VHOST_SET_VRING_ADDR \(q) flags 0 desc \(user(b)) used \(user(b + 0x2000)) avail \(user(b + 0x1000)) log \(hex(b + 0x2000))",
                          "0: VHOST_SET_VRING_KICK \(q) nic0 kick \(q)", "0: VHOST_SET_VRING_CALL \(q) nic0 call \(q)",
                          "0: VHOST_SET_VRING_ERR \(q) netdev n1 vhost error \(q)"]
            }
            return lines + ["0: VHOST_NET_SET_BACKEND 0 netdev n1 TAP queue 0", "0: VHOST_NET_SET_BACKEND 1 netdev n1 TAP queue 0"]
        }
        let stopped = ["0: VHOST_NET_SET_BACKEND 0 -1", "0: VHOST_NET_SET_BACKEND 1 -1", "0: VHOST_GET_VRING_BASE 0", "0: VHOST_GET_VRING_BASE 1"]
        #expect(recorder.recorded == started(bases: [0, 0]))

        // The kernel took 3 RX buffers (used 3) and 2 TX chains (used 2) meanwhile.
        recorder.bases.withLock { $0 = ["0/0": 3, "0/1": 2] }
        try memory.store(UInt16(3), at: rig.base(0) + 0x2002)
        try memory.store(UInt16(2), at: rig.base(1) + 0x2002)
        recorder.clear()
        try rig.transport.pause()
        #expect(recorder.recorded == stopped)
        recorder.clear()
        try rig.transport.resume()
        #expect(recorder.recorded == started(bases: [3, 2]))
        #expect(rig.transport.status & VirtioPCITransport.Status.needsReset == 0)

        // The driver resets the device: the rings stop, nothing restarts.
        recorder.clear()
        rig.bar(0x14, 0, 1)
        #expect(recorder.recorded == stopped)
    }

    /// Local migration at the device level: the source's stop reads the kernel's progress,
    /// its section carries the TAP queue (not the vhost device); the target adopts the
    /// queue, sets its own vhost device up after the load, and starts it at the source's
    /// ring progress when it runs.
    @Test func localMigrationHandsOverTheTapAndTheTargetStartsItsOwnVhost() throws {
        struct DeviceRig: DriverRig {
            let memory: GuestMemory
            let transport: VirtioPCITransport
        }
        func device(_ recorder: Recorder, queues: FakeQueues, memory: GuestMemory) throws -> DeviceRig {
            let netdev = try VhostKernelNetdev(id: "n1", tap: queues, devices: [RecordingVhost(pair: 0, recorder: recorder)], logger: Logger(label: "test"))
            let nic = VirtioNet(id: "nic0", mac: [0x52, 0x54, 0, 1, 2, 3], datapath: try netdev.makeDatapath(pairs: 1, memory: memory, memoryBackend: nil),
                                multiQueue: false, logger: Logger(label: "test"))
            return DeviceRig(memory: memory, transport: VirtioPCITransport(name: "nic0", model: nic, memory: memory, logger: Logger(label: "test")))
        }
        let memory = try GuestMemory(size: 4 << 20, backing: .memfd, shared: true)
        let sourceLog = Recorder()
        let sourceQueues = FakeQueues(queues: 1)
        let source = try device(sourceLog, queues: sourceQueues, memory: memory)
        source.placeBAR()
        source.configure()
        sourceLog.bases.withLock { $0 = ["0/0": 5, "0/1": 4] }
        try memory.store(UInt16(5), at: source.base(0) + 0x2002)
        try memory.store(UInt16(4), at: source.base(1) + 0x2002)
        sourceLog.clear()
        try source.transport.pause()
        #expect(sourceLog.recorded == ["0: VHOST_NET_SET_BACKEND 0 -1", "0: VHOST_NET_SET_BACKEND 1 -1",
                                       "0: VHOST_GET_VRING_BASE 0", "0: VHOST_GET_VRING_BASE 1"])
        let section = source.transport.saveSection(.init(mode: .local))
        #expect(section.fds.map(\.name) == ["netdev/n1/tap.0"])

        // The target (same shared RAM): its own vhost device, set up once the queue came.
        let targetLog = Recorder()
        let target = try device(targetLog, queues: FakeQueues(queues: 1, incoming: true), memory: memory)
        #expect(targetLog.recorded == [])
        let fds = ReceivedFDs()
        fds.append(try section.fds.map { try $0.fd.duplicate() })
        try fds.bind(section.fds.map(\.name), for: "nic0")
        try target.transport.loadSection(section.payload, fds: fds)
        #expect(targetLog.recorded == ["0: VHOST_SET_OWNER", "0: VHOST_GET_FEATURES"])
        try target.transport.checkReadyToRun()
        targetLog.clear()
        try target.transport.resume()
        let lines = targetLog.recorded
        #expect(lines.contains("0: VHOST_SET_VRING_BASE 0 5") && lines.contains("0: VHOST_SET_VRING_BASE 1 4"), "\(lines)")
        // The worker is bound to the fd that came with the stream.
        #expect(lines.suffix(2) == ["0: VHOST_NET_SET_BACKEND 0 received netdev/n1/tap.0", "0: VHOST_NET_SET_BACKEND 1 received netdev/n1/tap.0"], "\(lines)")
        #expect(target.transport.status & VirtioPCITransport.Status.needsReset == 0)
    }
}
