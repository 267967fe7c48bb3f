import CLinux
import Glibc
import Logging
import QMPWire
import Synchronization

/// virtio-net (virtio 1.x, 5.1) over a TAP backend: queue pair i uses TAP queue i.
/// TX runs on the vCPU thread when the guest notifies; RX runs on the event loop when
/// a TAP queue is readable and its RX queue has buffers. Nothing raises interrupts
/// (this host cannot deliver them): the guest polls its used rings, and the VMM wakes
/// a halted vCPU after it delivered packets.
public final class VirtioNet: VirtioDeviceModel, @unchecked Sendable {
    public enum Feature {
        public static let mac: UInt64 = 1 << 5
        public static let status: UInt64 = 1 << 16
        public static let controlQueue: UInt64 = 1 << 17
        public static let multiQueue: UInt64 = 1 << 22
    }

    static let queueSize: UInt16 = 256
    static let maxFrame = 65550

    public let id: String
    public let mac: [UInt8]
    public let maxQueuePairs: Int
    public let multiQueue: Bool
    /// Device property `local-migration`.
    public var localMigration = true
    /// Set from finish-migrate on: the source must not take frames the target should get.
    private let receiveSuspended = Atomic<Bool>(false)
    let backend: NetBackend
    let logger: Logger
    /// Set after the transport exists (it needs this model first).
    weak var transport: VirtioPCITransport?
    private var loop: EventLoop?
    private var wakeGuest: (@Sendable () -> Void)?

    struct Counters {
        var rxPackets: [UInt64]
        var txPackets: [UInt64]
        var txDropped: UInt64 = 0
        var rxDropped: UInt64 = 0
    }

    private let activePairs = Atomic<Int>(0)
    /// Per RX queue: the guest has posted buffers we have not filled (so poll its TAP fd).
    private let rxHasBuffers: Mutex<[Bool]>
    let counters: Mutex<Counters>

    public init(id: String, mac: [UInt8], backend: NetBackend, multiQueue: Bool, logger: Logger) {
        self.id = id
        self.mac = mac
        self.backend = backend
        self.multiQueue = multiQueue
        self.logger = logger
        maxQueuePairs = multiQueue ? backend.queueCount : 1
        rxHasBuffers = Mutex(Array(repeating: false, count: maxQueuePairs))
        counters = Mutex(Counters(rxPackets: Array(repeating: 0, count: maxQueuePairs), txPackets: Array(repeating: 0, count: maxQueuePairs)))
    }

    public var deviceType: UInt16 { 1 }
    public var pciClass: UInt32 { 0x02_00_00 }
    public var deviceFeatures: UInt64 {
        var features = Feature.mac | Feature.status | Feature.controlQueue
        if multiQueue && maxQueuePairs > 1 { features |= Feature.multiQueue }
        return features
    }
    public var queueMaxSizes: [UInt16] { Array(repeating: Self.queueSize, count: 2 * maxQueuePairs + 1) }
    var controlQueueIndex: Int { 2 * maxQueuePairs }

    public func readConfig(offset: Int, size: Int) -> UInt32 {
        var bytes = mac + le16(1) + le16(UInt16(maxQueuePairs)) + le16(1500)
        bytes += [UInt8](repeating: 0, count: 16)
        guard offset >= 0, offset + size <= bytes.count else { return 0 }
        var value: UInt32 = 0
        for i in 0..<size { value |= UInt32(bytes[offset + i]) << (8 * i) }
        return value
    }

    public func writeConfig(offset: Int, size: Int, value: UInt32) {}

    /// Where RX polling runs once the device is resumed; set when the machine plugs it.
    var host: DeviceHost?
    private(set) var isAttached = false

    /// Starts RX polling on the host's loop and lets a halted vCPU receive.
    private func attach(to host: DeviceHost) {
        isAttached = true
        loop = host.loop
        wakeGuest = host.wakeGuest
        host.addHaltWakeSources(haltWakeSources)
        for (pair, fd) in backend.queueFDs.prefix(maxQueuePairs).enumerated() {
            // Unwatched in `shutdown`, while the backend still holds the fd.
            fd.withRaw { fd in host.loop.watch(fd, interest: { [unowned self] in wantsInput(pair: pair) ? Int16(POLLIN) : 0 }) { [unowned self] _ in
                receive(pair: pair)
            } }
        }
    }

    /// Whether pair `pair`'s TAP queue should be read now: the pair is in use and the
    /// guest has posted receive buffers.
    func wantsInput(pair: Int) -> Bool {
        !receiveSuspended.load(ordering: .relaxed) && pair < activePairs.load(ordering: .relaxed) && rxHasBuffers.withLock { $0[pair] }
    }

    // MARK: lifecycle

