import Logging
import QMPWire
import Synchronization

/// What a virtio device type (net, ...) provides to the PCI transport.
public protocol VirtioDeviceModel: AnyObject, Sendable {
    /// Virtio device ID (1 = network card); the PCI device ID is 0x1040 + this.
    var deviceType: UInt16 { get }
    var pciClass: UInt32 { get }
    var deviceFeatures: UInt64 { get }
    /// One entry per virtqueue: its maximum size.
    var queueMaxSizes: [UInt16] { get }
    func readConfig(offset: Int, size: Int) -> UInt32
    func writeConfig(offset: Int, size: Int, value: UInt32)
    /// The device runs: the driver set DRIVER_OK with these features (or a paused device
    /// resumes). The model owns the ready `queues` (by index) until `deactivate`.
    func activate(features: UInt64, queues: [Int: Virtqueue], context: DatapathContext)
    /// Stops every queue and gives them back with their progress; after return nothing
    /// writes guest RAM.
    func deactivate() -> [Int: Virtqueue]
    /// The driver notified queue `index` (vCPU thread, transport lock not held).
    func queueNotified(_ index: Int)
    /// The driver reset the device (after `deactivate`): back to its initial state.
    func reset()

    // The model's half of the device lifecycle; the transport forwards to it, so one
    // virtio function is one device and one section.
    func configuration(_ context: HandoverContext) -> MachineDescription.Device?
    func pause() throws
    func resume() throws
    /// The model's own state, as its versioned bytes (inside the transport's section).
    func modelState(_ context: HandoverContext) -> [UInt8]
    /// Validates and commits the model's state; fds are claimed by name.
    func loadModelState(_ bytes: [UInt8], fds: ReceivedFDs) throws
    func handedOverFDs(_ context: HandoverContext) -> [NamedFD]
    func checkReadyToRun() throws
    /// The model's entries in query-pci, given the device status and the guest notifies
    /// per queue that exited to the VMM.
    func queryInfo(status: UInt8, notifyExits: [UInt64]) -> JSONObject?
    /// See `MachineDevice.migrationBlocker`.
    var migrationBlocker: String? { get }
    /// See `MachineDevice.prepareForHandover` and `cancelHandover`.
    func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD]
    func cancelHandover(_ context: HandoverContext)
    /// See `MachineDevice`'s dirty-log hooks.
    func startDirtyLog() throws
    func collectDirty(into bitmap: inout [UInt64])
    func stopDirtyLog()
    func shutdown()
}

extension VirtioDeviceModel {
    public func configuration(_ context: HandoverContext) -> MachineDescription.Device? { nil }
    public var migrationBlocker: String? { nil }
    public func pause() throws {}
    public func resume() throws {}
    /// A model without state of its own saves nothing and accepts nothing.
    public func modelState(_ context: HandoverContext) -> [UInt8] { [] }
    public func loadModelState(_ bytes: [UInt8], fds: ReceivedFDs) throws {
        guard bytes.isEmpty else { throw StreamError("this device model keeps no state, but the stream has \(bytes.count) bytes for it") }
    }
    public func handedOverFDs(_ context: HandoverContext) -> [NamedFD] { [] }
    public func checkReadyToRun() throws {}
    public func queryInfo(status: UInt8, notifyExits: [UInt64]) -> JSONObject? { nil }
    public func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD] { [] }
    public func cancelHandover(_ context: HandoverContext) {}
    public func startDirtyLog() throws {}
    public func collectDirty(into bitmap: inout [UInt64]) {}
    public func stopDirtyLog() {}
    public func shutdown() {}
}

/// Where doorbells are registered so a guest notify signals an eventfd inside KVM: the VM.
public protocol IOEventFDHost: Sendable {
    func attachIOEventFD(_ eventFD: EventFD, mmio address: UInt64, length: UInt32) throws -> IOEventFDRegistration
    func detach(_ registration: IOEventFDRegistration)
}

extension VirtualMachine: IOEventFDHost {}

/// Virtio over PCI, modern interface only (virtio 1.x, 4.1): one 32 KiB memory BAR
/// holding the common, ISR, device and notify structures and the MSI-X table.
public final class VirtioPCITransport: PCIDevice, StatefulDevice {
    public static let featureVersion1: UInt64 = 1 << 32

