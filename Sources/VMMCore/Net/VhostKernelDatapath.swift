import Glibc
import Logging
import Synchronization

/// `-netdev tap,...,vhost=on`: a TAP whose queues the kernel's vhost-net workers serve,
/// one `/dev/vhost-net` device per queue pair (QEMU's `net_init_tap` + `vhost_net_init`).
/// The TAP is the same `TapBackend` a userspace datapath uses (opened, passed in, or
/// arriving with a local migration; any packet queues in tests); the vhost devices are
/// opened here and never migrated.
public final class VhostKernelNetdev: NetBackend, @unchecked Sendable {
    public let id: String
    let tap: any NetBackend
    /// Pair p's device (rings 0 = RX 2p, 1 = TX 2p+1), owned here.
    let devices: [any VhostKernelIO]
    let logger: Logger
    /// Per owned pair, in order, what GET_FEATURES offered; empty until set up (an
    /// `incoming-fds=on` TAP's devices are set up once its queues arrived, as the series'
    /// `tap_post_load` does).
    private let offered = Mutex<[UInt64]>([])

    /// `devices`: one per TAP queue. Sets them up now unless the TAP's queues come later.
    public init(id: String, tap: any NetBackend, devices: [any VhostKernelIO], logger: Logger) throws {
        guard devices.count == tap.queueCount else {
            throw VhostKernelError("netdev '\(id)': \(devices.count) vhost-net devices for \(tap.queueCount) TAP queues")
        }
        self.id = id
        self.tap = tap
        self.devices = devices
        self.logger = logger
        if !tap.awaitsIncomingQueues { try setUp() }
    }

    /// Opens `/dev/vhost-net` once per queue; the error names the netdev and the errno.
    public static func openDevices(id: String, count: Int, path: String = VhostKernel.devicePath) throws -> [any VhostKernelIO] {
        try (0..<count).map { pair in
            do {
                return try VhostNetDevice.open(label: deviceLabel(id, pair), path: path)
            } catch {
                throw VhostKernelError("cannot open \(path) for netdev '\(id)': \(error)", errno: (error as? VhostKernelError)?.errno)
            }
        }
    }

    static func deviceLabel(_ id: String, _ pair: Int) -> String { "netdev \(id) vhost-net \(pair)" }

    /// Where a `vhost=on` netdev's devices come from: on a cpr-transfer target, for a
    /// `cpr=on` netdev (`cpr`: the migration whose cpr state arrived), the source's fds by
    /// name, `netdev/<id>/vhost.<pair>`, which the source gave up (RESET_OWNER) before it
    /// sent them, so this process's SET_OWNER succeeds, and nothing is opened; else the
    /// inherited `vhostfds=` (copies; the originals stay with whoever passed them); else
    /// `/dev/vhost-net` at `path`, once per queue. `device` wraps each fd (tests record).
    static func devices(id: String, queues: Int, cpr: IncomingMigration?, inherited: [Int32]?, path: String = VhostKernel.devicePath,
                        device: (FileDescriptor) -> any VhostKernelIO = { VhostNetDevice(fd: $0) }) throws -> [any VhostKernelIO] {
        if let cpr {
            guard let entry = cpr.cprState?.netdev(id), entry.vhostKind == .kernel else {
                throw VhostKernelError("netdev '\(id)' is cpr=on, but the cpr state hands over no vhost-net devices for it (was the source's netdev vhost=on and cpr=on?)")
            }
            return try (0..<Int(entry.queues)).map { pair in
                device(try cpr.claimCPRFD(entry.vhostFDName(pair: pair), by: "netdev '\(id)' (vhost=on)"))
            }
        }
        if let inherited {
            return try inherited.enumerated().map { pair, fd in
                device(try FileDescriptor.duplicating(inherited: fd, label: deviceLabel(id, pair)))
            }
        }
        return try openDevices(id: id, count: queues, path: path)
    }

    /// Runs `request` on pair `pair`'s device; errors name the netdev, the pair and the ioctl.
    @discardableResult
    func perform(_ request: VhostKernelRequest, pair: Int) throws -> UInt64 {
        do {
            return try devices[pair].perform(request)
        } catch {
            throw VhostKernelError("netdev '\(id)': vhost-net queue pair \(pair): \(error)", errno: (error as? VhostKernelError)?.errno)
        }
    }

