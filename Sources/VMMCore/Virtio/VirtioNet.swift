import Logging
import QMPWire
import Synchronization

/// virtio-net (virtio 1.x, 5.1): config space (MAC, status, queue pairs, MTU), feature
/// negotiation, the control queue (on the vCPU thread) and the number of queue pairs in
/// use. Its RX/TX rings run in a `NetDatapath`, which gets them when the driver
/// activates the device and gives them back when it is reset or paused.
public final class VirtioNet: VirtioDeviceModel, @unchecked Sendable {
    public enum Feature {
        public static let mac: UInt64 = 1 << 5
        public static let status: UInt64 = 1 << 16
        public static let controlQueue: UInt64 = 1 << 17
        public static let multiQueue: UInt64 = 1 << 22
    }

    static let queueSize: UInt16 = 256
    /// Config `status`'s VIRTIO_NET_S_LINK_UP.
    static let statusLinkUp: UInt16 = 1
    static let maxFrame = 65550

    public let id: String
    public let mac: [UInt8]
    public let maxQueuePairs: Int
    public let multiQueue: Bool
    /// Device property `local-migration`.
    public var localMigration = true
    let datapath: any NetDatapath
    let logger: Logger
    /// Where the datapath watches its fds; set when the machine plugs the device.
    var host: DeviceHost?

    private let activePairs = Atomic<Int>(0)
    /// The control queue while the device is active, and what it needs then.
    private let control = Mutex<(queue: Virtqueue, features: UInt64, context: DatapathContext)?>(nil)

    public init(id: String, mac: [UInt8], datapath: any NetDatapath, multiQueue: Bool, logger: Logger) {
        self.id = id
        self.mac = mac
        self.datapath = datapath
        self.multiQueue = multiQueue
        self.logger = logger
        maxQueuePairs = datapath.queuePairs
    }