    static let barSize: UInt32 = 0x8000
    static let commonOffset: UInt64 = 0x0000
    static let isrOffset: UInt64 = 0x1000
    static let deviceOffset: UInt64 = 0x2000
    static let notifyOffset: UInt64 = 0x3000
    static let notifyMultiplier: UInt32 = 4
    static let msixTableOffset: UInt64 = 0x4000
    static let msixPBAOffset: UInt64 = 0x5000

    public enum Status {
        public static let acknowledge: UInt8 = 1
        public static let driver: UInt8 = 2
        public static let driverOK: UInt8 = 4
        public static let featuresOK: UInt8 = 8
        public static let needsReset: UInt8 = 0x40
        public static let failed: UInt8 = 0x80
    }

    struct State {
        var config: PCIConfigSpace
        var deviceFeatureSelect: UInt32 = 0
        var driverFeatureSelect: UInt32 = 0
        var driverFeatures: UInt64 = 0
        var status: UInt8 = 0
        var configGeneration: UInt8 = 0
        var queueSelect: UInt16 = 0
        var queues: [Virtqueue]
        var msixConfigVector: UInt16 = 0xFFFF
        var queueVectors: [UInt16]
        var msixTable: [UInt8]
        var errorLogged = false
        /// The model runs the queues (DRIVER_OK, not paused); `queues` holds their layout
        /// for register reads, and their progress only once they came back.
        var modelHoldsQueues = false
        var paused = false
    }

    public let name: String
    public let memory: GuestMemory
    public let model: VirtioDeviceModel
    let logger: Logger
    private let state: Mutex<State>
    let msixVectors: Int

    /// A queue whose notifies go to a kick eventfd (a datapath with `.eventFDs`):
    /// registered with KVM when it can be, relayed from the notify exit otherwise.
    struct Doorbell {
        let kick: EventFD
        var registration: IOEventFDRegistration?
    }
    /// Given by the machine unless `ioeventfd=off`; the registration length (0 = any).
    let ioeventfds: (host: any IOEventFDHost, length: UInt32)?
    private let doorbells = Mutex<[Int: Doorbell]>([:])
    /// KVM registrations of doorbells `detachDoorbells` took down, still assigned: each
    /// deassign waits for an SRCU grace period (4 rings took 1-5 ms here, most of a
    /// vhost-user NIC's migration downtime), so it waits until the queue gets its next
    /// doorbell, BAR0 moves, or the device shuts down. A notify meanwhile signals a kick
    /// nobody reads: the rings are stopped, and every start kicks each ring once.
    private let retiredRegistrations = Mutex<[Int: IOEventFDRegistration]>([:])
    /// Per queue: guest notifies that reached the VMM (exits), relayed or handled.
    private let notifyExits: Mutex<[UInt64]>
    private let ioeventfdFailureLogged = Atomic<Bool>(false)

    public init(name: String, model: VirtioDeviceModel, memory: GuestMemory, logger: Logger,
                ioeventfds: (host: any IOEventFDHost, length: UInt32)? = nil) {
        self.name = name
        self.ioeventfds = ioeventfds
        self.model = model
        self.memory = memory
        self.logger = logger
        let queueCount = model.queueMaxSizes.count
        msixVectors = queueCount + 1
        var config = PCIConfigSpace(vendor: 0x1AF4, device: 0x1040 + model.deviceType, classCode: model.pciClass,
                                    revision: 1, subsystemVendor: 0x1AF4, subsystem: 0x1100)
        config.addBAR(0, size: Self.barSize)
        func virtioCap(_ type: UInt8, offset: UInt64, length: UInt32, extra: [UInt8] = []) -> [UInt8] {
            let capLength = UInt8(16 + extra.count)
            return [capLength, type, 0, 0, 0, 0] + le32(UInt32(offset)) + le32(length) + extra
        }
        config.addCapability(id: 0x09, body: virtioCap(1, offset: Self.commonOffset, length: 0x38))
        config.addCapability(id: 0x09, body: virtioCap(2, offset: Self.notifyOffset, length: UInt32(queueCount) * Self.notifyMultiplier,
                                                      extra: le32(Self.notifyMultiplier)))
        config.addCapability(id: 0x09, body: virtioCap(3, offset: Self.isrOffset, length: 1))
        config.addCapability(id: 0x09, body: virtioCap(4, offset: Self.deviceOffset, length: 0x100))
        // MSI-X: stored so a guest can program it; this host cannot deliver interrupts.
        config.addCapability(id: 0x11, body: le16(UInt16(msixVectors - 1)) + le32(UInt32(Self.msixTableOffset)) + le32(UInt32(Self.msixPBAOffset)),
                             writableBody: [0x00, 0xC0])
        notifyExits = Mutex(Array(repeating: 0, count: queueCount))
        state = Mutex(State(config: config, queues: model.queueMaxSizes.map { Virtqueue(maxSize: $0) },
                            queueVectors: Array(repeating: 0xFFFF, count: queueCount),
                            msixTable: [UInt8](repeating: 0, count: 16 * msixVectors)))
    }

