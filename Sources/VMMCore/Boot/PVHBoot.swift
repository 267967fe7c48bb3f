import CLinux

/// Loads a PVH kernel (Xen's direct-boot ABI, also used by QEMU's `-kernel` and
/// cloud-hypervisor) and describes the 32-bit protected-mode state it starts in.
public struct PVHBoot {
    public static let startInfoAddress: UInt64 = 0x7000
    public static let memmapAddress: UInt64 = 0x7040
    public static let cmdlineAddress: UInt64 = 0x8000
    public static let maxCommandLine = 4095
    static let bootDataEnd: UInt64 = 0x9000
    static let startInfoMagic: UInt32 = 0x336E_C578

    /// Project-defined start_info flag: the VMM wakes a halted vCPU on console input,
    /// device events and a short timer, so the guest may `hlt` with interrupts off.
    public static let flagHaltWakes: UInt32 = 1 << 31

    public struct LoadError: Error, CustomStringConvertible, Sendable {
        public let description: String
    }

    /// Copies the image's segments and the boot data into guest memory; returns the entry point.
    @discardableResult
    public static func load(_ image: ELFImage, into memory: GuestMemory, commandLine: String, flags: UInt32) throws -> UInt32 {
        guard let entry = image.pvhEntry else {
            throw LoadError(description: "kernel has no PVH entry point (ELF note \"Xen\" type 18); only PVH images boot here")
        }
        let cmdline = Array(commandLine.utf8)
        guard cmdline.count <= maxCommandLine else {
            throw LoadError(description: "-append is \(cmdline.count) bytes, at most \(maxCommandLine) fit")
        }
        try checkPlacement(of: image.segments, in: memory)
        for segment in image.segments {
            // The whole of [paddr, paddr + memsz) is written, bss included: RAM from a
            // reused file, or left by an earlier guest, is not zero (ELF spec, QEMU's loader).
            try memory.write(image.bytes[segment.fileOffset..<segment.fileOffset + segment.fileSize], at: segment.physicalAddress)
            try memory.zero(at: segment.physicalAddress + UInt64(segment.fileSize), count: Int(segment.memorySize) - segment.fileSize)
        }

        // Fields not written below (modules, RSDP, reserved) must read as zero too.
        try memory.zero(at: startInfoAddress, count: Int(bootDataEnd - startInfoAddress))
        let memmap = e820(for: memory)
        for (i, entry) in memmap.enumerated() {
            let at = memmapAddress + UInt64(i * 24)
            try memory.store(entry.address, at: at)
            try memory.store(entry.size, at: at + 8)
            try memory.store(entry.type, at: at + 16)
        }
        try memory.write(cmdline + [0], at: cmdlineAddress)
        try memory.store(startInfoMagic, at: startInfoAddress)
        try memory.store(UInt32(1), at: startInfoAddress + 4)
        try memory.store(flags, at: startInfoAddress + 8)
        try memory.store(UInt64(cmdlineAddress), at: startInfoAddress + 24)
        try memory.store(UInt64(memmapAddress), at: startInfoAddress + 40)
        try memory.store(UInt32(memmap.count), at: startInfoAddress + 48)
        return entry
    }

    /// Refuses, before anything is written or any size is converted, segments that leave
    /// RAM, cover the boot data, or overlap each other (QEMU: "Some ROM regions are overlapping").
    static func checkPlacement(of segments: [ELFImage.Segment], in memory: GuestMemory) throws {
        func range(_ s: ELFImage.Segment) -> String {
            "0x\(String(s.physicalAddress, radix: 16))-0x\(String(s.physicalAddress &+ s.memorySize, radix: 16))"
        }
        for segment in segments {
            guard segment.fileSize >= 0, UInt64(segment.fileSize) <= segment.memorySize,
                  memory.contains(segment.physicalAddress, count: segment.memorySize) else {
                throw LoadError(description: "kernel segment \(range(segment)) (\(segment.memorySize) bytes) does not fit in the \(memory.size) bytes (\(memory.size >> 20) MiB) of RAM")
            }
            if segment.physicalAddress < bootDataEnd && segment.physicalAddress + segment.memorySize > startInfoAddress {
                throw LoadError(description: "kernel segment \(range(segment)) overlaps the PVH boot data at 0x7000-0x9000")
            }
        }
        let sorted = segments.sorted { $0.physicalAddress < $1.physicalAddress }
        for (a, b) in zip(sorted, sorted.dropFirst()) where b.physicalAddress < a.physicalAddress + a.memorySize {
            throw LoadError(description: "kernel segments \(range(a)) and \(range(b)) overlap")
        }
    }

    public struct MemoryMapEntry: Equatable, Sendable {
        public var address: UInt64
        public var size: UInt64
        public var type: UInt32
    }

    /// RAM as the guest should see it: the legacy VGA/BIOS hole is left out as on PCs.
    public static func e820(for memory: GuestMemory) -> [MemoryMapEntry] {
        var entries: [MemoryMapEntry] = []
        for region in memory.regions {
            if region.guestAddress == 0 && region.size > 0x10_0000 {
                entries.append(MemoryMapEntry(address: 0, size: 0xA_0000, type: 1))
                entries.append(MemoryMapEntry(address: 0x10_0000, size: region.size - 0x10_0000, type: 1))
            } else {
                entries.append(MemoryMapEntry(address: region.guestAddress, size: region.size, type: 1))
            }
        }
        return entries
    }

    /// The register state the PVH ABI prescribes: flat 32-bit segments, protected mode
    /// without paging, %ebx pointing at the start info.
    public static func initialRegisters(entry: UInt32) -> (kvm_regs, (inout kvm_sregs) -> Void) {
        var regs = kvm_regs()
        regs.rip = UInt64(entry)
        regs.rbx = startInfoAddress
        regs.rflags = 0x2
        let setSegments: (inout kvm_sregs) -> Void = { sregs in
            func flat(selector: UInt16, type: UInt8) -> kvm_segment {
                kvm_segment(base: 0, limit: 0xFFFF_FFFF, selector: selector, type: type, present: 1, dpl: 0,
                            db: 1, s: 1, l: 0, g: 1, avl: 0, unusable: 0, padding: 0)
            }
            sregs.cs = flat(selector: 0x10, type: 0xB)
            sregs.ds = flat(selector: 0x18, type: 0x3)
            sregs.es = sregs.ds
            sregs.ss = sregs.ds
            sregs.fs = sregs.ds
            sregs.gs = sregs.ds
            sregs.tr = kvm_segment(base: 0, limit: 0x67, selector: 0x20, type: 0xB, present: 1, dpl: 0,
                                   db: 0, s: 0, l: 0, g: 0, avl: 0, unusable: 0, padding: 0)
            sregs.cr0 = 0x11
            sregs.cr4 = 0
            sregs.efer = 0
        }
        return (regs, setSegments)
    }
}