    /// Pairs a device on `netdev` offers: all of the netdev's queues with `mq=on`, else one.
    public static func queuePairs(multiQueue: Bool, netdev: NetBackend) -> Int { multiQueue ? netdev.queueCount : 1 }

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
        let status: UInt16 = datapath.linkUp ? Self.statusLinkUp : 0
        var bytes = mac + le16(status) + le16(UInt16(maxQueuePairs)) + le16(1500)
        bytes += [UInt8](repeating: 0, count: 16)
        guard offset >= 0, offset + size <= bytes.count else { return 0 }
        var value: UInt32 = 0
        for i in 0..<size { value |= UInt32(bytes[offset + i]) << (8 * i) }
        return value
    }

    public func writeConfig(offset: Int, size: Int, value: UInt32) {}

    // MARK: lifecycle

    /// Lets the datapath watch its fds (loop thread); a netdev whose fds come with a
    /// migration is attached once they did.
    public func resume() throws {
        if let host { datapath.attach(to: host) }
    }

    public func shutdown() { datapath.detach() }

    /// Only a `cpr=on` netdev is handed over; the datapath knows how to let go of it.
    public func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD] {
        guard context.mode == .cprTransfer, datapath.handsOverForCPR else { return [] }
        return try datapath.prepareForHandover(context)
    }

    public func cancelHandover(_ context: HandoverContext) {
        guard context.mode == .cprTransfer, datapath.handsOverForCPR else { return }
        if let host { datapath.cancelHandover(context, host: host) }
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

    public var migrationBlocker: String? { datapath.migrationBlocker.map { "device '\(id)': \($0)" } }

    public func startDirtyLog() throws { try datapath.startDirtyLog() }
    public func collectDirty(into bitmap: inout [UInt64]) { datapath.collectDirty(into: &bitmap) }
    public func stopDirtyLog() { datapath.stopDirtyLog() }

    public func queryInfo(status: UInt8, notifyExits: [UInt64]) -> JSONObject? {
        let stats = statistics
        return ["x-virtio-net": [
            "netdev": .string(datapath.netdevID), "ifname": .string(datapath.ifname), "datapath": .string(datapath.kind.rawValue),
            "link": .string(datapath.linkUp ? "up" : "down"),
            "max-queue-pairs": .int(Int64(maxQueuePairs)), "queue-pairs": .int(Int64(queuePairsInUse)),
            "queues": .int(Int64(queueMaxSizes.count)), "status": .int(Int64(status)),
            "rx-packets": .array(stats.rx.map { .int(Int64($0)) }), "tx-packets": .array(stats.tx.map { .int(Int64($0)) }),
            "notify-exits": .array(notifyExits.map { .int(Int64($0)) }),
        ]]
    }

    /// Keeps the control queue and hands the pairs' rings to the datapath. A device
    /// activated afresh uses one pair; one resumed (or loaded) keeps its count.
    /// With a datapath that takes eventfds, each of its rings gets a kick (the guest's
    /// notifies, as a doorbell) and a call (which wakes a halted vCPU); they are made
    /// here, per activation, since 256 pairs' worth up front would pass the fd limit.
    public func activate(features: UInt64, queues: [Int: Virtqueue], context: DatapathContext) {
        if activePairs.load(ordering: .relaxed) == 0 { activePairs.store(1, ordering: .relaxed) }
        control.withLock { c in c = queues[controlQueueIndex].map { ($0, features, context) } }
        var rings: [Int: RingHandoff] = [:]
        do {
            for (index, queue) in queues where index < controlQueueIndex {
                let eventFDs = datapath.notification == .eventFDs
                rings[index] = RingHandoff(queue: queue, kick: eventFDs ? try EventFD(label: "\(id) kick \(index)") : nil,
                                           call: eventFDs ? try EventFD(label: "\(id) call \(index)") : nil)
            }
        } catch {
            context.ringFailed(0, "cannot create the rings' eventfds: \(error)")
            return
        }
        for (index, ring) in rings { if let kick = ring.kick { context.attachDoorbell(index, kick) } }
        let calls = rings.values.compactMap(\.call)
        host?.setHaltWakeSources("\(id) calls", calls.map { call in
            VCPURunner.HaltWakeSource(fd: call.fd, wanted: { true }, ready: { call.drain() })
        })
        datapath.start(rings, activePairs: activePairs.load(ordering: .relaxed), context: context)
        // Work the guest posted while the rings were stopped: a ring starts on a kick.
        for ring in rings.values { ring.kick?.signal() }
    }

    public func deactivate() -> [Int: Virtqueue] {
        var queues = datapath.stop()
        let context = control.withLock { c -> DatapathContext? in defer { c = nil }; return c?.context }
        if datapath.notification == .eventFDs {
            context?.detachDoorbells()
            host?.setHaltWakeSources("\(id) calls", [])
        }
        if let ctrl = control.withLock({ c -> Virtqueue? in c?.queue }) { queues[controlQueueIndex] = ctrl }
        return queues
    }

    public func reset() {
        activePairs.store(0, ordering: .relaxed)
    }

    public func queueNotified(_ index: Int) {
        if index == controlQueueIndex {
            processControlQueue()
        } else if index < controlQueueIndex {
            datapath.notified(index)
        }
    }

    // MARK: control queue (vCPU thread)

    static let controlClassMQ: UInt8 = 4
    static let controlMQPairsSet: UInt8 = 0

    private func processControlQueue() {
        var failure: (DatapathContext, String)?
        control.withLock { c in
            guard var active = c else { return }
            defer { c = active }
            let memory = active.context.memory
            let multiQueueNegotiated = active.features & Feature.multiQueue != 0
            do {
                while let chain = try active.queue.popAvailable(from: memory) {
                    // Only the command's first bytes count (class, command, VQ_PAIRS_SET's u16); the
                    // readable part can describe terabytes (2^16 descriptors, each all of RAM).
                    var request: [UInt8] = []
                    for segment in chain.readable where request.count < 4 {
                        request += try memory.read(at: segment.address, count: min(Int(segment.length), 4 - request.count))
                    }
                    guard let ack = chain.writable.first, request.count >= 2 else {
                        throw VirtqueueError(description: "control request without header or ack buffer")
                    }
                    var status: UInt8 = 1
                    if request[0] == Self.controlClassMQ && request[1] == Self.controlMQPairsSet && request.count >= 4 {
                        let pairs = Int(UInt16(request[2]) | UInt16(request[3]) << 8)
                        if pairs >= 1 && pairs <= maxQueuePairs && multiQueueNegotiated {
                            activePairs.store(pairs, ordering: .relaxed)
                            datapath.setActivePairs(pairs)
                            status = 0
                            logger.debug("\(id): \(pairs) queue pairs active")
                        }
                    } else if request[0] == 0 {
                        status = 0  // RX mode (promiscuous, all-multicast): a TAP delivers everything anyway.
                    }
                    try memory.store(status, at: ack.address)
                    try active.queue.pushUsed(head: chain.head, length: 1, to: memory)
                }
            } catch {
                failure = (active.context, "\(error)")
            }
        }
        if let (context, message) = failure { context.ringFailed(controlQueueIndex, message) }
    }

    // MARK: state

    /// How the backend travels with the state (local migration), named by the source's
    /// netdev id: TAP queues, each as fd `netdev/<netdev>/tap.<i>` (kind 1), or a
    /// vhost-user backend's connection as fd `netdev/<netdev>/vhost-user` (kind 2, for
    /// `queuePairs` pairs; its rings' progress is in the transport's queues).
    public struct DatapathDescriptor: Sendable, Equatable {
        public static let kindTapQueues: UInt8 = 1
        public static let kindVhostUserConnection: UInt8 = 2
        public var kind: UInt8
        public var netdev: String
        public var queuePairs: UInt16
        public var vnetHeader: Bool

        public func fdName(queue: Int) -> String { NamedFD.tapQueueName(netdev: netdev, queue: queue) }
        /// Every fd the descriptor's kind travels with, in order.
        public var fdNames: [String] {
            kind == Self.kindVhostUserConnection ? [NamedFD.vhostUserConnectionName(netdev: netdev)] : (0..<Int(queuePairs)).map(fdName(queue:))
        }
        /// For messages.
        var what: String { kind == Self.kindVhostUserConnection ? "a vhost-user connection" : "TAP queues" }
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
            guard [DatapathDescriptor.kindTapQueues, DatapathDescriptor.kindVhostUserConnection].contains(kind) else {
                throw StreamError("datapath kind \(kind) is not known to this build")
            }
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
        handsOverQueues(context) ? datapath.handedOverFDs() : []
    }

    public func modelState(_ context: HandoverContext) -> [UInt8] {
        let handover = handsOverQueues(context) ? handoverDescriptor : nil
        return SavedState(activePairs: UInt16(activePairs.load(ordering: .relaxed)), handover: handover).encoded()
    }

    /// What a local migration hands over: a vhost-user datapath its connection, any other
    /// the netdev's TAP queues.
    var handoverDescriptor: DatapathDescriptor {
        datapath.kind == .vhostUser
            ? DatapathDescriptor(kind: DatapathDescriptor.kindVhostUserConnection, netdev: datapath.netdevID,
                                 queuePairs: UInt16(datapath.queuePairs), vnetHeader: datapath.vnetHeader)
            : DatapathDescriptor(kind: DatapathDescriptor.kindTapQueues, netdev: datapath.netdevID,
                                 queuePairs: UInt16(datapath.handedOverFDs().count), vnetHeader: datapath.vnetHeader)
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
            let vhostUser = datapath.kind == .vhostUser
            guard (handover.kind == DatapathDescriptor.kindVhostUserConnection) == vhostUser else {
                throw StreamError("\(id): the source handed over \(handover.what), but netdev '\(datapath.netdevID)' is \(vhostUser ? "vhost-user" : "a TAP")")
            }
            guard datapath.awaitsIncomingFDs else {
                // The series' tap_pre_load wording, then what it means here.
                throw StreamError(vhostUser
                    ? "\(id): netdev '\(datapath.netdevID)' (vhost-user) has its own backend connection and cannot take the source's: create it with incoming-fds=on and no chardev"
                    : "\(id): TAP is already initialized and cannot receive incoming fd: netdev '\(datapath.netdevID)' was not created with incoming-fds=on")
            }
            if vhostUser && Int(handover.queuePairs) != datapath.queuePairs {
                throw StreamError("\(id): the source's vhost-user connection serves \(handover.queuePairs) queue pairs, netdev '\(datapath.netdevID)' has \(datapath.queuePairs)")
            }
            let handed = try handover.fdNames.map { try fds.claim($0, by: "netdev '\(datapath.netdevID)'") }
            try datapath.adoptIncoming(handed, vnetHeader: handover.vnetHeader)
        }
        // The rings start with the device (`activate`), using this many pairs.
        activePairs.store(pairs, ordering: .relaxed)
    }

    public func checkReadyToRun() throws {
        if datapath.awaitsIncomingFDs {
            throw StreamError("netdev '\(datapath.netdevID)' (incoming-fds=on) received no \(datapath.kind == .vhostUser ? "vhost-user connection" : "TAP queues"): is migration parameter 'local' on at the source, and local-migration on for \(id)?")
        }
    }

    /// Per-queue packet counts, for queries.
    public var statistics: (rx: [UInt64], tx: [UInt64]) { datapath.statistics }
    public var queuePairsInUse: Int { activePairs.load(ordering: .relaxed) }
}