    public var configSpace: PCIConfigSpace { state.withLock { $0.config } }
    public var status: UInt8 { state.withLock { $0.status } }
    public var negotiatedFeatures: UInt64 { state.withLock { $0.driverFeatures } }

    public func configRead(offset: Int, size: Int) -> UInt32 { state.withLock { $0.config.read(offset: offset, size: size) } }
    public func configWrite(offset: Int, size: Int, value: UInt32) {
        state.withLock { _ = $0.config.write(offset: offset, size: size, value: value) }
        // The command register (memory decoding) or BAR0 moved the notify addresses.
        if offset < 0x06 && offset + size > 0x04 || offset < 0x14 && offset + size > 0x10 { reregisterDoorbells() }
    }

    // MARK: doorbells

    /// Guest notifies of `queue` signal `kick` from now on, instead of reaching the model.
    public func attachDoorbell(queue: Int, kick: EventFD) {
        if let retired = retiredRegistrations.withLock({ $0.removeValue(forKey: queue) }) { ioeventfds?.host.detach(retired) }
        let registration = register(kick, queue: queue)
        doorbells.withLock { $0[queue] = Doorbell(kick: kick, registration: registration) }
    }

    public func detachDoorbells() {
        let removed = doorbells.withLock { d in defer { d = [:] }; return d }
        retiredRegistrations.withLock { retired in
            for (queue, bell) in removed { if let registration = bell.registration { retired[queue] = registration } }
        }
    }

    /// Deassigns what `detachDoorbells` left registered.
    private func detachRetiredRegistrations() {
        let retired = retiredRegistrations.withLock { r in defer { r = [:] }; return r }
        for registration in retired.values { ioeventfds?.host.detach(registration) }
    }

    /// Notifies of each queue that exited to the VMM so far.
    public var notifyExitCounts: [UInt64] { notifyExits.withLock { $0 } }

    private func register(_ kick: EventFD, queue: Int) -> IOEventFDRegistration? {
        let config = configSpace
        guard let (host, length) = ioeventfds, config.read(offset: 0x04, size: 2) & 0x2 != 0, let base = config.barAddress(0) else {
            return nil
        }
        do {
            return try host.attachIOEventFD(kick, mmio: base + Self.notifyOffset + UInt64(Self.notifyMultiplier) * UInt64(queue), length: length)
        } catch {
            // Relaying works everywhere; only slower.
            if !ioeventfdFailureLogged.exchange(true, ordering: .relaxed) { logger.warning("\(name): \(error); relaying guest notifies instead") }
            return nil
        }
    }

    private func reregisterDoorbells() {
        detachRetiredRegistrations()
        let current = doorbells.withLock { $0 }
        guard !current.isEmpty else { return }
        for registration in current.values.compactMap(\.registration) { ioeventfds?.host.detach(registration) }
        var renewed: [Int: Doorbell] = [:]
        for (queue, bell) in current { renewed[queue] = Doorbell(kick: bell.kick, registration: register(bell.kick, queue: queue)) }
        doorbells.withLock { $0 = renewed }
    }

    /// A queue the model runs failed: NEEDS_RESET, logged once, until the driver resets.
    func ringFailed(_ index: Int, _ message: String) {
        let first = state.withLock { s -> Bool in
            s.status |= Status.needsReset
            s.configGeneration &+= 1
            defer { s.errorLogged = true }
            return !s.errorLogged
        }
        if first { logger.error("\(name): device needs reset: queue \(index): \(message)") }
    }

