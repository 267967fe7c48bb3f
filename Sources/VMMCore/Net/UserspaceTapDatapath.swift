import CLinux
import Glibc
import Synchronization

/// The datapath in this process over packet queues (a TAP's): queue pair i uses queue i.
/// TX runs on the vCPU thread when the guest notifies; RX runs on the event loop when a
/// queue is readable and its RX ring has buffers, or on the halted vCPU itself. Nothing
/// raises interrupts (this host cannot deliver them): the guest polls its used rings,
/// and a halted vCPU is woken after RX.
public final class UserspaceTapDatapath: NetDatapath, @unchecked Sendable {
    /// One ring and what it needs while it runs; nil queue: not running here.
    struct Ring {
        var queue: Virtqueue?
        var context: DatapathContext?
    }

    /// A lock of its own per ring (a Mutex cannot live in an array by itself).
    final class RingSlot: Sendable {
        let ring = Mutex(Ring())
    }

    struct Counters {
        var rxPackets: [UInt64]
        var txPackets: [UInt64]
        var txDropped: UInt64 = 0
    }

    let queues: NetBackend
    public let queuePairs: Int
    /// Per virtqueue index (2p RX, 2p+1 TX), each under its own lock: TX on the vCPU,
    /// RX on the loop and `stop` never wait for each other's rings.
    private let rings: [RingSlot]
    private let activePairs = Atomic<Int>(0)
    /// A ring failed: the device needs a reset, so no ring runs until the next `start`.
    private let failed = Atomic<Bool>(false)
    /// Per RX ring: the guest has posted buffers we have not filled (so poll its queue).
    private let rxHasBuffers: Mutex<[Bool]>
    private let counters: Mutex<Counters>
    private var host: DeviceHost?

    /// `pairs`: the queue pairs the device uses (at most the netdev's queues).
    public init(queues: NetBackend, pairs: Int) {
        self.queues = queues
        queuePairs = pairs
        rings = (0..<2 * pairs).map { _ in RingSlot() }
        rxHasBuffers = Mutex(Array(repeating: false, count: pairs))
        counters = Mutex(Counters(rxPackets: Array(repeating: 0, count: pairs), txPackets: Array(repeating: 0, count: pairs)))
    }

    public var netdevID: String { queues.id }
    public var ifname: String { queues.ifname }
    public var kind: DatapathKind { .userspace }
    public var notification: DatapathNotification { .inline }
    public var vnetHeader: Bool { queues.vnetHeader }

    // MARK: host side

    /// Watches the queues on the host's loop and lets a halted vCPU receive; a netdev
    /// whose queues come with a migration is attached once they did.
    public func attach(to host: DeviceHost) {
        guard self.host == nil, !queues.queueFDs.isEmpty else { return }
        self.host = host
        host.setHaltWakeSources("netdev \(queues.id)", haltWakeSources)
        for (pair, fd) in queues.queueFDs.prefix(queuePairs).enumerated() {
            // Unwatched in `detach`, while the backend still holds the fd.
            fd.withRaw { fd in
                host.loop.watch(fd, interest: { [unowned self] in wantsInput(pair: pair) ? Int16(POLLIN) : 0 }) { [unowned self] _ in
                    receive(pair: pair)
                }
            }
        }
    }

    public func detach() {
        for fd in queues.queueFDs { fd.withRaw { host?.loop.unwatch($0) } }
    }

    /// The queues for a halted vCPU to wait on and receive from directly.
    var haltWakeSources: [VCPURunner.HaltWakeSource] {
        queues.queueFDs.prefix(queuePairs).enumerated().map { pair, fd in
            VCPURunner.HaltWakeSource(fd: fd, wanted: { [unowned self] in wantsInput(pair: pair) }) { [unowned self] in
                receive(pair: pair, wake: false)
            }
        }
    }

    /// Whether pair `pair`'s queue should be read now: its RX ring runs, the pair is in
    /// use and the guest has posted receive buffers.
    func wantsInput(pair: Int) -> Bool {
        pair < activePairs.load(ordering: .relaxed) && !failed.load(ordering: .relaxed) && rxHasBuffers.withLock { $0[pair] }
    }

    public func handedOverFDs() -> [NamedFD] {
        queues.queueFDs.enumerated().map { NamedFD(name: NamedFD.tapQueueName(netdev: queues.id, queue: $0), fd: $1) }
    }

    public var awaitsIncomingFDs: Bool { queues.awaitsIncomingQueues }

    public var handsOverForCPR: Bool { queues.cpr }