    /// QEMU's `vhost_dev_init` for each pair: SET_OWNER (this process's memory), then
    /// GET_FEATURES, which must offer VERSION_1, and VIRTIO_NET_HDR when the TAP has no
    /// vnet header (vhost then adds it), else the guest's frames would be misread.
    /// A pair that fails is given up again (RESET_OWNER), so the next call retries it;
    /// the pairs before it stay owned.
    func setUp() throws {
        for pair in offered.withLock({ $0.count })..<devices.count {
            try perform(.setOwner, pair: pair)
            do {
                let features = try perform(.getFeatures, pair: pair)
                let needed = VhostKernel.featureVersion1 | (tap.vnetHeader ? 0 : VhostKernel.featureVirtioNetHeader)
                guard features & needed == needed else {
                    throw VhostKernelError("netdev '\(id)': vhost-net queue pair \(pair) lacks features \(hex(needed & ~features)) (offers \(hex(features)))")
                }
                offered.withLock { $0.append(features) }
            } catch {
                _ = try? perform(.resetOwner, pair: pair)
                throw error
            }
        }
    }

    /// Whether the devices are owned and their features known (`setUp` ran).
    var isSetUp: Bool { offered.withLock { $0.count == devices.count } }

    /// Whether every pair's device offers the dirty log (VHOST_F_LOG_ALL).
    var offersDirtyLog: Bool { isSetUp && offered.withLock { $0.allSatisfy { $0 & VhostKernel.featureLogAll != 0 } } }

    /// VHOST_RESET_OWNER on every pair: the kernel drops the memory table, rings, features
    /// and log, and another process (or this one, with `setUp`) may SET_OWNER the device.
    func resetOwner() throws {
        offered.withLock { $0 = [] }
        for pair in devices.indices { try perform(.resetOwner, pair: pair) }
    }

    /// What SET_FEATURES sends: the acked ring features the kernel acts on, VIRTIO_NET_HDR
    /// for a TAP without a vnet header, LOG_ALL while the dirty log is on. The device
    /// offers no ring feature but VERSION_1 (no INDIRECT_DESC, EVENT_IDX, MRG_RXBUF), so
    /// that is the guest's whole acked set within `guestFeatureMask`.
    func features(logging: Bool) -> UInt64 {
        VhostKernel.featureVersion1 & VhostKernel.guestFeatureMask
            | (tap.vnetHeader ? 0 : VhostKernel.featureVirtioNetHeader)
            | (logging ? VhostKernel.featureLogAll : 0)
    }

    // MARK: NetBackend

    public var ifname: String { tap.ifname }
    public var cpr: Bool { tap.cpr }
    public var cprVhostKind: CPRState.VhostKind { .kernel }
    public var queueFDs: [FileDescriptor] { tap.queueFDs }
    public var queueCount: Int { tap.queueCount }
    public var vnetHeader: Bool { tap.vnetHeader }
    public func attachQueues(count: Int) { tap.attachQueues(count: count) }
    public var awaitsIncomingQueues: Bool { tap.awaitsIncomingQueues }

    /// The TAP queues a local migration passed, then vhost set up on them (the series'
    /// `tap_post_load` → `tap_setup_vhost`, with its wording).
    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws {
        try tap.adoptIncoming(fds, vnetHeader: vnetHeader)
        do { try setUp() } catch { throw StreamError("Failed to setup vhost during TAP post-load: \(error)") }
    }

    public func makeDatapath(pairs: Int, memory: GuestMemory, memoryBackend: String?) throws -> NetDatapath {
        try VhostKernelDatapath(netdev: self, pairs: pairs, memory: memory)
    }

    /// The netdev ends (after its NIC stopped the rings): the pairs this process owns are
    /// given up. Closing is not enough for a device another process holds too (a
    /// cpr-transfer target that failed, whose source still has the same device): the
    /// kernel keeps it owned by this process's memory until RESET_OWNER or the last
    /// close, and the source's SET_OWNER would fail with EBUSY for good. A source whose
    /// handover completed owns nothing any more, so it sends nothing.
    public func shutdown() {
        let owned = offered.withLock { owned in
            defer { owned = [] }
            return owned.count
        }
        for pair in 0..<owned { _ = try? perform(.resetOwner, pair: pair) }
        tap.shutdown()
    }
}