    /// Stops reading the TAP queues; frames wait in the TAP meanwhile.
    public func pause() throws {
        receiveSuspended.store(true, ordering: .releasing)
        loop?.poke()
    }

    /// Reads the TAP queues (again); a TAP whose queues came with a migration is
    /// watched from here on.
    public func resume() throws {
        if !isAttached, let host, !backend.queueFDs.isEmpty { attach(to: host) }
        receiveSuspended.store(false, ordering: .releasing)
        loop?.poke()
    }

    public func shutdown() {
        for fd in backend.queueFDs { fd.withRaw { loop?.unwatch($0) } }
    }

    public func configuration(_ context: HandoverContext) -> MachineDescription.Device? {
        var properties = [
            "max_queue_pairs": String(maxQueuePairs), "mq": multiQueue ? "on" : "off",
            "mac": mac.map { String($0, radix: 16) }.joined(separator: ":"),
        ]
        // As in the series, `local-migration` only matters together with `local`: both
        // on moves the TAP. With `local` off it changes nothing, and a peer may not
        // have the property at all (the review expects it off towards older peers).
        if context.mode == .local { properties["local-migration"] = localMigration ? "on" : "off" }
        return .init(id: id, type: "virtio-net-pci", properties: properties)
    }

    public func queryInfo(status: UInt8) -> JSONObject? {
        let stats = statistics
        return ["x-virtio-net": [
            "netdev": .string(backend.id), "ifname": .string(backend.ifname),
            "max-queue-pairs": .int(Int64(maxQueuePairs)), "queue-pairs": .int(Int64(queuePairsInUse)),
            "queues": .int(Int64(queueMaxSizes.count)), "status": .int(Int64(status)),
            "rx-packets": .array(stats.rx.map { .int(Int64($0)) }), "tx-packets": .array(stats.tx.map { .int(Int64($0)) }),
        ]]
    }

    /// The TAP queues for a halted vCPU to wait on and receive from directly.
    var haltWakeSources: [VCPURunner.HaltWakeSource] {
        backend.queueFDs.prefix(maxQueuePairs).enumerated().map { pair, fd in
            VCPURunner.HaltWakeSource(fd: fd, wanted: { [unowned self] in wantsInput(pair: pair) }) { [unowned self] in
                receive(pair: pair, wake: false)
            }
        }
    }

    public func activate(features: UInt64) {
        setActivePairs(1)
        rxHasBuffers.withLock { $0 = $0.map { _ in true } }
        loop?.poke()
    }

    public func reset() {
        activePairs.store(0, ordering: .relaxed)
        rxHasBuffers.withLock { $0 = $0.map { _ in false } }
        loop?.poke()
    }

    private func setActivePairs(_ count: Int) {
        activePairs.store(count, ordering: .relaxed)
        backend.attachQueues(count: count)
    }

    public func queueNotified(_ index: Int) {
        if index == controlQueueIndex {
            processControlQueue()
        } else if index % 2 == 1 {
            transmit(pair: index / 2)
        } else if index / 2 < maxQueuePairs {
            // New RX buffers: let the loop poll this pair's TAP queue again.
            rxHasBuffers.withLock { $0[index / 2] = true }
            loop?.poke()
        }
    }

    /// A chain's buffers as iovecs for readv/writev, with its first `header` bytes split
    /// off: the virtio-net header, when the TAP works without one.
    static func iovecs(_ segments: [Virtqueue.Segment], in memory: GuestMemory, splittingOff header: Int) throws
        -> (iov: [iovec], header: [UnsafeMutableRawBufferPointer])
    {
        var iov: [iovec] = []
        var headerSlices: [UnsafeMutableRawBufferPointer] = []
        var skip = header
        for segment in segments {
            var buffer = try memory.slice(at: segment.address, count: Int(segment.length))
            if skip > 0 {
                let cut = min(skip, buffer.count)
                headerSlices.append(UnsafeMutableRawBufferPointer(rebasing: buffer[..<cut]))
                buffer = UnsafeMutableRawBufferPointer(rebasing: buffer[cut...])
                skip -= cut
            }
            if buffer.count > 0 { iov.append(iovec(iov_base: buffer.baseAddress, iov_len: buffer.count)) }
        }
        return (iov, headerSlices)
    }

    // MARK: TX (vCPU thread)

