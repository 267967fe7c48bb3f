import CLinux
import Glibc

/// The parts of an ELF64 x86-64 executable a PVH loader needs: loadable segments and notes.
public struct ELFImage: Sendable {
    public struct Segment: Sendable, Equatable {
        public var physicalAddress: UInt64
        public var fileOffset: Int
        public var fileSize: Int
        public var memorySize: UInt64
    }

    public struct Note: Sendable, Equatable {
        public var name: String
        public var type: UInt32
        public var descriptor: [UInt8]
    }

    public let bytes: [UInt8]
    public let entry: UInt64
    public let segments: [Segment]
    public let notes: [Note]

    public struct FormatError: Error, CustomStringConvertible, Sendable {
        public let description: String
    }

    static let ptLoad: UInt32 = 1
    static let ptNote: UInt32 = 4

    public init(bytes: [UInt8]) throws {
        func fail(_ message: String) -> FormatError { FormatError(description: "not a usable ELF image: \(message)") }
        guard bytes.count >= 64, bytes[0] == 0x7F, bytes[1] == 0x45, bytes[2] == 0x4C, bytes[3] == 0x46 else {
            throw fail("bad magic")
        }
        guard bytes[4] == 2 else { throw fail("only ELF64 images are supported (class \(bytes[4]))") }
        guard bytes[5] == 1 else { throw fail("not little-endian") }
        let reader = ByteReader(bytes)
        guard reader.u16(18) == 62 else { throw fail("machine \(reader.u16(18)) is not x86-64") }
        entry = reader.u64(24)
        let phoff = reader.u64(32)
        let phentsize = Int(reader.u16(54))
        let phnum = Int(reader.u16(56))
        guard phentsize >= 56, phnum > 0, phoff < UInt64(bytes.count),
            Int(phoff) + phentsize * phnum <= bytes.count
        else { throw fail("program headers out of range") }

        var segments: [Segment] = []
        var notes: [Note] = []
        for i in 0..<phnum {
            let base = Int(phoff) + i * phentsize
            let type = reader.u32(base)
            let offset = reader.u64(base + 8)
            let paddr = reader.u64(base + 24)
            let filesz = reader.u64(base + 32)
            let memsz = reader.u64(base + 40)
            guard offset <= UInt64(bytes.count), filesz <= UInt64(bytes.count) - offset else {
                throw fail("segment \(i) extends past the end of the file")
            }
            switch type {
            case Self.ptLoad:
                guard filesz <= memsz else { throw fail("segment \(i) has file size \(filesz) > memory size \(memsz)") }
                guard memsz > 0 else { continue }
                guard paddr.addingReportingOverflow(memsz).overflow == false else { throw fail("segment \(i) wraps around") }
                segments.append(Segment(physicalAddress: paddr, fileOffset: Int(offset), fileSize: Int(filesz), memorySize: memsz))
            case Self.ptNote:
                notes += try ELFImage.parseNotes(reader, from: Int(offset), count: Int(filesz))
            default:
                continue
            }
        }
        guard !segments.isEmpty else { throw fail("no loadable segment") }
        self.bytes = bytes
        self.segments = segments
        self.notes = notes
    }

    /// Reads and parses a kernel file. A device or FIFO (`/dev/zero`) or a file larger than
    /// `maxSize` (the guest's RAM, which no loadable image can exceed) is refused before
    /// anything is read, so a bad `-kernel` cannot exhaust the host's memory.
    public init(contentsOf path: String, maxSize: UInt64) throws {
        // O_NONBLOCK: opening a FIFO must not wait for a writer before it can be refused.
        let fd = try syscallRetrying("open") { cl_open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK, 0) }
        defer { close(fd) }
        var st = stat()
        _ = try syscallChecked("fstat") { fstat(fd, &st) }
        guard st.st_mode & S_IFMT == S_IFREG else {
            throw FormatError(description: "not a regular file (mode 0o\(String(st.st_mode & S_IFMT, radix: 8)))")
        }
        let size = UInt64(st.st_size)
        guard size <= maxSize else {
            throw FormatError(description: "the file is \(size) bytes, larger than the \(maxSize) bytes of guest RAM")
        }
        var bytes = [UInt8](repeating: 0, count: Int(size))
        var filled = 0
        while filled < bytes.count {
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + filled, $0.count - filled) }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw SystemError("read") }
            if n == 0 { break }  // truncated meanwhile: parse what is there
            filled += n
        }
        try self.init(bytes: Array(bytes[0..<filled]))
    }

    static func parseNotes(_ reader: ByteReader, from start: Int, count: Int) throws -> [Note] {
        var notes: [Note] = []
        var cursor = start
        let end = start + count
        func align4(_ n: Int) -> Int { (n + 3) & ~3 }
        while cursor + 12 <= end {
            let namesz = Int(reader.u32(cursor))
            let descsz = Int(reader.u32(cursor + 4))
            let type = reader.u32(cursor + 8)
            let nameStart = cursor + 12
            guard namesz <= end - nameStart else { throw FormatError(description: "not a usable ELF image: note name out of range") }
            let descStart = nameStart + align4(namesz)
            guard descStart <= end, descsz <= end - descStart else {
                throw FormatError(description: "not a usable ELF image: note descriptor out of range")
            }
            let nameBytes = reader.bytes[nameStart..<nameStart + namesz].prefix { $0 != 0 }
            notes.append(Note(name: String(decoding: nameBytes, as: UTF8.self), type: type,
                              descriptor: Array(reader.bytes[descStart..<descStart + descsz])))
            cursor = descStart + align4(descsz)
        }
        return notes
    }

    /// XEN_ELFNOTE_PHYS32_ENTRY: the 32-bit protected-mode entry point of a PVH kernel.
    public var pvhEntry: UInt32? {
        guard let note = notes.first(where: { $0.name == "Xen" && $0.type == 18 }), note.descriptor.count >= 4 else {
            return nil
        }
        return ByteReader(note.descriptor).u32(0)
    }
}

/// Little-endian reads from a byte array at offsets already checked by the caller.
struct ByteReader {
    let bytes: [UInt8]
    init(_ bytes: [UInt8]) { self.bytes = bytes }

    func u16(_ offset: Int) -> UInt16 { UInt16(bytes[offset]) | UInt16(bytes[offset + 1]) << 8 }
    func u32(_ offset: Int) -> UInt32 { UInt32(u16(offset)) | UInt32(u16(offset + 2)) << 16 }
    func u64(_ offset: Int) -> UInt64 { UInt64(u32(offset)) | UInt64(u32(offset + 4)) << 32 }
}