    /// Hands the ready queues to the model if the device should run and does not yet.
    private func activateModel() {
        let handover = state.withLock { s -> (UInt64, [Int: Virtqueue])? in
            guard !s.paused, !s.modelHoldsQueues, s.status & Status.driverOK != 0, s.status & Status.needsReset == 0 else { return nil }
            s.modelHoldsQueues = true
            var ready: [Int: Virtqueue] = [:]
            for (index, queue) in s.queues.enumerated() where queue.ready { ready[index] = queue }
            return (s.driverFeatures, ready)
        }
        guard let (features, queues) = handover else { return }
        let context = DatapathContext(memory: memory, ringFailed: { [weak self] in self?.ringFailed($0, $1) },
                                      attachDoorbell: { [weak self] in self?.attachDoorbell(queue: $0, kick: $1) },
                                      detachDoorbells: { [weak self] in self?.detachDoorbells() })
        model.activate(features: features, queues: queues, context: context)
    }

    /// Takes the queues back from the model, with their progress.
    private func deactivateModel() -> [Int: Virtqueue] {
        guard state.withLock({ s in defer { s.modelHoldsQueues = false }; return s.modelHoldsQueues }) else { return [:] }
        return model.deactivate()
    }

    // MARK: lifecycle and migration

    /// Transport state (PCI config space, negotiation, queues, MSI-X) and the model's own
    /// versioned bytes. Version 1 is stream v2's `<nic>/transport` payload followed by
    /// the model blob (LegacyStreamV2 relies on that).
    public struct SavedState: VersionedState {
        public static let version: UInt16 = 1
        public var config: [UInt8]
        public var deviceFeatureSelect: UInt32
        public var driverFeatureSelect: UInt32
        public var driverFeatures: UInt64
        public var status: UInt8
        public var configGeneration: UInt8
        public var queueSelect: UInt16
        public var msixConfigVector: UInt16
        public var queues: [Virtqueue.State]
        public var queueVectors: [UInt16]
        public var msixTable: [UInt8]
        public var model: [UInt8]

        public func encode(into w: inout StreamWriter) {
            w.raw(config)
            w.u32(deviceFeatureSelect)
            w.u32(driverFeatureSelect)
            w.u64(driverFeatures)
            w.u8(status)
            w.u8(configGeneration)
            w.u16(queueSelect)
            w.u16(msixConfigVector)
            w.u16(UInt16(queues.count))
            for (queue, vector) in zip(queues, queueVectors) {
                queue.encode(into: &w)
                w.u16(vector)
            }
            w.blob(msixTable)
            w.blob(model)
        }

        public init(decoding r: inout StreamReader, version: UInt16) throws {
            config = try r.raw(PCIConfigSpace.size, "configuration space")
            deviceFeatureSelect = try r.u32("device feature select")
            driverFeatureSelect = try r.u32("driver feature select")
            driverFeatures = try r.u64("driver features")
            status = try r.u8("device status")
            configGeneration = try r.u8("config generation")
            queueSelect = try r.u16("queue select")
            msixConfigVector = try r.u16("config vector")
            let count = Int(try r.u16("queue count"))
            queues = []
            queueVectors = []
            for _ in 0..<count {
                queues.append(try Virtqueue.State(decoding: &r))
                queueVectors.append(try r.u16("queue vector"))
            }
            msixTable = try r.blob("MSI-X table", limit: 16 * 2048)
            model = try r.blob("device model state", limit: 1 << 20)
        }

        init(_ s: State, model: [UInt8]) {
            config = s.config.bytes
            deviceFeatureSelect = s.deviceFeatureSelect
            driverFeatureSelect = s.driverFeatureSelect
            driverFeatures = s.driverFeatures
            status = s.status
            configGeneration = s.configGeneration
            queueSelect = s.queueSelect
            msixConfigVector = s.msixConfigVector
            queues = s.queues.map(\.state)
            queueVectors = s.queueVectors
            msixTable = s.msixTable
            self.model = model
        }
    }

    public var id: String { name }

