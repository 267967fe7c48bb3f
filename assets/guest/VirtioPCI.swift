import CPU

/// The virtio-pci modern transport (virtio 1.x, 4.1): register blocks that
/// vendor-specific PCI capabilities place inside memory BARs. Every access
/// below is an MMIO exit.
struct VirtioPCI {
    /// Device status bits (2.1).
    static let acknowledge: UInt8 = 1
    static let driver: UInt8 = 2
    static let driverOK: UInt8 = 4
    static let featuresOK: UInt8 = 8

    /// virtio_pci_common_cfg field offsets (4.1.4.3).
    private static let deviceFeatureSelect: UInt64 = 0x00
    private static let deviceFeature: UInt64 = 0x04
    private static let driverFeatureSelect: UInt64 = 0x08
    private static let driverFeature: UInt64 = 0x0c
    private static let numQueues: UInt64 = 0x12
    private static let deviceStatus: UInt64 = 0x14
    private static let queueSelect: UInt64 = 0x16
    private static let queueSize: UInt64 = 0x18
    private static let queueEnable: UInt64 = 0x1c
    private static let queueNotifyOff: UInt64 = 0x1e
    private static let queueDesc: UInt64 = 0x20
    private static let queueDriver: UInt64 = 0x28
    private static let queueDevice: UInt64 = 0x30
    private static let commonLength: UInt32 = 0x38

    /// Capability cfg_type values (4.1.4).
    private static let commonConfiguration: UInt32 = 1
    private static let notifyConfiguration: UInt32 = 2
    private static let deviceConfiguration: UInt32 = 4
    private static let vendorCapability: UInt32 = 0x09

    let common: UInt64
    let notifyBase: UInt64
    let notifyMultiplier: UInt32
    let notifyLength: UInt32
    /// The device-specific configuration, and how many bytes of it exist.
    let device: UInt64
    let deviceLength: UInt32

    /// Finds the common, notify and device structures in the capability
    /// list, makes their BARs reachable and turns on memory decoding and
    /// bus mastering. The ISR structure is skipped: without interrupts
    /// nothing reads it.
    init?(_ function: PCIFunction) {
        var common: UInt64 = 0
        var notify: UInt64 = 0
        var notifyMultiplier: UInt32 = 0
        var notifyLength: UInt32 = 0
        var device: UInt64 = 0
        var deviceLength: UInt32 = 0
        // The structures usually share one BAR: read it once.
        var cachedBAR: UInt32 = 6
        var cachedBase: UInt64? = nil
        var offset = function.firstCapability()
        // Config space holds at most 48 capabilities; a looping list ends here too.
        var remaining = 48
        while offset >= 0x40 && remaining > 0 {
            let header = function.read(offset)
            remaining -= 1
            let type = header >> 24
            if header & 0xff == VirtioPCI.vendorCapability
                && (type == VirtioPCI.commonConfiguration && common == 0
                    || type == VirtioPCI.notifyConfiguration && notify == 0
                    || type == VirtioPCI.deviceConfiguration && device == 0) {
                let bar = function.read(offset + 4) & 0xff
                let start = UInt64(function.read(offset + 8))
                let length = function.read(offset + 12)
                if bar != cachedBAR {
                    cachedBAR = bar
                    cachedBase = function.memoryBAR(bar)
                }
                if let base = cachedBase, base != 0,
                   PageTables.map(base &+ start, length: UInt64(length)) {
                    switch type {
                    case VirtioPCI.commonConfiguration:
                        if length >= VirtioPCI.commonLength {
                            common = base &+ start
                        }
                    case VirtioPCI.notifyConfiguration:
                        notify = base &+ start
                        notifyLength = length
                        notifyMultiplier = function.read(offset + 16)
                    default:
                        device = base &+ start
                        deviceLength = length
                    }
                }
            }
            offset = header >> 8 & 0xfc
        }
        guard common != 0, notify != 0 else { return nil }
        function.enableMemoryAndBusMaster()
        self.common = common
        self.notifyBase = notify
        self.notifyMultiplier = notifyMultiplier
        self.notifyLength = notifyLength
        self.device = device
        self.deviceLength = deviceLength
    }

    var status: UInt8 {
        get { mmio_read8(common &+ VirtioPCI.deviceStatus) }
        nonmutating set { mmio_write8(common &+ VirtioPCI.deviceStatus, newValue) }
    }

    /// Writes 0 and waits for the device to read back 0 (4.1.4.3.2).
    func reset() -> Bool {
        status = 0
        var attempts = 1000
        while status != 0 {
            attempts -= 1
            if attempts == 0 {
                return false
            }
            cpu_pause()
        }
        return true
    }

    func deviceFeatures() -> UInt64 {
        mmio_write32(common &+ VirtioPCI.deviceFeatureSelect, 0)
        let low = mmio_read32(common &+ VirtioPCI.deviceFeature)
        mmio_write32(common &+ VirtioPCI.deviceFeatureSelect, 1)
        let high = mmio_read32(common &+ VirtioPCI.deviceFeature)
        return UInt64(high) << 32 | UInt64(low)
    }

    func setDriverFeatures(_ features: UInt64) {
        mmio_write32(common &+ VirtioPCI.driverFeatureSelect, 0)
        mmio_write32(common &+ VirtioPCI.driverFeature, UInt32(truncatingIfNeeded: features))
        mmio_write32(common &+ VirtioPCI.driverFeatureSelect, 1)
        mmio_write32(common &+ VirtioPCI.driverFeature, UInt32(truncatingIfNeeded: features >> 32))
    }

    var queueCount: UInt16 { mmio_read16(common &+ VirtioPCI.numQueues) }

    /// Gives device queue `index` the rings of `queue` with at most `size`
    /// descriptors (fewer if the device allows fewer), records its size and
    /// notification address there, and enables it. False when the device
    /// has no such queue.
    func setUpQueue(_ index: UInt16, _ queue: Virtqueue, size wanted: UInt16) -> Bool {
        queue.clear()
        mmio_write16(common &+ VirtioPCI.queueSelect, index)
        let maximum = mmio_read16(common &+ VirtioPCI.queueSize)
        var size = wanted
        while size > maximum {
            size >>= 1
        }
        guard size != 0 else { return false }
        let notifyOffset = UInt64(mmio_read16(common &+ VirtioPCI.queueNotifyOff)) &* UInt64(notifyMultiplier)
        guard notifyOffset &+ 2 <= UInt64(notifyLength) else { return false }
        if size != maximum {
            mmio_write16(common &+ VirtioPCI.queueSize, size)
        }
        write64(VirtioPCI.queueDesc, queue.physicalAddress)
        write64(VirtioPCI.queueDriver, queue.availAddress)
        write64(VirtioPCI.queueDevice, queue.usedAddress)
        mmio_write16(common &+ VirtioPCI.queueEnable, 1)
        queue.size = size
        queue.index = index
        queue.notifyAddress = notifyBase &+ notifyOffset
        return true
    }

    /// 64-bit fields as two 32-bit halves, which every device accepts (4.1.3.1).
    private func write64(_ field: UInt64, _ value: UInt64) {
        mmio_write32(common &+ field, UInt32(truncatingIfNeeded: value))
        mmio_write32(common &+ field &+ 4, UInt32(truncatingIfNeeded: value >> 32))
    }

    func readDevice8(_ offset: UInt32) -> UInt8 {
        mmio_read8(device &+ UInt64(offset))
    }

    func readDevice16(_ offset: UInt32) -> UInt16 {
        mmio_read16(device &+ UInt64(offset))
    }
}
