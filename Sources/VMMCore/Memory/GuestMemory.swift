import CLinux
import Glibc

/// Where guest RAM lives on the host.
public enum MemoryBacking: Sendable, Equatable {
    /// An anonymous memfd: the default, and what cpr-transfer/local migration hand over as an fd.
    case memfd
    /// A file (tmpfs, hugetlbfs or any filesystem) that another process can map too.
    case file(path: String)
}

/// A guest-physical range of RAM and where it starts in the host mapping.
public struct GuestRAMRegion: Sendable, Equatable {
    public var guestAddress: UInt64
    public var size: UInt64
    public var hostOffset: UInt64
    public var end: UInt64 { guestAddress + size }
}

public struct GuestMemoryError: Error, CustomStringConvertible, Sendable {
    public let description: String
}

/// The guest's RAM: one host mapping split into guest-physical regions around the
/// PCI hole below 4 GiB. Every access is bounds-checked against those regions.
public final class GuestMemory: @unchecked Sendable {
    /// RAM above this address moves to 4 GiB, leaving room for device MMIO below 4 GiB.
    public static let lowRAMLimit: UInt64 = 0xC000_0000
    public static let highRAMStart: UInt64 = 0x1_0000_0000

    public let size: UInt64
    public private(set) var backing: MemoryBacking
    public private(set) var shared: Bool
    /// The memfd or file descriptor behind the RAM; owned and closed by this object.
    public private(set) var fd: FileDescriptor
    public let regions: [GuestRAMRegion]
    /// Pages written by the VMM (not the guest) since the migration code last looked.
    public let deviceDirty: DirtyBitmap
    let host: UnsafeMutableRawPointer