    /// Paused only: the queues' progress is then the transport's again.
    public func save(_ context: HandoverContext) -> SavedState {
        let transport = state.withLock { $0 }
        assert(!transport.modelHoldsQueues, "\(name): saved while its queues run")
        return SavedState(transport, model: model.modelState(context))
    }

    /// The queue count must match this device's, enabled queues must lie in this
    /// machine's RAM, and only config bits a guest could write are taken.
    public func load(_ saved: SavedState, fds: ReceivedFDs) throws {
        var s = state.withLock { $0 }
        let offered = model.deviceFeatures | Self.featureVersion1
        guard saved.driverFeatures & ~offered == 0 else {
            throw StreamError("\(name): source negotiated features \(hex(saved.driverFeatures)) that this device does not offer (\(hex(offered)))")
        }
        guard saved.queues.count == s.queues.count else {
            throw StreamError("\(name): source has \(saved.queues.count) virtqueues, this device has \(s.queues.count)")
        }
        guard saved.msixTable.count == s.msixTable.count else {
            throw StreamError("\(name): MSI-X table of \(saved.msixTable.count) bytes, expected \(s.msixTable.count)")
        }
        s.queues = try zip(saved.queues, s.queues).map { try Virtqueue(validating: $0, maxSize: $1.maxSize, memory: memory) }
        s.deviceFeatureSelect = saved.deviceFeatureSelect
        s.driverFeatureSelect = saved.driverFeatureSelect
        s.driverFeatures = saved.driverFeatures
        s.status = saved.status
        s.configGeneration = saved.configGeneration
        s.queueSelect = saved.queueSelect
        s.msixConfigVector = saved.msixConfigVector
        s.queueVectors = saved.queueVectors
        s.msixTable = saved.msixTable
        s.config = s.config.merging(guestWritable: saved.config)
        // The model last: its fds are claimed only once everything else is known good.
        try model.loadModelState(saved.model, fds: fds)
        state.withLock { $0 = s }
    }

    public func configuration(_ context: HandoverContext) -> MachineDescription.Device? { model.configuration(context) }
    public func pause() throws {
        state.withLock { $0.paused = true }
        let returned = deactivateModel()
        state.withLock { s in for (index, queue) in returned where index < s.queues.count { s.queues[index] = queue } }
        try model.pause()
    }

    public func resume() throws {
        state.withLock { $0.paused = false }
        try model.resume()
        activateModel()
    }
    public func handedOverFDs(_ context: HandoverContext) -> [NamedFD] { model.handedOverFDs(context) }
    public func checkReadyToRun() throws { try model.checkReadyToRun() }
    public var queryInfo: JSONObject? { model.queryInfo(status: status, notifyExits: notifyExitCounts) }
    public var migrationBlocker: String? { model.migrationBlocker }
    public func prepareForHandover(_ context: HandoverContext) throws -> [NamedFD] { try model.prepareForHandover(context) }
    public func cancelHandover(_ context: HandoverContext) { model.cancelHandover(context) }
    public func startDirtyLog() throws { try model.startDirtyLog() }
    public func collectDirty(into bitmap: inout [UInt64]) { model.collectDirty(into: &bitmap) }
    public func stopDirtyLog() { model.stopDirtyLog() }
    public func shutdown() {
        model.shutdown()
        detachRetiredRegistrations()
    }

    // MARK: BAR access

    public func barRead(_ bar: Int, offset: UInt64, into data: UnsafeMutableRawBufferPointer) {
        let size = data.count
        var value: UInt64 = 0
        switch offset {
        case Self.commonOffset..<Self.commonOffset + 0x38:
            value = UInt64(state.withLock { readCommon(&$0, offset: Int(offset - Self.commonOffset), size: size) })
        case Self.isrOffset:
            value = 0  // no interrupt is ever raised
        case Self.deviceOffset..<Self.deviceOffset + 0x100:
            value = UInt64(model.readConfig(offset: Int(offset - Self.deviceOffset), size: size))
        case Self.msixTableOffset..<Self.msixTableOffset + UInt64(16 * msixVectors):
            let start = Int(offset - Self.msixTableOffset)
            value = state.withLock { s in
                var v: UInt64 = 0
                for i in 0..<size where start + i < s.msixTable.count { v |= UInt64(s.msixTable[start + i]) << (8 * i) }
                return v
            }
        default:
            value = 0
        }
        for i in 0..<size { data[i] = UInt8(truncatingIfNeeded: value >> (8 * i)) }
    }