    private func transmit(pair: Int) {
        guard let transport, pair < activePairs.load(ordering: .relaxed) else { return }
        let fd = backend.queueFDs[pair]
        let memory = transport.memory
        let headerToStrip = backend.vnetHeader ? 0 : TapBackend.vnetHeaderSize
        var sent: UInt64 = 0
        var dropped: UInt64 = 0
        _ = transport.withQueue(2 * pair + 1) { queue in
            while let chain = try queue.popAvailable(from: memory) {
                let (iov, _) = try Self.iovecs(chain.readable, in: memory, splittingOff: headerToStrip)
                let n = iov.isEmpty ? 0 : fd.withRaw { writev($0, iov, Int32(iov.count)) }
                if n < 0 { dropped += 1 } else { sent += 1 }
                try queue.pushUsed(head: chain.head, length: 0, to: memory)
            }
        }
        counters.withLock { c in
            c.txPackets[pair] += sent
            c.txDropped += dropped
        }
    }

    // MARK: RX (event loop)

    /// Fills the guest's RX buffers from TAP queue `pair`. `wake`: rouse a halted vCPU
    /// afterwards (not needed when the vCPU thread itself is receiving).
    func receive(pair: Int, wake: Bool = true) {
        guard let transport else { return }
        let fd = backend.queueFDs[pair]
        let memory = transport.memory
        let headerInline = backend.vnetHeader
        var delivered: UInt64 = 0
        let outcome: Bool? = transport.withQueue(2 * pair) { queue in
            // Checked here, not only in the poll interest: the loop runs posted work (a
            // migration's stop and state capture) between its poll and the fd handlers. Under
            // the queue lock, which the capture also takes, a frame is either in the snapshot
            // or still in the TAP, never in RAM the target does not account for.
            guard !receiveSuspended.load(ordering: .acquiring) else { return true }
            while true {
                guard let chain = try queue.popAvailable(from: memory) else { return false }
                let (iov, headerSlices) = try Self.iovecs(
                    chain.writable, in: memory, splittingOff: headerInline ? 0 : TapBackend.vnetHeaderSize)
                guard chain.writableLength >= TapBackend.vnetHeaderSize, !iov.isEmpty else {
                    throw VirtqueueError(description: "RX buffer of \(chain.writableLength) bytes cannot hold the \(TapBackend.vnetHeaderSize)-byte header and a frame")
                }
                let n = fd.withRaw { readv($0, iov, Int32(iov.count)) }
                if n < 0 {
                    // Nothing to read: give the chain back untouched for the next packet.
                    queue.lastAvailable &-= 1
                    return true
                }
                for slice in headerSlices {
                    slice.initializeMemory(as: UInt8.self, repeating: 0)
                    memory.markDirty(slice)
                }
                for v in iov { memory.markDirty(UnsafeMutableRawBufferPointer(start: v.iov_base, count: v.iov_len)) }
                if !headerInline, let first = headerSlices.first, first.count >= 12 {
                    first.storeBytes(of: UInt16(1).littleEndian, toByteOffset: 10, as: UInt16.self)  // num_buffers
                }
                try queue.pushUsed(head: chain.head, length: UInt32(n + (headerInline ? 0 : TapBackend.vnetHeaderSize)), to: memory)
                delivered += 1
            }
        }
        if outcome != true {
            // Out of buffers (or the queue is unusable): stop polling until the guest posts
            // more. Re-check after clearing: a notify that raced with us set the flag first.
            rxHasBuffers.withLock { $0[pair] = false }
            if transport.withQueue(2 * pair, { try $0.hasAvailable(in: memory) }) == true {
                rxHasBuffers.withLock { $0[pair] = true }
            }
        }
        if delivered > 0 {
            counters.withLock { $0.rxPackets[pair] += delivered }
            if wake { wakeGuest?() }
        }
    }

    // MARK: control queue (vCPU thread)

    static let controlClassMQ: UInt8 = 4
    static let controlMQPairsSet: UInt8 = 0

    private func processControlQueue() {
        guard let transport else { return }
        let memory = transport.memory
        // Read before taking the queue: the transport lock is not reentrant.
        let multiQueueNegotiated = transport.negotiatedFeatures & Feature.multiQueue != 0
        _ = transport.withQueue(controlQueueIndex) { queue in
            while let chain = try queue.popAvailable(from: memory) {
                var request: [UInt8] = []
                for segment in chain.readable { request += try memory.read(at: segment.address, count: Int(segment.length)) }
                guard let ack = chain.writable.first, request.count >= 2 else {
                    throw VirtqueueError(description: "control request without header or ack buffer")
                }
                var status: UInt8 = 1
                if request[0] == Self.controlClassMQ && request[1] == Self.controlMQPairsSet && request.count >= 4 {
                    let pairs = Int(UInt16(request[2]) | UInt16(request[3]) << 8)
                    if pairs >= 1 && pairs <= maxQueuePairs && multiQueueNegotiated {
                        setActivePairs(pairs)
                        status = 0
                        logger.debug("\(id): \(pairs) queue pairs active")
                    }
                } else if request[0] == 0 {
                    status = 0  // RX mode (promiscuous, all-multicast): a TAP delivers everything anyway.
                }
                try memory.store(status, at: ack.address)
                try queue.pushUsed(head: chain.head, length: 1, to: memory)
            }
        }
        loop?.poke()
    }