/// The rings of a vhost=on TAP, run by the kernel: `start` gives each pair's device the
/// features, the memory table and its rings (NUM, BASE, ADDR, KICK, CALL, ERR), then binds
/// the TAP queue (NET_SET_BACKEND), as QEMU's `vhost_net_start_one`; `stop` unbinds the TAP
/// first (frames wait in it, and no worker polls a TAP a migration target may adopt),
/// then GET_VRING_BASE per ring, plus the used index from guest RAM. During pre-copy the
/// kernel logs its writes (VHOST_F_LOG_ALL, SET_LOG_BASE, rings with VHOST_VRING_F_LOG)
/// in a `VhostDirtyLog`, as QEMU's `vhost_migration_log` turns it on and off.
public final class VhostKernelDatapath: NetDatapath, @unchecked Sendable {
    let netdev: VhostKernelNetdev
    public let queuePairs: Int
    let memory: GuestMemory
    /// Per virtqueue index: the eventfd the kernel signals when it cannot use the ring.
    private let errorFDs: [EventFD]

    struct Running {
        var rings: [Int: Virtqueue]
        /// Rings whose TAP is bound (their progress lives in the kernel until unbound).
        var bound: Set<Int>
        /// Pairs whose device got features, memory table and rings (the log follows them).
        var configured: [Int]
        var context: DatapathContext
        /// As handed over (kick/call eventfds), to start them later while ownership waits.
        var handoffs: [Int: RingHandoff]
    }
    /// The running rings and the dirty log, changed together: the ioctls that start, stop
    /// and toggle logging run under this lock, so none sees the others half done.
    struct State {
        var running: Running?
        var log: VhostDirtyLog?
        /// The rings wait for the devices' ownership (SET_OWNER refused with EBUSY after
        /// a cancelled cpr-transfer: the target still owns them until it ends); retried
        /// on the loop until this deadline (monotonic ns).
        var ownershipDeadline: Int64?
    }
    private let state = Mutex(State())
    private var host: DeviceHost?

    init(netdev: VhostKernelNetdev, pairs: Int, memory: GuestMemory) throws {
        self.netdev = netdev
        queuePairs = pairs
        self.memory = memory
        errorFDs = try (0..<2 * pairs).map { try EventFD(label: "netdev \(netdev.id) vhost error \($0)") }
    }

    public var netdevID: String { netdev.id }
    public var ifname: String { netdev.ifname }
    public var kind: DatapathKind { .vhostKernel }
    public var notification: DatapathNotification { .eventFDs }
    public var vnetHeader: Bool { netdev.vnetHeader }
    public var awaitsIncomingFDs: Bool { netdev.awaitsIncomingQueues }
    /// The kernel counts nothing the VMM can read.
    public var statistics: (rx: [UInt64], tx: [UInt64]) { (Array(repeating: 0, count: queuePairs), Array(repeating: 0, count: queuePairs)) }
    public func notified(_ index: Int) {}

    /// The TAP queues travel (local migration) as a userspace TAP's do; the vhost devices
    /// do not: the target opens its own.
    public func handedOverFDs() -> [NamedFD] {
        netdev.queueFDs.enumerated().map { NamedFD(name: "netdev/\(netdev.id)/tap.\($0)", fd: $1) }
    }

    public func adoptIncoming(_ fds: [FileDescriptor], vnetHeader: Bool) throws {
        try netdev.adoptIncoming(fds, vnetHeader: vnetHeader)
    }

    /// The kernel's ring errors (SET_VRING_ERR) mark the device NEEDS_RESET, as a
    /// userspace ring error does.
    public func attach(to host: DeviceHost) {
        guard self.host == nil else { return }
        self.host = host
        for (index, error) in errorFDs.enumerated() {
            error.fd.withRaw { fd in
                host.loop.watch(fd) { [unowned self] _ in
                    error.drain()
                    state.withLock { $0.running?.context }?.ringFailed(index, "vhost-net (netdev '\(netdev.id)') reported an error on this ring")
                }
            }
        }
    }