    public func barWrite(_ bar: Int, offset: UInt64, from data: UnsafeRawBufferPointer) {
        var value: UInt64 = 0
        for i in 0..<data.count { value |= UInt64(data[i]) << (8 * i) }
        switch offset {
        case Self.commonOffset..<Self.commonOffset + 0x38:
            let effect = state.withLock { writeCommon(&$0, offset: Int(offset - Self.commonOffset), size: data.count, value: value) }
            switch effect {
            case .none: break
            case .reset:
                _ = deactivateModel()
                state.withLock { s in
                    s.status = 0
                    s.driverFeatures = 0
                    s.queueSelect = 0
                    s.errorLogged = false
                    for i in s.queues.indices { s.queues[i].reset() }
                    s.queueVectors = s.queueVectors.map { _ in 0xFFFF }
                }
                model.reset()
            case .activate:
                activateModel()
            }
        case Self.notifyOffset..<Self.notifyOffset + UInt64(model.queueMaxSizes.count) * UInt64(Self.notifyMultiplier):
            let queue = Int((offset - Self.notifyOffset) / UInt64(Self.notifyMultiplier))
            notifyExits.withLock { $0[queue] += 1 }
            if let kick = doorbells.withLock({ $0[queue]?.kick }) {
                kick.signal()
            } else {
                model.queueNotified(queue)
            }
        case Self.deviceOffset..<Self.deviceOffset + 0x100:
            model.writeConfig(offset: Int(offset - Self.deviceOffset), size: data.count, value: UInt32(truncatingIfNeeded: value))
        case Self.msixTableOffset..<Self.msixTableOffset + UInt64(16 * msixVectors):
            let start = Int(offset - Self.msixTableOffset)
            state.withLock { s in
                for i in 0..<data.count where start + i < s.msixTable.count { s.msixTable[start + i] = data[i] }
            }
        default:
            break
        }
    }

    enum Effect { case none, reset, activate(UInt64) }

    private func readCommon(_ s: inout State, offset: Int, size: Int) -> UInt32 {
        let q = Int(s.queueSelect)
        let queue = q < s.queues.count ? s.queues[q] : nil
        switch offset {
        case 0x00: return s.deviceFeatureSelect
        case 0x04:
            let features = model.deviceFeatures | Self.featureVersion1
            return s.deviceFeatureSelect < 2 ? UInt32(truncatingIfNeeded: features >> (32 * UInt64(s.deviceFeatureSelect))) : 0
        case 0x08: return s.driverFeatureSelect
        case 0x0C: return s.driverFeatureSelect < 2 ? UInt32(truncatingIfNeeded: s.driverFeatures >> (32 * UInt64(s.driverFeatureSelect))) : 0
        case 0x10: return UInt32(s.msixConfigVector)
        case 0x12: return UInt32(s.queues.count)
        case 0x14: return UInt32(s.status)
        case 0x15: return UInt32(s.configGeneration)
        case 0x16: return UInt32(s.queueSelect)
        case 0x18: return UInt32(queue?.size ?? 0)
        case 0x1A: return q < s.queueVectors.count ? UInt32(s.queueVectors[q]) : 0xFFFF
        case 0x1C: return queue?.ready == true ? 1 : 0
        case 0x1E: return UInt32(q)
        case 0x20: return UInt32(truncatingIfNeeded: queue?.descriptorTable ?? 0)
        case 0x24: return UInt32(truncatingIfNeeded: (queue?.descriptorTable ?? 0) >> 32)
        case 0x28: return UInt32(truncatingIfNeeded: queue?.driverArea ?? 0)
        case 0x2C: return UInt32(truncatingIfNeeded: (queue?.driverArea ?? 0) >> 32)
        case 0x30: return UInt32(truncatingIfNeeded: queue?.deviceArea ?? 0)
        case 0x34: return UInt32(truncatingIfNeeded: (queue?.deviceArea ?? 0) >> 32)
        default: return 0
        }
    }

