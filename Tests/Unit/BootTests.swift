import CLinux
import Glibc
import Testing
@testable import VMMCore

/// The package root, found from this file so tests run from any working directory.
let packageRoot: String = {
    var parts = #filePath.split(separator: "/", omittingEmptySubsequences: false)
    parts.removeLast(3)  // Tests/Unit/BootTests.swift
    return parts.joined(separator: "/")
}()

@Suite struct ELFImageTests {
    @Test func bundledGuestHasPVHNoteAndLoadsAtOneMiB() throws {
        let image = try ELFImage(contentsOf: packageRoot + "/assets/guest/guest.elf", maxSize: 16 << 20)
        let entry = try #require(image.pvhEntry)
        #expect(entry >= 0x10_0000)
        #expect(image.segments.allSatisfy { $0.physicalAddress >= 0x10_0000 })
    }

    /// A minimal ELF64 with one PT_LOAD at `loadAddress` and optionally a PVH note.
    static func makeELF(loadAddress: UInt64 = 0x10_0000, withNote: Bool = true, machine: UInt16 = 62,
                        fileSize: UInt64 = 16, memorySize: UInt64 = 64) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 64)
        func put<T: FixedWidthInteger>(_ v: T, at offset: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, byte) in $0.enumerated() { b[offset + i] = byte } }
        }
        b[0...3] = [0x7F, 0x45, 0x4C, 0x46]
        b[4] = 2; b[5] = 1; b[6] = 1
        put(UInt16(2), at: 16); put(machine, at: 18); put(UInt32(1), at: 20)
        put(UInt64(0x10_0000), at: 24)
        put(UInt64(64), at: 32)
        put(UInt16(64), at: 52); put(UInt16(56), at: 54); put(UInt16(withNote ? 2 : 1), at: 56)
        let phdrs = 64
        let notesOffset = phdrs + 2 * 56
        let payloadOffset = notesOffset + 20
        b += [UInt8](repeating: 0, count: 2 * 56 + 20 + 16)
        // PT_LOAD
        put(UInt32(1), at: phdrs); put(UInt64(payloadOffset), at: phdrs + 8)
        put(loadAddress, at: phdrs + 16); put(loadAddress, at: phdrs + 24)
        put(fileSize, at: phdrs + 32); put(memorySize, at: phdrs + 40)
        if withNote {
            put(UInt32(4), at: phdrs + 56); put(UInt64(notesOffset), at: phdrs + 64); put(UInt64(20), at: phdrs + 88)
            put(UInt32(4), at: notesOffset); put(UInt32(4), at: notesOffset + 4); put(UInt32(18), at: notesOffset + 8)
            b[notesOffset + 12...notesOffset + 14] = [0x58, 0x65, 0x6E]  // "Xen"
            put(UInt32(0x10_0000), at: notesOffset + 16)
        }
        for i in 0..<16 { b[payloadOffset + i] = UInt8(0xA0 + i) }
        return b
    }

    @Test func parsesSyntheticImage() throws {
        let image = try ELFImage(bytes: Self.makeELF())
        #expect(image.pvhEntry == 0x10_0000)
        #expect(image.segments == [.init(physicalAddress: 0x10_0000, fileOffset: 64 + 112 + 20, fileSize: 16, memorySize: 64)])
    }

    @Test func rejectsBrokenImages() {
        #expect(throws: ELFImage.FormatError.self) { try ELFImage(bytes: [1, 2, 3]) }
        #expect(throws: ELFImage.FormatError.self) { try ELFImage(bytes: Self.makeELF(machine: 3)) }
        #expect(throws: ELFImage.FormatError.self) { try ELFImage(bytes: Self.makeELF(fileSize: 1 << 20)) }
        #expect(throws: ELFImage.FormatError.self) { try ELFImage(bytes: Self.makeELF(fileSize: 64, memorySize: 16)) }
        var truncated = Self.makeELF()
        truncated.removeLast(60)
        #expect(throws: ELFImage.FormatError.self) { try ELFImage(bytes: truncated) }
    }
}

@Suite struct PVHBootTests {
    @Test func writesSegmentsStartInfoMemoryMapAndCommandLine() throws {
        let memory = try GuestMemory(size: 16 << 20)
        let entry = try PVHBoot.load(try ELFImage(bytes: ELFImageTests.makeELF()), into: memory,
                                     commandLine: "console=ttyS0", flags: PVHBoot.flagHaltWakes)
        #expect(entry == 0x10_0000)
        #expect(try memory.read(at: 0x10_0000, count: 2) == [0xA0, 0xA1])
        #expect(try memory.read(at: 0x10_0010, count: 4) == [0, 0, 0, 0])
        let info = PVHBoot.startInfoAddress
        #expect(try memory.load(UInt32.self, at: info) == 0x336E_C578)
        #expect(try memory.load(UInt32.self, at: info + 8) == PVHBoot.flagHaltWakes)
        let cmdline = try memory.load(UInt64.self, at: info + 24)
        #expect(try memory.read(at: cmdline, count: 14) == Array("console=ttyS0".utf8) + [0])
        let entries = try memory.load(UInt32.self, at: info + 48)
        #expect(entries == 2)
        let map = try memory.load(UInt64.self, at: info + 40)
        #expect(try memory.load(UInt64.self, at: map + 24) == 0x10_0000)
        #expect(try memory.load(UInt64.self, at: map + 32) == (16 << 20) - 0x10_0000)
    }