    public init(size: UInt64, backing: MemoryBacking = .memfd, shared: Bool = false, name: String = "guest-ram") throws {
        guard size >= 1 << 20, size % 4096 == 0 else {
            throw GuestMemoryError(description: "RAM size \(size) must be a multiple of 4 KiB and at least 1 MiB")
        }
        let file: FileDescriptor
        switch backing {
        case .memfd:
            file = FileDescriptor(adopting: try syscallChecked("memfd_create \(name)") { cl_memfd_create(name, CL_MFD_CLOEXEC) },
                                  label: "guest RAM memfd")
        case .file(let path):
            file = FileDescriptor(adopting: try syscallRetrying("open mem-path \(path)") { cl_open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0o600) },
                                  label: "guest RAM file \(path)")
        }
        host = try file.withRaw { fd in
            var st = stat()
            try syscallChecked("fstat RAM backing") { fstat(fd, &st) }
            let capacity = GuestMemory.hostCapacity(fd: fd, backing: backing, shared: shared, st: st)
            guard size <= capacity.bytes else {
                throw GuestMemoryError(description: "\(size) bytes (\(size >> 20) MiB) of RAM is more than this host can back: \(capacity.bytes) bytes (\(capacity.bytes >> 20) MiB) of \(capacity.what)")
            }
            if UInt64(st.st_size) < size {
                try syscallRetrying("ftruncate RAM backing to \(size)") { ftruncate(fd, off_t(size)) }
            }
            let flags = shared ? MAP_SHARED : MAP_PRIVATE
            guard let p = mmap(nil, Int(size), PROT_READ | PROT_WRITE, flags | MAP_NORESERVE, fd, 0), p != MAP_FAILED else {
                throw SystemError("mmap \(size) bytes of guest RAM")
            }
            return p
        }
        fd = file
        self.size = size
        self.backing = backing
        self.shared = shared
        regions = GuestMemory.layout(size: size)
        deviceDirty = DirtyBitmap(bytes: size)
    }

    deinit { munmap(host, Int(size)) }

    /// How much RAM this host can give the guest, checked up front as QEMU's "cannot set up
    /// guest memory" is: pages are only allocated at first touch, so a guest larger than
    /// this would boot and then die of SIGBUS or the OOM killer. A shared file is limited
    /// by its filesystem (a tmpfs's size, free huge pages) plus what it already holds;
    /// anything else by the host's RAM + swap, the kernel's own overcommit heuristic.
    static func hostCapacity(fd: Int32, backing: MemoryBacking, shared: Bool, st: stat) -> (bytes: UInt64, what: String) {
        if case .file = backing, shared {
            var fs = statfs()
            if fstatfs(fd, &fs) == 0 && fs.f_blocks > 0 {
                let free = UInt64(fs.f_bavail).multipliedReportingOverflow(by: UInt64(fs.f_bsize))
                let held = UInt64(max(st.st_blocks, 0)) * 512
                if !free.overflow {
                    return (free.partialValue.addingReportingOverflow(held).overflow ? .max : free.partialValue + held,
                            "free space on the mem-path's filesystem plus the file's")
                }
                return (.max, "")
            }
        }
        var info = sysinfo()
        guard sysinfo(&info) == 0 else { return (.max, "") }
        let unit = UInt64(max(info.mem_unit, 1))
        let (ram, o1) = UInt64(info.totalram).multipliedReportingOverflow(by: unit)
        let (swap, o2) = UInt64(info.totalswap).multipliedReportingOverflow(by: unit)
        let (total, o3) = ram.addingReportingOverflow(swap)
        return (o1 || o2 || o3 ? .max : total, "RAM + swap")
    }

    /// Low RAM up to the PCI hole, the rest above 4 GiB.
    public static func layout(size: UInt64) -> [GuestRAMRegion] {
        let low = min(size, lowRAMLimit)
        var regions = [GuestRAMRegion(guestAddress: 0, size: low, hostOffset: 0)]
        if size > low {
            regions.append(GuestRAMRegion(guestAddress: highRAMStart, size: size - low, hostOffset: low))
        }
        return regions
    }

    public func hostAddress(of region: GuestRAMRegion) -> UnsafeMutableRawPointer {
        host + Int(region.hostOffset)
    }

    /// The host bytes behind `[address, address + count)`, which must lie inside one RAM region.
    public func slice(at address: UInt64, count: Int) throws -> UnsafeMutableRawBufferPointer {
        guard count >= 0 else { throw GuestMemoryError(description: "negative length \(count)") }
        for region in regions where address >= region.guestAddress && address < region.end {
            let (end, overflow) = address.addingReportingOverflow(UInt64(count))
            guard !overflow, end <= region.end else { break }
            return UnsafeMutableRawBufferPointer(start: host + Int(region.hostOffset + (address - region.guestAddress)), count: count)
        }
        throw GuestMemoryError(description: "guest range 0x\(String(address, radix: 16))+\(count) is outside guest RAM")
    }

    public func write(_ bytes: some Collection<UInt8>, at address: UInt64) throws {
        let target = try slice(at: address, count: bytes.count)
        target.copyBytes(from: bytes)
        markDirty(target)
    }

    /// Records a VMM write into guest RAM (for pre-copy migration) by its host bytes.
    public func markDirty(_ bytes: UnsafeMutableRawBufferPointer) {
        guard let base = bytes.baseAddress else { return }
        deviceDirty.mark(offset: UInt64(base - host), count: bytes.count)
    }

    /// The parts of host-offset range `range` that hold data, from the backing file's
    /// holes (SEEK_DATA/SEEK_HOLE); holes read as zero. nil when that cannot be known: a
    /// private mapping keeps the guest's writes out of the file.
    public func dataExtents(in range: Range<UInt64>) -> [Range<UInt64>]? {
        guard shared else { return nil }
        return fd.withRaw { fd in Self.dataExtents(of: fd, in: range) }
    }

    private static func dataExtents(of fd: Int32, in range: Range<UInt64>) -> [Range<UInt64>]? {
        var extents: [Range<UInt64>] = []
        var offset = range.lowerBound
        while offset < range.upperBound {
            let data = lseek(fd, off_t(offset), CL_SEEK_DATA)
            if data < 0 {
                if errno == ENXIO { break }  // no data after offset
                return nil
            }
            guard UInt64(data) < range.upperBound else { break }
            let hole = lseek(fd, data, CL_SEEK_HOLE)
            guard hole >= 0 else { return nil }
            // Extents come in filesystem blocks; widen to whole pages.
            let start = UInt64(data) & ~UInt64(4095)
            let end = min((UInt64(hole) + 4095) & ~UInt64(4095), range.upperBound)
            extents.append(start..<end)
            offset = end
        }
        return extents
    }

    /// `fstat` of the memfd or file behind the RAM (its identity, its size).
    public func backingStatus() throws -> stat {
        var st = stat()
        _ = try fd.withRaw { raw in try syscallChecked("fstat RAM backing") { fstat(raw, &st) } }
        return st
    }

    /// Replaces the RAM's backing with `newFD`, mapped shared at the same host address,
    /// so KVM's memory slots and every device keep their pointers. For a migration
    /// target that adopts the source's memfd before its vCPU ever ran.
    /// Takes `newFD` (closed with this memory, or at once on failure).
    public func adopt(sharedFD newFD: FileDescriptor, backing newBacking: MemoryBacking) throws {
        let newFD = newFD.take()
        try newFD.withRaw { raw in
            var st = stat()
            try syscallChecked("fstat received RAM fd") { fstat(raw, &st) }
            guard UInt64(st.st_size) >= size else {
                throw GuestMemoryError(description: "the received RAM is \(st.st_size) bytes, this machine has \(size)")
            }
            guard let p = mmap(host, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED | MAP_FIXED, raw, 0), p != MAP_FAILED else {
                throw SystemError("mmap the received RAM over this machine's")
            }
        }
        fd = newFD
        backing = newBacking
        shared = true
    }

    /// Whether `[address, address + count)` lies inside one RAM region; safe for any
    /// count, so a size read from an untrusted image can be checked before conversion.
    public func contains(_ address: UInt64, count: UInt64) -> Bool {
        regions.contains { region in
            address >= region.guestAddress && address <= region.end && count <= region.end - address
        }
    }

    /// Zeroes `[address, address + count)`: RAM from a reused file or an earlier guest is not zero.
    public func zero(at address: UInt64, count: Int) throws {
        let target = try slice(at: address, count: count)
        target.initializeMemory(as: UInt8.self, repeating: 0)
        markDirty(target)
    }

    public func read(at address: UInt64, count: Int) throws -> [UInt8] {
        Array(try slice(at: address, count: count))
    }

    public func store<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws {
        let target = try slice(at: address, count: MemoryLayout<T>.size)
        target.storeBytes(of: value.littleEndian, as: T.self)
        markDirty(target)
    }

    public func load<T: FixedWidthInteger>(_ type: T.Type, at address: UInt64) throws -> T {
        T(littleEndian: try slice(at: address, count: MemoryLayout<T>.size).loadUnaligned(as: T.self))
    }
}
