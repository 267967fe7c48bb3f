import Synchronization

/// A device on the PCI bus. Config and BAR accesses arrive on the vCPU thread;
/// queries (query-pci) on the control thread, so implementations lock their state.
public protocol PCIDevice: AnyObject, Sendable {
    var name: String { get }
    func configRead(offset: Int, size: Int) -> UInt32
    func configWrite(offset: Int, size: Int, value: UInt32)
    /// A snapshot of the configuration header, for address decoding and queries.
    var configSpace: PCIConfigSpace { get }
    func barRead(_ bar: Int, offset: UInt64, into data: UnsafeMutableRawBufferPointer)
    func barWrite(_ bar: Int, offset: UInt64, from data: UnsafeRawBufferPointer)
}

/// PCI bus 0 behind configuration mechanism #1 (ports 0xCF8 address, 0xCFC-0xCFF data),
/// with a host bridge in slot 0. It also decodes MMIO exits to device BARs from the
/// addresses currently programmed, so a guest may move a BAR at any time.
public final class PCIBus: PortIODevice, StatefulDevice {
    public static let configAddressPort: UInt16 = 0xCF8
    /// Where the VMM places 32-bit memory BARs (inside the hole below 4 GiB).
    public static let mmioWindow: ClosedRange<UInt64> = 0xE000_0000...0xFDFF_FFFF

    private let address = Atomic<UInt32>(0)
    /// Devices by slot. Plugged before the guest runs (command line or QMP `device_add`
    /// in prelaunch), read on every access afterwards.
    private let slots = Mutex<[PCIDevice?]>([PCIHostBridge()])
    private let nextBARAddress = Mutex<UInt64>(PCIBus.mmioWindow.lowerBound)

    public init(devices: [PCIDevice] = []) throws {
        for device in devices { try plug(device) }
    }

    /// Puts `device` in the next free slot and assigns its memory BARs, as firmware would.
    @discardableResult
    public func plug(_ device: PCIDevice) throws -> Int {
        let slot = try slots.withLock { slots -> Int in
            guard slots.count < 32 else { throw IOBusError(description: "PCI bus 0 is full (32 slots); cannot add \(device.name)") }
            slots.append(device)
            return slots.count - 1
        }
        try nextBARAddress.withLock { next in
            let config = device.configSpace
            for index in 0..<6 {
                guard let bar = config.bars[index], !bar.isIO else { continue }
                next = (next + UInt64(bar.size) - 1) & ~(UInt64(bar.size) - 1)
                guard next + UInt64(bar.size) - 1 <= Self.mmioWindow.upperBound else {
                    throw IOBusError(description: "PCI MMIO window exhausted placing \(device.name) BAR\(index)")
                }
                // Through the device's own config write path, as firmware would.
                device.configWrite(offset: 0x10 + index * 4, size: 4, value: UInt32(truncatingIfNeeded: next))
                if bar.is64Bit { device.configWrite(offset: 0x14 + index * 4, size: 4, value: UInt32(truncatingIfNeeded: next >> 32)) }
                next += UInt64(bar.size)
            }
        }
        device.configWrite(offset: 0x04, size: 2, value: 0x0006)
        return slot
    }

    /// The CONFIG_ADDRESS latch: a guest stopped between writing 0xCF8 and reading
    /// 0xCFC must find it again on the migration target.
    public struct SavedState: VersionedState {
        public static let version: UInt16 = 1
        public var configAddress: UInt32
        public func encode(into w: inout StreamWriter) { w.u32(configAddress) }
        public init(decoding r: inout StreamReader, version: UInt16) throws { configAddress = try r.u32("CONFIG_ADDRESS") }
        init(configAddress: UInt32) { self.configAddress = configAddress }
    }

    public var id: String { "pci0" }

    public func save(_ context: HandoverContext = .init(mode: .normal)) -> SavedState {
        SavedState(configAddress: address.load(ordering: .relaxed))
    }

    public func load(_ saved: SavedState, fds: ReceivedFDs = ReceivedFDs()) throws {
        address.store(saved.configAddress & 0x80FF_FFFC, ordering: .relaxed)
    }

    public var devices: [(slot: Int, device: PCIDevice)] {
        slots.withLock { $0.enumerated().compactMap { slot, device in device.map { (slot, $0) } } }
    }

    // MARK: configuration mechanism #1 (port offsets 0-3 address, 4-7 data)

    public func portRead(offset: UInt16, size: Int) -> UInt32 {
        if offset < 4 {
            return offset == 0 && size == 4 ? address.load(ordering: .relaxed) : 0xFFFF_FFFF
        }
        guard let (device, register) = target(dataOffset: Int(offset) - 4, size: size) else {
            return size == 4 ? 0xFFFF_FFFF : (1 << (size * 8)) - 1
        }
        return device.configRead(offset: register, size: size)
    }

    public func portWrite(offset: UInt16, size: Int, value: UInt32) {
        if offset < 4 {
            if offset == 0 && size == 4 { address.store(value & 0x80FF_FFFC, ordering: .relaxed) }
            return
        }
        guard let (device, register) = target(dataOffset: Int(offset) - 4, size: size) else { return }
        device.configWrite(offset: register, size: size, value: value)
    }

    private func target(dataOffset: Int, size: Int) -> (PCIDevice, Int)? {
        let a = address.load(ordering: .relaxed)
        guard a & 0x8000_0000 != 0 else { return nil }
        let bus = (a >> 16) & 0xFF
        let slot = Int((a >> 11) & 0x1F)
        let function = (a >> 8) & 0x7
        guard bus == 0, function == 0, let device = slots.withLock({ slot < $0.count ? $0[slot] : nil }) else { return nil }
        let register = Int(a & 0xFC) + dataOffset
        guard register + size <= PCIConfigSpace.size else { return nil }
        return (device, register)
    }

    // MARK: MMIO decoding

    /// Handles an MMIO exit if it falls into an enabled memory BAR; false otherwise.
    public func handleMMIO(address: UInt64, isWrite: Bool, data: UnsafeMutableRawBufferPointer) -> Bool {
        for case let device? in slots.withLock({ $0 }) {
            let config = device.configSpace
            guard config.memoryEnabled else { continue }
            for index in 0..<6 {
                guard let bar = config.bars[index], !bar.isIO, let base = config.barAddress(index),
                      address >= base, address + UInt64(data.count) <= base + UInt64(bar.size) else { continue }
                if isWrite {
                    device.barWrite(index, offset: address - base, from: UnsafeRawBufferPointer(data))
                } else {
                    device.barRead(index, offset: address - base, into: data)
                }
                return true
            }
        }
        return false
    }
}

/// Slot 0: a host bridge, so that a guest scanning the bus finds a root.
final class PCIHostBridge: PCIDevice {
    let name = "host-bridge"
    let configSpace = PCIConfigSpace(vendor: 0x1B36, device: 0x0008, classCode: 0x06_00_00)

    func configRead(offset: Int, size: Int) -> UInt32 { configSpace.read(offset: offset, size: size) }
    func configWrite(offset: Int, size: Int, value: UInt32) {}
    func barRead(_ bar: Int, offset: UInt64, into data: UnsafeMutableRawBufferPointer) {}
    func barWrite(_ bar: Int, offset: UInt64, from data: UnsafeRawBufferPointer) {}
}