    @Test func refusesImagesThatDoNotFit() throws {
        let memory = try GuestMemory(size: 2 << 20)
        #expect(throws: PVHBoot.LoadError.self) {
            try PVHBoot.load(try ELFImage(bytes: ELFImageTests.makeELF(loadAddress: 0x30_0000)), into: memory, commandLine: "", flags: 0)
        }
        #expect(throws: PVHBoot.LoadError.self) {
            try PVHBoot.load(try ELFImage(bytes: ELFImageTests.makeELF(loadAddress: 0x7000)), into: memory, commandLine: "", flags: 0)
        }
        #expect(throws: PVHBoot.LoadError.self) {
            try PVHBoot.load(try ELFImage(bytes: ELFImageTests.makeELF(withNote: false)), into: memory, commandLine: "", flags: 0)
        }
        #expect(throws: PVHBoot.LoadError.self) {
            try PVHBoot.load(try ELFImage(bytes: ELFImageTests.makeELF()), into: memory,
                             commandLine: String(repeating: "x", count: 5000), flags: 0)
        }
    }

    /// An ELF64 with a PVH note and one PT_LOAD per entry of `segments`, each with 16 file bytes 0xA0...
    static func makeELF(segments: [(address: UInt64, memorySize: UInt64)]) -> [UInt8] {
        var b = [UInt8](repeating: 0, count: 64)
        func put<T: FixedWidthInteger>(_ v: T, at offset: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, byte) in $0.enumerated() { b[offset + i] = byte } }
        }
        let count = segments.count + 1
        b[0...3] = [0x7F, 0x45, 0x4C, 0x46]
        b[4] = 2; b[5] = 1; b[6] = 1
        put(UInt16(2), at: 16); put(UInt16(62), at: 18); put(UInt32(1), at: 20)
        put(UInt64(0x10_0000), at: 24); put(UInt64(64), at: 32)
        put(UInt16(64), at: 52); put(UInt16(56), at: 54); put(UInt16(count), at: 56)
        let notesOffset = 64 + count * 56
        let payloadOffset = notesOffset + 20
        b += [UInt8](repeating: 0, count: count * 56 + 20 + 16)
        for (i, segment) in segments.enumerated() {
            let ph = 64 + i * 56
            put(UInt32(1), at: ph); put(UInt64(payloadOffset), at: ph + 8)
            put(segment.address, at: ph + 16); put(segment.address, at: ph + 24)
            put(UInt64(16), at: ph + 32); put(segment.memorySize, at: ph + 40)
        }
        let note = 64 + segments.count * 56
        put(UInt32(4), at: note); put(UInt64(notesOffset), at: note + 8); put(UInt64(20), at: note + 32)
        put(UInt32(4), at: notesOffset); put(UInt32(4), at: notesOffset + 4); put(UInt32(18), at: notesOffset + 8)
        b[notesOffset + 12...notesOffset + 14] = [0x58, 0x65, 0x6E]  // "Xen"
        put(UInt32(0x10_0000), at: notesOffset + 16)
        for i in 0..<16 { b[payloadOffset + i] = UInt8(0xA0 + i) }
        return b
    }

    /// RAM from a reused file or an earlier guest is not zero: bss and the unwritten
    /// start-info fields must be cleared by the loader.
    @Test func zeroesBSSAndBootDataOverDirtyMemory() throws {
        let memory = try GuestMemory(size: 16 << 20)
        try memory.write([UInt8](repeating: 0xFF, count: 0x2000), at: PVHBoot.startInfoAddress)
        try memory.write([UInt8](repeating: 0xFF, count: 0x3000), at: 0x10_0000)
        try PVHBoot.load(try ELFImage(bytes: Self.makeELF(segments: [(0x10_0000, 0x2000)])), into: memory, commandLine: "", flags: 0)
        #expect(try memory.read(at: 0x10_0000, count: 2) == [0xA0, 0xA1])
        #expect(try memory.read(at: 0x10_0010, count: 0x2000 - 16).allSatisfy { $0 == 0 })
        #expect(try memory.read(at: 0x10_2000, count: 1) == [0xFF])  // past memsz: not the loader's
        #expect(try memory.load(UInt32.self, at: PVHBoot.startInfoAddress + 12) == 0)  // nr_modules
        #expect(try memory.load(UInt64.self, at: PVHBoot.startInfoAddress + 32) == 0)  // rsdp_paddr
    }

    /// p_memsz = 2^63 used to trap converting to Int; p_memsz beyond RAM must be refused with the values.
    @Test func refusesHugeSegmentsWithTheirSize() throws {
        let memory = try GuestMemory(size: 16 << 20)
        for size: UInt64 in [1 << 63, UInt64.max - 0x20_0000, 16 << 20] {
            let image = try ELFImage(bytes: Self.makeELF(segments: [(0x10_0000, 0x1000), (0x20_0000, size)]))
            let error = #expect(throws: PVHBoot.LoadError.self) {
                try PVHBoot.load(image, into: memory, commandLine: "", flags: 0)
            }
            #expect(error?.description.contains("\(size) bytes") == true, "\(String(describing: error))")
            #expect(error?.description.contains("16777216 bytes") == true)
        }
    }

    /// QEMU refuses these ("Some ROM regions are overlapping"); loaded, they triple-faulted.
    @Test func refusesOverlappingSegmentsNamingBoth() throws {
        let memory = try GuestMemory(size: 16 << 20)
        let image = try ELFImage(bytes: Self.makeELF(segments: [(0x10_1000, 0x1000), (0x10_0000, 0x1800)]))
        let error = #expect(throws: PVHBoot.LoadError.self) {
            try PVHBoot.load(image, into: memory, commandLine: "", flags: 0)
        }
        #expect(error?.description == "kernel segments 0x100000-0x101800 and 0x101000-0x102000 overlap")
        // Touching is fine.
        try PVHBoot.load(try ELFImage(bytes: Self.makeELF(segments: [(0x10_0000, 0x1000), (0x10_1000, 0x1000)])),
                         into: memory, commandLine: "", flags: 0)
    }

    /// `-kernel /dev/zero` used to be read until the OOM killer came.
    @Test func refusesKernelFilesThatAreNotRegularOrLargerThanRAM() throws {
        let notRegular = #expect(throws: ELFImage.FormatError.self) { try ELFImage(contentsOf: "/dev/zero", maxSize: 16 << 20) }
        #expect(notRegular?.description.contains("not a regular file") == true)
        let path = "/tmp/vmm-boottest-\(getpid())-big.elf"
        defer { unlink(path) }
        let fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0o600)
        #expect(fd >= 0 && ftruncate(fd, (16 << 20) + 1) == 0)
        close(fd)
        let tooBig = #expect(throws: ELFImage.FormatError.self) { try ELFImage(contentsOf: path, maxSize: 16 << 20) }
        #expect(tooBig?.description == "the file is 16777217 bytes, larger than the 16777216 bytes of guest RAM")
    }

    @Test func initialStateIsFlatProtectedMode() {
        let (regs, apply) = PVHBoot.initialRegisters(entry: 0x10_00F0)
        var sregs = kvm_sregs()
        apply(&sregs)
        #expect(regs.rip == 0x10_00F0 && regs.rbx == PVHBoot.startInfoAddress && regs.rflags == 2)
        #expect(sregs.cr0 & 1 == 1 && sregs.cr0 & 0x8000_0000 == 0)
        #expect(sregs.cs.db == 1 && sregs.cs.l == 0 && sregs.cs.limit == 0xFFFF_FFFF && sregs.tr.type == 0xB)
    }
}

