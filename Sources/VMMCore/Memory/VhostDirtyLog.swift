import CLinux
import Glibc

/// vhost's dirty log, as the vhost-user spec ("Dirty pages logging") and the kernel's
/// VHOST_SET_LOG_BASE define it: one bit per 4 KiB page of guest *physical* address, bit
/// `p % 8` of byte `p / 8`, set by the back-end (the kernel, or a vhost-user process) for
/// every page it writes while VHOST_F_LOG_ALL is negotiated. Guest RAM outside the VMM's
/// view (`GuestMemory.deviceDirty`, KVM's log) reaches pre-copy only through it.
///
/// The VMM creates it (`init(covering:)`) in a memfd: kernel vhost takes its address
/// (`address`), a vhost-user back-end the fd (`fd`, SET_LOG_BASE). A back-end maps what it
/// received (`init(mapping:size:offset:)`, validated) and `mark`s; the VMM `collect`s.
public final class VhostDirtyLog: @unchecked Sendable {
    public static let pageSize: UInt64 = 4096
    /// A front-end may name at most this much log (it covers 32 TiB of guest RAM).
    public static let maxSize: UInt64 = 1 << 30

    /// The log's bytes (SET_LOG_BASE's mmap_size).
    public let size: UInt64
    /// The memfd (VMM side); nil in a back-end, which needs only the mapping.
    public let fd: FileDescriptor?
    private let mapping: UnsafeMutableRawPointer
    private let mappingLength: Int
    private let bytes: UnsafeMutablePointer<UInt8>
    /// Guest-physical → host-offset translation, for `collect` (VMM side).
    private let regions: [GuestRAMRegion]

    /// VMM side: a zeroed log covering every guest-physical page of `memory`, in a memfd.
    public convenience init(covering memory: GuestMemory) throws {
        try self.init(regions: memory.regions)
    }

    /// A log for RAM laid out as `regions` (guest-physical ranges and their host offsets).
    init(regions: [GuestRAMRegion]) throws {
        let end = regions.map(\.end).max() ?? 0
        // Whole 64-bit words, as QEMU sizes it (vhost_get_log_size): `collect` takes words.
        let words = (end / Self.pageSize + 63) / 64
        let size = max(words, 1) * 8
        self.size = size
        let file = FileDescriptor(adopting: try syscallChecked("memfd_create vhost-log") { cl_memfd_create("vhost-log", CL_MFD_CLOEXEC) },
                                  label: "vhost dirty log memfd")
        try file.withRaw { raw in _ = try syscallRetrying("ftruncate vhost log to \(size)") { ftruncate(raw, off_t(size)) } }
        guard let p = file.withRaw({ mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, $0, 0) }), p != MAP_FAILED else {
            throw SystemError("mmap the vhost dirty log (\(size) bytes)")
        }
        fd = file
        mapping = p
        mappingLength = Int(size)
        bytes = p.assumingMemoryBound(to: UInt8.self)
        self.regions = regions
    }

    /// Back-end side: maps `[offset, offset + size)` of a received log fd. Every value is the
    /// front-end's, so all are checked: a size within 1...`maxSize`, a page-aligned offset,
    /// and a regular file (memfd) that holds the whole range. The fd is not kept.
    public init(mapping received: FileDescriptor, size: UInt64, offset: UInt64) throws {
        guard size >= 1, size <= Self.maxSize else {
            throw VhostUserError("log size \(size) is out of range 1...\(Self.maxSize) bytes")
        }
        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        guard offset % page == 0 else { throw VhostUserError("log offset \(hex(offset)) is not page-aligned") }
        var st = stat()
        try received.withRaw { raw in _ = try syscallChecked("fstat the log fd") { fstat(raw, &st) } }
        let (end, overflow) = offset.addingReportingOverflow(size)
        let size = size
        guard (st.st_mode & S_IFMT) == S_IFREG, st.st_size >= 0, !overflow, end <= UInt64(st.st_size) else {
            throw VhostUserError("log offset \(hex(offset)) + size \(size) exceeds its fd's \(st.st_size) bytes (or the fd is not a file)")
        }
        guard let p = received.withRaw({ mmap(nil, Int(size), PROT_READ | PROT_WRITE, MAP_SHARED, $0, off_t(offset)) }), p != MAP_FAILED else {
            throw SystemError("mmap the vhost dirty log (\(size) bytes at \(hex(offset)))")
        }
        self.size = size
        fd = nil
        mapping = p
        mappingLength = Int(size)
        bytes = p.assumingMemoryBound(to: UInt8.self)
        regions = []
    }

    deinit { munmap(mapping, mappingLength) }

    /// The log's address in this process (kernel vhost's VHOST_SET_LOG_BASE).
    public var address: UInt64 { UInt64(UInt(bitPattern: mapping)) }

    /// Guest pages this log covers.
    public var pageCount: UInt64 { size * 8 }

    /// Back-end: records a write to guest-physical `[guestAddress, guestAddress + count)`.
    /// Returns false when part of the range lies beyond the log (those pages are not
    /// recorded: the front-end sized the log too small, which the caller reports).
    @discardableResult
    public func mark(guestAddress: UInt64, count: UInt64) -> Bool {
        guard count > 0 else { return true }
        let first = guestAddress / Self.pageSize
        let (end, overflow) = guestAddress.addingReportingOverflow(count - 1)
        let last = overflow ? UInt64.max / Self.pageSize : end / Self.pageSize
        guard first < pageCount else { return false }
        var page = first
        while page <= min(last, pageCount - 1) {
            cl_atomic_or_u8(bytes + Int(page / 8), UInt8(1) << UInt8(page % 8))
            page += 1
        }
        return last < pageCount
    }

    /// VMM side: clears the log and ORs what it held into `bitmap`, indexed by page of
    /// host offset (as `DirtyBitmap` and KVM's log in `RAMTransfer`); word by word, each an
    /// atomic exchange, so a page the back-end marks meanwhile is in this call or the next.
    /// Bits outside guest RAM (a hole) are dropped.
    public func collect(into bitmap: inout [UInt64]) {
        let words = UnsafeMutableRawPointer(mapping).assumingMemoryBound(to: UInt64.self)
        for i in 0..<Int(size / 8) {
            var word = cl_atomic_take_u64(words + i)
            while word != 0 {
                let bit = word.trailingZeroBitCount
                word &= word - 1
                let gpa = UInt64(i * 64 + bit) * Self.pageSize
                guard let region = regions.first(where: { gpa >= $0.guestAddress && gpa < $0.end }) else { continue }
                let hostPage = Int((region.hostOffset + gpa - region.guestAddress) / Self.pageSize)
                if hostPage / 64 < bitmap.count { bitmap[hostPage / 64] |= 1 << UInt64(hostPage % 64) }
            }
        }
    }
}
