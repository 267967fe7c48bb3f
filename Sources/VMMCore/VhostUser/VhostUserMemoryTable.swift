import CLinux
import Glibc

/// A vhost-user backend's view of guest RAM: SET_MEM_TABLE's regions, each mapped shared
/// from the fd that came with it, after checking the region against what the fd holds.
/// Translates the front-end's user addresses (ring addresses arrive in that space) to guest
/// physical ones, so the rings run on the same `Virtqueue` as in the VMM.
public final class VhostUserMemoryTable: GuestRAM, @unchecked Sendable {
    struct Mapping {
        let region: VhostUserMemoryRegion
        let host: UnsafeMutableRawPointer
    }
    let mappings: [Mapping]

    /// Maps every region (the codec checked their consistency); the fds are closed once
    /// mapped, as the mappings keep the memory. An error names the region and the reason.
    public init(regions: [VhostUserMemoryRegion], fds: [FileDescriptor]) throws {
        try VhostUserCodec.validate(regions)
        guard regions.count == fds.count else {
            throw VhostUserError("vhost-user SET_MEM_TABLE: \(regions.count) regions but \(fds.count) fds")
        }
        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        var mapped: [Mapping] = []
        defer { for fd in fds { fd.close() } }
        do {
            for (i, (region, fd)) in zip(regions, fds).enumerated() {
                let what = "vhost-user SET_MEM_TABLE: region \(i) (guest \(hex(region.guestAddress))+\(hex(region.size)))"
                guard region.mmapOffset % page == 0 else {
                    throw VhostUserError("\(what): mmap offset \(hex(region.mmapOffset)) is not page-aligned")
                }
                guard region.size <= UInt64(Int.max) else { throw VhostUserError("\(what): size too large to map") }
                var st = stat()
                try fd.withRaw { raw in try syscallChecked("vhost-user SET_MEM_TABLE: fstat region \(i)'s fd") { fstat(raw, &st) } }
                let end = region.mmapOffset + region.size  // no overflow: validated
                guard (st.st_mode & S_IFMT) == S_IFREG, st.st_size >= 0, end <= UInt64(st.st_size) else {
                    throw VhostUserError("\(what): offset \(hex(region.mmapOffset)) + size exceeds its fd's \(st.st_size) bytes (or the fd is not a file)")
                }
                let host = fd.withRaw { mmap(nil, Int(region.size), PROT_READ | PROT_WRITE, MAP_SHARED, $0, off_t(region.mmapOffset)) }
                guard let host, host != MAP_FAILED else { throw SystemError("\(what): mmap") }
                mapped.append(Mapping(region: region, host: host))
            }
        } catch {
            for m in mapped { munmap(m.host, Int(m.region.size)) }
            throw error
        }
        mappings = mapped
    }

    deinit { for m in mappings { munmap(m.host, Int(m.region.size)) } }

    public var regions: [VhostUserMemoryRegion] { mappings.map(\.region) }

    public func slice(at address: UInt64, count: Int) throws -> UnsafeMutableRawBufferPointer {
        guard count >= 0 else { throw GuestMemoryError(description: "negative length \(count)") }
        for m in mappings where address >= m.region.guestAddress && address - m.region.guestAddress < m.region.size {
            guard UInt64(count) <= m.region.size - (address - m.region.guestAddress) else { break }
            return UnsafeMutableRawBufferPointer(start: m.host + Int(address - m.region.guestAddress), count: count)
        }
        throw GuestMemoryError(description: "guest range \(hex(address))+\(count) is outside the vhost-user memory table")
    }

    /// Where writes are logged while LOG_ALL is on; nil otherwise. Set and read under the
    /// back-end's state lock (every access to the table happens under it).
    public var dirtyLog: VhostDirtyLog?

    /// Logs a write by its host bytes (the mapping they lie in gives the guest address).
    public func markDirty(_ bytes: UnsafeMutableRawBufferPointer) {
        guard let log = dirtyLog, let base = bytes.baseAddress, !bytes.isEmpty else { return }
        for m in mappings where base >= m.host && base - m.host < Int(m.region.size) {
            log.mark(guestAddress: m.region.guestAddress + UInt64(base - m.host), count: UInt64(bytes.count))
            return
        }
    }

    /// Logs the first `bytes` bytes of a chain's writable segments (what an RX frame filled).
    public func markWritten(_ segments: [Virtqueue.Segment], bytes: Int) {
        guard let log = dirtyLog else { return }
        var remaining = UInt64(max(bytes, 0))
        for segment in segments where remaining > 0 {
            let count = min(UInt64(segment.length), remaining)
            log.mark(guestAddress: segment.address, count: count)
            remaining -= count
        }
    }

    /// The end of the highest guest-physical range in the table (a log must reach it).
    public var guestEnd: UInt64 { mappings.map { $0.region.guestAddress + $0.region.size }.max() ?? 0 }

    /// The guest physical address of the front-end's `[user, user + count)`, which must lie
    /// inside one region.
    public func guestAddress(ofUser user: UInt64, count: UInt64) -> UInt64? {
        for m in mappings where user >= m.region.userAddress && user - m.region.userAddress < m.region.size {
            guard count <= m.region.size - (user - m.region.userAddress) else { return nil }
            return m.region.guestAddress + (user - m.region.userAddress)
        }
        return nil
    }
}