    public func detach() {
        for error in errorFDs { error.fd.withRaw { host?.loop.unwatch($0) } }
    }

    // MARK: rings

    /// How long the rings wait for a device another process still owns (see `State`).
    static let ownershipWait: Int64 = 5_000_000_000
    static let ownershipRetry: Int64 = 10_000_000

    public func start(_ rings: [Int: RingHandoff], activePairs: Int, context: DatapathContext) {
        let (failure, waiting) = state.withLock { s -> ((ring: Int, message: String)?, Bool) in
            var running = Running(rings: rings.mapValues(\.queue), bound: [], configured: [], context: context, handoffs: rings)
            defer { s.running = running }
            netdev.attachQueues(count: activePairs)
            do {
                // After RESET_OWNER (a handover that was taken back), own the devices again.
                if !netdev.isSetUp { try netdev.setUp() }
            } catch let error as VhostKernelError where error.errno == EBUSY && host != nil {
                // A cpr-transfer target that took the devices has not let go yet (it does
                // when it ends): the rings wait for them instead of failing the device.
                s.ownershipDeadline = monotonicNanoseconds() + Self.ownershipWait
                netdev.logger.warning("\(error); another process (a cpr-transfer target) still owns the device: the rings wait for it up to \(Self.ownershipWait / 1_000_000_000) s")
                return (nil, true)
            } catch {
                return ((rings.keys.min() ?? 0, "\(error)"), false)
            }
            s.ownershipDeadline = nil
            return (startPairs(&running, log: s.log), false)
        }
        if let failure { context.ringFailed(failure.ring, failure.message) }
        if waiting, let loop = host?.loop { loop.post { [weak self] in self?.retryOwnership() } }
    }

    /// Each pair with rings: configured and bound, or on failure everything unbound again.
    private func startPairs(_ running: inout Running, log: VhostDirtyLog?) -> (ring: Int, message: String)? {
        for pair in 0..<queuePairs {
            let pairRings = [2 * pair, 2 * pair + 1].filter { running.handoffs[$0] != nil }
            guard !pairRings.isEmpty else { continue }
            do {
                try startPair(pair, rings: pairRings.map { ($0, running.handoffs[$0]!) }, log: log, running: &running)
            } catch {
                // Nothing runs on a device that needs a reset: unbind what was bound.
                stopRings(&running)
                return (pairRings[0], "\(error)")
            }
        }
        return nil
    }

    /// Loop thread, while the rings wait for ownership: SET_OWNER again every 10 ms; once
    /// it succeeds the rings start as `start` would have; past the deadline the device
    /// needs a reset, naming why.
    private func retryOwnership() {
        let outcome = state.withLock { s -> (failure: (ring: Int, message: String)?, context: DatapathContext?, again: Bool) in
            guard let deadline = s.ownershipDeadline, var running = s.running else { return (nil, nil, false) }
            do {
                try netdev.setUp()
            } catch let error as VhostKernelError where error.errno == EBUSY && monotonicNanoseconds() < deadline {
                return (nil, nil, true)
            } catch {
                s.ownershipDeadline = nil
                return (((running.rings.keys.min() ?? 0), "\(error) (still owned by another process after \(Self.ownershipWait / 1_000_000_000) s)"), running.context, false)
            }
            s.ownershipDeadline = nil
            netdev.logger.info("netdev '\(netdev.id)': vhost-net devices owned again; the rings start")
            let failure = startPairs(&running, log: s.log)
            s.running = running
            return (failure, running.context, false)
        }
        if let failure = outcome.failure { outcome.context?.ringFailed(failure.ring, failure.message) }
        if outcome.again, let loop = host?.loop { loop.after(nanoseconds: Self.ownershipRetry) { [weak self] in self?.retryOwnership() } }
    }