    /// The queues stop being polled, by the loop and by a halted vCPU: from here on the
    /// next process reads them. Frames that arrive meanwhile wait in the TAP.
    public func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD] {
        guard let host else { return [] }
        detach()
        host.setHaltWakeSources("netdev \(queues.id)", [])
        self.host = nil
        return []
    }

    public func cancelHandover(_ context: HandoverContext, host: DeviceHost) { attach(to: host) }

    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws {
        try queues.adoptIncoming(fds, vnetHeader: vnetHeader)
    }

    // MARK: rings

    public func start(_ handed: [Int: RingHandoff], activePairs pairs: Int, context: DatapathContext) {
        failed.store(false, ordering: .relaxed)
        for (index, ring) in handed where index < rings.count {
            rings[index].ring.withLock { $0 = Ring(queue: ring.queue, context: context) }
        }
        rxHasBuffers.withLock { $0 = $0.indices.map { handed[2 * $0] != nil } }
        setActivePairs(pairs)
    }

    /// Clears each ring under its lock, which RX holds while it fills a ring: a frame is
    /// either in the returned progress or still in the TAP, never in RAM the caller
    /// does not account for.
    public func stop() -> [Int: Virtqueue] {
        var returned: [Int: Virtqueue] = [:]
        for (index, ring) in rings.enumerated() {
            if let queue = ring.ring.withLock({ r -> Virtqueue? in defer { r = Ring() }; return r.queue }) { returned[index] = queue }
        }
        activePairs.store(0, ordering: .relaxed)
        rxHasBuffers.withLock { $0 = $0.map { _ in false } }
        host?.loop.poke()
        return returned
    }

    public func setActivePairs(_ pairs: Int) {
        activePairs.store(pairs, ordering: .relaxed)
        queues.attachQueues(count: pairs)
        host?.loop.poke()
    }

    public func notified(_ index: Int) {
        if index % 2 == 1 {
            transmit(pair: index / 2)
        } else if index / 2 < queuePairs {
            // New RX buffers: let the loop poll this pair's queue again.
            rxHasBuffers.withLock { $0[index / 2] = true }
            host?.loop.poke()
        }
    }

    /// Runs `body` on ring `index` if it runs here; an error stops every ring and
    /// reports the ring (the device then needs a reset).
    private func withRing<R>(_ index: Int, _ body: (inout Virtqueue, GuestMemory) throws -> R) -> R? {
        var failure: (DatapathContext, String)?
        let result: R? = rings[index].ring.withLock { ring in
            guard !failed.load(ordering: .relaxed), var queue = ring.queue, let context = ring.context else { return nil }
            defer { ring.queue = queue }
            do {
                return try body(&queue, context.memory)
            } catch {
                if !failed.exchange(true, ordering: .relaxed) { failure = (context, "\(error)") }
                return nil
            }
        }
        if let (context, message) = failure { context.ringFailed(index, message) }
        return result
    }

    /// A chain's buffers as iovecs for readv/writev, with its first `header` bytes split
    /// off: the virtio-net header, when the TAP works without one.
    static func iovecs(_ segments: [Virtqueue.Segment], in memory: some GuestRAM, splittingOff header: Int) throws
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
        guard pair < activePairs.load(ordering: .relaxed) else { return }
        let fd = queues.queueFDs[pair]
        let headerToStrip = queues.vnetHeader ? 0 : TapBackend.vnetHeaderSize
        var sent: UInt64 = 0
        var dropped: UInt64 = 0
        _ = withRing(2 * pair + 1) { queue, memory in
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

    // MARK: RX (event loop, or the halted vCPU)

    /// IOV_MAX on Linux: the most segments one readv fills.
    static let maxReceiveSegments = 1024

    /// Fills the guest's RX buffers from queue `pair`. `wake`: rouse a halted vCPU
    /// afterwards (not needed when the vCPU thread itself is receiving).
    func receive(pair: Int, wake: Bool = true) {
        let fd = queues.queueFDs[pair]
        let headerInline = queues.vnetHeader
        var delivered: UInt64 = 0
        // Under the ring's lock, which `stop` also takes: once it returned, nothing is read.
        let outcome: Bool? = withRing(2 * pair) { queue, memory in
            while true {
                guard let chain = try queue.popAvailable(from: memory) else { return false }
                let (iov, headerSlices) = try Self.iovecs(
                    chain.writable, in: memory, splittingOff: headerInline ? 0 : TapBackend.vnetHeaderSize)
                guard chain.writableLength >= TapBackend.vnetHeaderSize, !iov.isEmpty else {
                    throw VirtqueueError(description: "RX buffer of \(chain.writableLength) bytes cannot hold the \(TapBackend.vnetHeaderSize)-byte header and a frame")
                }
                // readv fails on more, for every frame: the frame would stay in the TAP, and
                // the loop, still wanting input, would poll its fd again at once, forever.
                guard iov.count <= Self.maxReceiveSegments else {
                    throw VirtqueueError(description: "RX chain of \(iov.count) segments, more than the \(Self.maxReceiveSegments) one read can fill")
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
        if outcome == false {
            // Out of buffers: stop polling until the guest posts more. Re-check after
            // clearing: a notify that raced with us set the flag first.
            rxHasBuffers.withLock { $0[pair] = false }
            if withRing(2 * pair, { queue, memory in try queue.hasAvailable(in: memory) }) == true {
                rxHasBuffers.withLock { $0[pair] = true }
            }
        } else if outcome == nil {
            rxHasBuffers.withLock { $0[pair] = false }
        }
        if delivered > 0 {
            counters.withLock { $0.rxPackets[pair] += delivered }
            if wake { host?.wakeGuest() }
        }
    }

    public var statistics: (rx: [UInt64], tx: [UInt64]) { counters.withLock { ($0.rxPackets, $0.txPackets) } }
}