    // MARK: state

    /// How the backend's queues travel with the state (local migration): TAP queues,
    /// each as fd `netdev/<netdev>/tap.<i>`, named by the source's netdev id.
    public struct DatapathDescriptor: Sendable, Equatable {
        public static let kindTapQueues: UInt8 = 1
        public var kind: UInt8
        public var netdev: String
        public var queuePairs: UInt16
        public var vnetHeader: Bool

        public func fdName(queue: Int) -> String { "netdev/\(netdev)/tap.\(queue)" }
    }

    /// The device state beyond the transport: how many queue pairs the guest enabled,
    /// and the TAP queues if they are handed over.
    public struct SavedState: VersionedState {
        public static let version: UInt16 = 1
        public var activePairs: UInt16
        public var handover: DatapathDescriptor?

        public func encode(into w: inout StreamWriter) {
            w.u16(activePairs)
            w.bool(handover != nil)
            if let handover {
                w.u8(handover.kind)
                w.string(handover.netdev)
                w.u16(handover.queuePairs)
                w.bool(handover.vnetHeader)
            }
        }

        public init(decoding r: inout StreamReader, version: UInt16) throws {
            activePairs = try r.u16("active queue pairs")
            guard try r.bool("datapath handed over") else { return }
            let kind = try r.u8("datapath kind")
            guard kind == DatapathDescriptor.kindTapQueues else { throw StreamError("datapath kind \(kind) is not known to this build") }
            handover = DatapathDescriptor(kind: kind, netdev: try r.string("netdev"), queuePairs: try r.u16("queue count"),
                                          vnetHeader: try r.bool("vnet header"))
        }

        init(activePairs: UInt16, handover: DatapathDescriptor?) {
            self.activePairs = activePairs
            self.handover = handover
        }
    }

    /// Whether `context` moves the TAP queues: `local` on and this device's opt-in.
    func handsOverQueues(_ context: HandoverContext) -> Bool { context.mode == .local && localMigration }

    public func handedOverFDs(_ context: HandoverContext) -> [NamedFD] {
        guard handsOverQueues(context) else { return [] }
        let descriptor = DatapathDescriptor(kind: DatapathDescriptor.kindTapQueues, netdev: backend.id, queuePairs: 0, vnetHeader: false)
        return backend.queueFDs.enumerated().map { NamedFD(name: descriptor.fdName(queue: $0), fd: $1) }
    }

    public func modelState(_ context: HandoverContext) -> [UInt8] {
        let handover = handsOverQueues(context)
            ? DatapathDescriptor(kind: DatapathDescriptor.kindTapQueues, netdev: backend.id,
                                 queuePairs: UInt16(backend.queueFDs.count), vnetHeader: backend.vnetHeader)
            : nil
        return SavedState(activePairs: UInt16(activePairs.load(ordering: .relaxed)), handover: handover).encoded()
    }

    /// Restores saved state (the transport validated its own first); adopts the TAP
    /// queues that came along, last.
    public func loadModelState(_ bytes: [UInt8], fds: ReceivedFDs) throws {
        let saved = try SavedState.decode(bytes, owner: id)
        let pairs = Int(saved.activePairs)
        guard pairs <= maxQueuePairs else {
            throw StreamError("\(id): source had \(pairs) queue pairs active, this device has max_queue_pairs \(maxQueuePairs)")
        }
        if let handover = saved.handover {
            guard backend.awaitsIncomingQueues else {
                // The series' tap_pre_load wording, then what it means here.
                throw StreamError("\(id): TAP is already initialized and cannot receive incoming fd: netdev '\(backend.id)' was not created with incoming-fds=on")
            }
            let queues = try (0..<Int(handover.queuePairs)).map { try fds.claim(handover.fdName(queue: $0), by: "netdev '\(backend.id)'") }
            try backend.adoptIncoming(queues, vnetHeader: handover.vnetHeader)
        }
        setActivePairs(pairs)
        rxHasBuffers.withLock { $0 = $0.map { _ in pairs > 0 } }
        loop?.poke()
    }

    public func checkReadyToRun() throws {
        if backend.awaitsIncomingQueues {
            throw StreamError("netdev '\(backend.id)' (incoming-fds=on) received no TAP queues: is migration parameter 'local' on at the source, and local-migration on for \(id)?")
        }
    }

    /// Per-queue packet counts, for queries.
    public var statistics: (rx: [UInt64], tx: [UInt64]) { counters.withLock { ($0.rxPackets, $0.txPackets) } }
    public var queuePairsInUse: Int { activePairs.load(ordering: .relaxed) }
}