    /// QEMU's `vhost_dev_start` + `vhost_net_start_one` for one pair; `running` gains the
    /// pair once configured and each ring whose TAP got bound, so a failure part-way can
    /// undo exactly that. With a dirty log, the log's base comes first, so the kernel
    /// accepts LOG_ALL and the rings' log flag.
    private func startPair(_ pair: Int, rings: [(index: Int, handoff: RingHandoff)], log: VhostDirtyLog?, running: inout Running) throws {
        if let log { try netdev.perform(.setLogBase(log.address), pair: pair) }
        try netdev.perform(.setFeatures(netdev.features(logging: log != nil)), pair: pair)
        try netdev.perform(.setMemTable(Self.memoryTable(memory)), pair: pair)
        for (index, ring) in rings {
            let q = ring.queue
            let local = UInt32(index % 2)
            guard let kick = ring.kick, let call = ring.call else {
                throw VhostKernelError("netdev '\(netdev.id)': ring \(index) has no kick/call eventfd")
            }
            try netdev.perform(.setVringNum(VhostVringState(index: local, num: UInt32(q.size))), pair: pair)
            try netdev.perform(.setVringBase(VhostVringState(index: local, num: UInt32(q.lastAvailable))), pair: pair)
            try netdev.perform(.setVringAddr(Self.ringAddress(q, local: local, memory: memory, logging: log != nil)), pair: pair)
            try netdev.perform(.setVringKick(index: local, kick.fd), pair: pair)
            try netdev.perform(.setVringCall(index: local, call.fd), pair: pair)
            try netdev.perform(.setVringErr(index: local, errorFDs[index].fd), pair: pair)
        }
        running.configured.append(pair)
        let tapQueue = netdev.queueFDs[pair]
        for (index, _) in rings {
            try netdev.perform(.netSetBackend(index: UInt32(index % 2), tapQueue), pair: pair)
            running.bound.insert(index)
        }
    }

    /// One entry per RAM region with its own address in this process.
    static func memoryTable(_ memory: GuestMemory) -> [VhostMemoryRegion] {
        memory.regions.map { r in
            VhostMemoryRegion(guestAddress: r.guestAddress, size: r.size, userAddress: UInt64(UInt(bitPattern: memory.hostAddress(of: r))))
        }
    }

    /// The ring's parts at their addresses in this process (the transport validated the
    /// layout inside RAM); the log address is the used ring's guest address, as QEMU's
    /// `vhost_virtqueue_set_addr` gives it.
    static func ringAddress(_ q: Virtqueue, local: UInt32, memory: GuestMemory, logging: Bool) throws -> VhostVringAddress {
        func user(_ gpa: UInt64) throws -> UInt64 { UInt64(UInt(bitPattern: try memory.slice(at: gpa, count: 1).baseAddress!)) }
        return VhostVringAddress(index: local, flags: logging ? VhostKernel.vringFlagLog : 0, descriptor: try user(q.descriptorTable),
                                 used: try user(q.deviceArea), available: try user(q.driverArea), log: q.deviceArea)
    }

    public func stop() -> [Int: Virtqueue] {
        state.withLock { s in
            guard var running = s.running else { return [:] }
            s.running = nil
            s.ownershipDeadline = nil
            stopRings(&running)
            return running.rings
        }
    }

    /// Unbinds the TAP from every bound ring of a pair, then reads each ring's next
    /// available index (GET_VRING_BASE) and used index (guest RAM). A ring whose base
    /// cannot be read resumes at its used index (QEMU's `virtio_queue_restore_last_avail_idx`).
    private func stopRings(_ running: inout Running) {
        for pair in 0..<queuePairs {
            let pairRings = [2 * pair, 2 * pair + 1].filter { running.bound.contains($0) }
            guard !pairRings.isEmpty else { continue }
            for index in pairRings {
                do { try netdev.perform(.netSetBackend(index: UInt32(index % 2), nil), pair: pair) } catch {
                    netdev.logger.error("\(error)")
                }
            }
            for index in pairRings {
                guard var queue = running.rings[index] else { continue }
                do { queue.usedIndex = try memory.load(UInt16.self, at: queue.deviceArea + 2) } catch {}
                do {
                    queue.lastAvailable = UInt16(truncatingIfNeeded: try netdev.perform(.getVringBase(index: UInt32(index % 2)), pair: pair))
                } catch {
                    netdev.logger.error("\(error); ring \(index) resumes at its used index \(queue.usedIndex)")
                    queue.lastAvailable = queue.usedIndex
                }
                running.rings[index] = queue
            }
        }
        running.bound = []
        running.configured = []
    }