    private func writeCommon(_ s: inout State, offset: Int, size: Int, value: UInt64) -> Effect {
        let v32 = UInt32(truncatingIfNeeded: value)
        let q = Int(s.queueSelect)
        let hasQueue = q < s.queues.count
        func setLow(_ field: inout UInt64) { field = (field & 0xFFFF_FFFF_0000_0000) | UInt64(v32) }
        func setHigh(_ field: inout UInt64) { field = (field & 0xFFFF_FFFF) | UInt64(v32) << 32 }
        // Queue layout may only change while the queue is disabled (spec 4.1.4.3.2).
        let layoutWritable = hasQueue && !s.queues[q].ready
        switch offset {
        case 0x00: s.deviceFeatureSelect = v32
        case 0x08: s.driverFeatureSelect = v32
        case 0x0C:
            guard s.status & Status.featuresOK == 0, s.driverFeatureSelect < 2 else { break }
            let shift = UInt64(32 * s.driverFeatureSelect)
            s.driverFeatures = (s.driverFeatures & ~(0xFFFF_FFFF << shift)) | UInt64(v32) << shift
        case 0x10: s.msixConfigVector = UInt16(truncatingIfNeeded: value)
        case 0x14:
            let newStatus = UInt8(truncatingIfNeeded: value)
            if newStatus == 0 { return .reset }  // after the model gave its queues back
            var accepted = newStatus
            if newStatus & Status.featuresOK != 0 && s.status & Status.featuresOK == 0 {
                let offered = model.deviceFeatures | Self.featureVersion1
                if s.driverFeatures & ~offered != 0 || s.driverFeatures & Self.featureVersion1 == 0 {
                    accepted &= ~Status.featuresOK  // the driver reads it back and gives up
                    logger.warning("\(name): driver features \(hex(s.driverFeatures)) not a subset of \(hex(offered)) or lack VERSION_1")
                }
            }
            let activating = accepted & Status.driverOK != 0 && s.status & Status.driverOK == 0
            s.status = accepted | (s.status & Status.needsReset)
            if activating {
                for i in s.queues.indices where s.queues[i].ready {
                    do {
                        try s.queues[i].validateLayout(in: memory)
                    } catch {
                        s.status |= Status.needsReset
                        logger.error("\(name): queue \(i): \(error)")
                        return .none
                    }
                }
                return .activate(s.driverFeatures)
            }
        case 0x16: s.queueSelect = UInt16(truncatingIfNeeded: value)
        case 0x18:
            if layoutWritable { s.queues[q].size = UInt16(truncatingIfNeeded: value) }
        case 0x1A: if hasQueue { s.queueVectors[q] = UInt16(truncatingIfNeeded: value) }
        case 0x1C:
            guard hasQueue, value & 1 == 1 else { break }
            s.queues[q].ready = true
            // Enabled after DRIVER_OK (the spec says before): checked now, as activation
            // checks the queues enabled by then; a bad layout must never reach the device.
            if s.status & Status.driverOK != 0 {
                do {
                    try s.queues[q].validateLayout(in: memory)
                } catch {
                    s.status |= Status.needsReset
                    logger.error("\(name): queue \(q): \(error)")
                }
            }
        case 0x20 where layoutWritable: size == 8 ? (s.queues[q].descriptorTable = value) : setLow(&s.queues[q].descriptorTable)
        case 0x24 where layoutWritable: setHigh(&s.queues[q].descriptorTable)
        case 0x28 where layoutWritable: size == 8 ? (s.queues[q].driverArea = value) : setLow(&s.queues[q].driverArea)
        case 0x2C where layoutWritable: setHigh(&s.queues[q].driverArea)
        case 0x30 where layoutWritable: size == 8 ? (s.queues[q].deviceArea = value) : setLow(&s.queues[q].deviceArea)
        case 0x34 where layoutWritable: setHigh(&s.queues[q].deviceArea)
        default: break
        }
        return .none
    }
}

func le16(_ v: UInt16) -> [UInt8] { [UInt8(truncatingIfNeeded: v), UInt8(truncatingIfNeeded: v >> 8)] }
func le32(_ v: UInt32) -> [UInt8] { le16(UInt16(truncatingIfNeeded: v)) + le16(UInt16(truncatingIfNeeded: v >> 16)) }
