import CPU

/// One function on PCI bus 0, reached through configuration mechanism #1:
/// the register address goes to port 0xCF8, the dword moves through port
/// 0xCFC. Every access costs two port exits, so callers read only what
/// they use.
struct PCIFunction {
    private static let addressPort: UInt16 = 0xcf8
    private static let dataPort: UInt16 = 0xcfc

    static let idRegister: UInt32 = 0x00
    static let commandRegister: UInt32 = 0x04      // command in the low half, status in the high half
    static let headerTypeRegister: UInt32 = 0x0c   // header type in byte 2
    static let firstBARRegister: UInt32 = 0x10
    static let capabilitiesRegister: UInt32 = 0x34

    private static let statusCapabilityList: UInt32 = 1 << 20
    private static let multiFunction: UInt32 = 0x80 << 16
    private static let commandMemorySpace: UInt32 = 1 << 1
    private static let commandBusMaster: UInt32 = 1 << 2

    /// The CF8 value without the register: enable bit, bus 0, device, function.
    let address: UInt32

    init(device: UInt32, function: UInt32) {
        address = 0x8000_0000 | device << 11 | function << 8
    }

    func read(_ register: UInt32) -> UInt32 {
        cpu_out32(PCIFunction.addressPort, address | register & 0xfc)
        return cpu_in32(PCIFunction.dataPort)
    }

    func write(_ register: UInt32, _ value: UInt32) {
        cpu_out32(PCIFunction.addressPort, address | register & 0xfc)
        cpu_out32(PCIFunction.dataPort, value)
    }

    var isMultiFunction: Bool { read(PCIFunction.headerTypeRegister) & PCIFunction.multiFunction != 0 }

    /// Offset of the first capability, or 0 when the function lists none.
    func firstCapability() -> UInt32 {
        guard read(PCIFunction.commandRegister) & PCIFunction.statusCapabilityList != 0 else { return 0 }
        return read(PCIFunction.capabilitiesRegister) & 0xfc
    }

    /// Lets the function decode its memory BARs and read and write guest RAM.
    /// The status half is written as zeros, which leaves its
    /// write-one-to-clear bits alone.
    func enableMemoryAndBusMaster() {
        let command = read(PCIFunction.commandRegister) & 0xffff
        write(PCIFunction.commandRegister, command | PCIFunction.commandMemorySpace | PCIFunction.commandBusMaster)
    }

    /// The base of memory BAR `index` (a 64-bit BAR takes the next register
    /// for its upper half), or nil for an I/O BAR or a bad index. A BAR
    /// nobody assigned (it reads 0) gets an address from `PCI.assign`.
    func memoryBAR(_ index: UInt32) -> UInt64? {
        guard index < 6 else { return nil }
        let register = PCIFunction.firstBARRegister + index * 4
        let low = read(register)
        guard low & 1 == 0 else { return nil }
        let is64Bit = low & 0x6 == 0x4
        guard !is64Bit || index < 5 else { return nil }
        var base = UInt64(low & ~0xf)
        if is64Bit {
            base |= UInt64(read(register + 4)) << 32
        }
        if base == 0 {
            base = PCI.assign(self, register: register, is64Bit: is64Bit)
        }
        return base
    }
}

enum PCI {
    private static let devicesPerBus: UInt32 = 32
    private static let functionsPerDevice: UInt32 = 8

    /// Where BARs that nobody assigned go: inside the 32-bit PCI hole of
    /// our VMM and of QEMU's q35, above what firmware usually hands out.
    private static let assignBase: UInt64 = 0xe000_0000
    private static let assignLimit: UInt64 = 0xfe00_0000
    nonisolated(unsafe) private static var assignNext: UInt64 = assignBase

    /// The first function on bus 0 with the given vendor id and either
    /// device id. Functions 1-7 are probed only behind a multi-function
    /// function 0, so an empty slot costs one read.
    static func find(vendor: UInt16, device: UInt16, orDevice otherDevice: UInt16) -> PCIFunction? {
        let wanted = UInt32(device) << 16 | UInt32(vendor)
        let otherWanted = UInt32(otherDevice) << 16 | UInt32(vendor)
        for slot in 0..<devicesPerBus {
            let first = PCIFunction(device: slot, function: 0)
            let id = first.read(PCIFunction.idRegister)
            if id & 0xffff == 0xffff {
                continue
            }
            if id == wanted || id == otherWanted {
                return first
            }
            guard first.isMultiFunction else { continue }
            for function in 1..<functionsPerDevice {
                let candidate = PCIFunction(device: slot, function: function)
                let candidateID = candidate.read(PCIFunction.idRegister)
                if candidateID == wanted || candidateID == otherWanted {
                    return candidate
                }
            }
        }
        return nil
    }

    /// Sizes an unassigned memory BAR (write all ones, read the mask back),
    /// places it naturally aligned at the next free address of the window
    /// and returns its base, or 0 when it does not fit.
    fileprivate static func assign(_ function: PCIFunction, register: UInt32, is64Bit: Bool) -> UInt64 {
        function.write(register, 0xffff_ffff)
        var mask = UInt64(function.read(register) & ~0xf)
        if is64Bit {
            function.write(register + 4, 0xffff_ffff)
            mask |= UInt64(function.read(register + 4)) << 32
        } else {
            mask |= 0xffff_ffff_0000_0000
        }
        let size = ~mask &+ 1
        let base = (assignNext &+ size &- 1) & mask
        guard mask != 0, size != 0, base >= assignNext, base &+ size <= assignLimit else {
            function.write(register, 0)
            if is64Bit {
                function.write(register + 4, 0)
            }
            return 0
        }
        function.write(register, UInt32(truncatingIfNeeded: base))
        if is64Bit {
            function.write(register + 4, 0)
        }
        assignNext = base &+ size
        return base
    }
}