@Suite struct GuestMemoryTests {
    @Test func splitsAroundThePCIHole() {
        let regions = GuestMemory.layout(size: 4 << 30)
        #expect(regions.count == 2)
        #expect(regions[0].end == GuestMemory.lowRAMLimit)
        #expect(regions[1].guestAddress == GuestMemory.highRAMStart && regions[1].size == (4 << 30) - GuestMemory.lowRAMLimit)
    }

    @Test func accessesAreBoundsChecked() throws {
        let memory = try GuestMemory(size: 2 << 20)
        try memory.store(UInt32(0xDEAD_BEEF), at: 0x1000)
        #expect(try memory.load(UInt32.self, at: 0x1000) == 0xDEAD_BEEF)
        #expect(throws: GuestMemoryError.self) { try memory.read(at: (2 << 20) - 2, count: 4) }
        #expect(throws: GuestMemoryError.self) { try memory.read(at: UInt64.max - 1, count: 4) }
        #expect(throws: GuestMemoryError.self) { try memory.slice(at: 0, count: -1) }
    }

    @Test func sharedMemfdIsVisibleThroughItsFD() throws {
        let memory = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        try memory.write([1, 2, 3], at: 0x200)
        var buffer = [UInt8](repeating: 0, count: 3)
        #expect(memory.fd.withRaw { pread($0, &buffer, 3, 0x200) } == 3)
        #expect(buffer == [1, 2, 3])
    }

    /// `-m 1T` on a smaller host used to boot and die at first touch; QEMU refuses up front.
    @Test func refusesMoreRAMThanTheHostCanBack() throws {
        let error = #expect(throws: GuestMemoryError.self) { try GuestMemory(size: 1 << 50) }
        #expect(error?.description.contains("1125899906842624 bytes (1073741824 MiB) of RAM is more than this host can back") == true,
                "\(String(describing: error))")
        #expect(error?.description.contains("RAM + swap") == true)
    }

    @Test func rejectsBadSizesAndPaths() {
        #expect(throws: GuestMemoryError.self) { try GuestMemory(size: 4096) }
        #expect(throws: SystemError.self) { try GuestMemory(size: 1 << 20, backing: .file(path: "/nonexistent/dir/ram")) }
    }
}