    /// Every ring of the pairs the device has keeps running (QEMU starts them all); the
    /// TAP steers frames only to the pairs in use.
    public func setActivePairs(_ pairs: Int) {
        netdev.attachQueues(count: pairs)
    }

    // MARK: dirty log

    /// Pre-copy starts: a log covering guest RAM; running pairs switch to logging now
    /// (SET_LOG_BASE, SET_FEATURES with LOG_ALL, each ring's address with the log flag:
    /// QEMU's `vhost_dev_log_resize` + `vhost_dev_set_log`), stopped ones when they start.
    public func startDirtyLog() throws {
        guard netdev.offersDirtyLog else {
            throw VhostKernelError("netdev '\(netdev.id)': vhost-net does not offer VHOST_F_LOG_ALL, so its writes to guest RAM cannot be logged for pre-copy")
        }
        let log = try VhostDirtyLog(covering: memory)
        try state.withLock { s in
            guard s.log == nil else { return }
            s.log = log
            do {
                try switchLogging(on: log, s.running)
            } catch {
                s.log = nil
                try? switchLogging(on: nil, s.running)
                throw error
            }
        }
    }

    public func collectDirty(into bitmap: inout [UInt64]) {
        state.withLock { $0.log }?.collect(into: &bitmap)
    }

    /// Pre-copy ended: running pairs stop logging (features without LOG_ALL, rings without
    /// the flag), and the log goes; the kernel writes no log once both are off.
    public func stopDirtyLog() {
        state.withLock { s in
            guard s.log != nil else { return }
            s.log = nil
            do { try switchLogging(on: nil, s.running) } catch { netdev.logger.error("\(error)") }
        }
    }

    /// Turns the configured pairs' logging on (`log`) or off (nil); under the state lock.
    private func switchLogging(on log: VhostDirtyLog?, _ running: Running?) throws {
        guard let running else { return }
        for pair in running.configured {
            if let log { try netdev.perform(.setLogBase(log.address), pair: pair) }
            try netdev.perform(.setFeatures(netdev.features(logging: log != nil)), pair: pair)
            for index in [2 * pair, 2 * pair + 1] {
                guard let q = running.rings[index] else { continue }
                try netdev.perform(.setVringAddr(Self.ringAddress(q, local: UInt32(index % 2), memory: memory, logging: log != nil)), pair: pair)
            }
        }
    }

    // MARK: ownership

    public var handsOverForCPR: Bool { netdev.cpr }

    /// cpr-transfer's setup notifier (003's `vhost_reset_owner`), the device paused: the
    /// rings stop (already, by the pause) and every pair's device is given up
    /// (RESET_OWNER) before the cpr state is sent, so the next process's SET_OWNER cannot
    /// fail with EBUSY; the devices' fds travel beside the TAP queues as
    /// `netdev/<id>/vhost.<pair>`. From here this process issues no ioctl on them unless
    /// the handover is cancelled.
    public func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD] {
        _ = try releaseOwnership()
        return netdev.devices.enumerated().map { pair, device in NamedFD(name: NamedFD.vhostDeviceName(netdev: netdev.id, pair: pair), fd: device.fd) }
    }

    /// The handover failed or was cancelled: own the devices again (SET_OWNER, features)
    /// now, so the resume that follows starts the rings as before. A failure is logged; the
    /// next start retries it: while a target still owns the devices (EBUSY) its rings wait
    /// for them (`retryOwnership`), any other failure marks the device NEEDS_RESET.
    public func cancelHandover(_ context: HandoverContext, host: DeviceHost) {
        attach(to: host)
        do { try netdev.setUp() } catch { netdev.logger.error("taking vhost-net back after a cancelled cpr-transfer: \(error)") }
    }

    /// Gives the devices up (VHOST_RESET_OWNER), stopping the rings first, so another
    /// process can own them (cpr-transfer passes vhost fds); the returned rings are the
    /// device's progress. A later `start` takes ownership back (SET_OWNER) before it runs.
    public func releaseOwnership() throws -> [Int: Virtqueue] {
        let rings = stop()
        try netdev.resetOwner()
        return rings
    }
}
