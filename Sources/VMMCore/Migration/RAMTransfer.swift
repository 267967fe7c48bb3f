import CLinux
import Glibc
import Logging

/// Guest RAM on the migration thread: the source's pre-copy passes (every page, then
/// the pages dirtied meanwhile, until the rest fits the downtime limit) and the
/// target's loader.
///
/// RAM section payload: records of `address:u64` followed by a 4096-byte page, or, when
/// bit 0 of the address is set, nothing: that page is all zero. The first pass skips
/// zero pages entirely (the target empties RAM that may hold anything first, see
/// `emptyForCopy`); later passes must send a page
/// that became zero, as a record without data.
struct RAMTransfer {
    static let pageSize = 4096
    static let zeroPageFlag: UInt64 = 1
    /// A RAM section is sent once its payload reaches this size.
    static let sectionBytes = 1 << 20
    /// Pre-copy gives up converging after this many passes and stops the guest anyway.
    static let maxPasses = 30

    let memory: GuestMemory
    let channel: MigrationChannel
    let progress: MigrationState
    /// Bytes per second for the live passes; 0 for unlimited.
    let maxBandwidth: UInt64
    let logger: Logger
    /// Devices whose dirty logs (`MachineDevice.collectDirty`) join KVM's and the VMM's.
    var deviceLogs: [any MachineDevice] = []

    struct PassResult {
        var pagesScanned = 0
        var pagesSent = 0
        var zeroPages = 0
        var bytesSent = 0
        var nanoseconds: Int64 = 0
    }

    /// Sends the pages set in `bitmap` (indexed by host-offset page), or every non-zero
    /// page when `bitmap` is nil. `live`: the guest still runs, so honour max-bandwidth.
    func sendPass(bitmap: [UInt64]?, live: Bool) throws -> PassResult {
        let start = monotonicNanoseconds()
        var result = PassResult()
        // Throttled, sections are small enough (1/20 s of bandwidth) for an even rate and a
        // prompt reaction to migrate_cancel.
        let throttled = live && maxBandwidth > 0
        let flushAt = throttled ? max(16 << 10, min(Self.sectionBytes, Int(maxBandwidth / 20))) : Self.sectionBytes
        var w = StreamWriter(reservingCapacity: flushAt + Self.pageSize + 8)
        func flush() throws {
            guard !w.bytes.isEmpty else { return }
            try channel.send(.init(kind: .ram, payload: w.bytes))
            result.bytesSent += w.bytes.count
            progress.ramTransferred.add(UInt64(w.bytes.count), ordering: .relaxed)
            w = StreamWriter(reservingCapacity: flushAt + Self.pageSize + 8)
            try progress.checkCancelled()
            if throttled {
                let due = Int64(Double(result.bytesSent) / Double(maxBandwidth) * 1e9)
                let elapsed = monotonicNanoseconds() - start
                if due > elapsed { usleep(UInt32(min((due - elapsed) / 1000, 1_000_000))) }
            }
        }
        for region in memory.regions {
            let base = memory.hostAddress(of: region)
            let firstPage = Int(region.hostOffset) / Self.pageSize
            let pages = Int(region.size) / Self.pageSize
            // A full pass over shared RAM reads only what the guest ever wrote: holes are zero.
            var extents = [0..<pages]
            if bitmap == nil, let data = memory.dataExtents(in: region.hostOffset..<region.hostOffset + region.size) {
                extents = data.map { Int($0.lowerBound - region.hostOffset) / Self.pageSize..<Int($0.upperBound - region.hostOffset) / Self.pageSize }
                result.zeroPages += pages - extents.reduce(0) { $0 + $1.count }
            }
            for extent in extents {
                var page = extent.lowerBound
                while page < extent.upperBound {
                    if let bitmap {
                        // Skip clean runs a word at a time.
                        let global = firstPage + page
                        let word = bitmap[global / 64] >> UInt64(global % 64)
                        if word == 0 {
                            page += 64 - global % 64
                            continue
                        }
                        if word & 1 == 0 {
                            page += 1
                            continue
                        }
                    }
                    defer { page += 1 }
                    result.pagesScanned += 1
                    let bytes = UnsafeRawBufferPointer(start: base + page * Self.pageSize, count: Self.pageSize)
                    let address = region.guestAddress + UInt64(page * Self.pageSize)
                    if Self.isZeroPage(bytes) {
                        result.zeroPages += 1
                        if bitmap == nil { continue }
                        w.u64(address | Self.zeroPageFlag)
                    } else {
                        w.u64(address)
                        w.raw(bytes)
                        result.pagesSent += 1
                    }
                    if w.bytes.count >= flushAt { try flush() }
                }
            }
        }
        try flush()
        result.nanoseconds = monotonicNanoseconds() - start
        progress.pagesTransferred.add(UInt64(result.pagesSent), ordering: .relaxed)
        progress.zeroPages.add(UInt64(result.zeroPages), ordering: .relaxed)
        return result
    }

    /// Live passes while the guest runs. Returns the pages still dirty when the
    /// estimated time to send them fits `downtimeLimit` (or pre-copy stopped
    /// converging): the caller stops the guest and sends those plus what the guest
    /// wrote meanwhile.
    func precopy(vm: VirtualMachine, downtimeLimit: Int64) throws -> [UInt64] {
        var last = try sendPass(bitmap: nil, live: true)
        var pass = 1
        while true {
            logger.debug("pre-copy pass \(pass): \(last.pagesScanned) pages scanned, \(last.pagesSent) sent, \(last.bytesSent) bytes in \(last.nanoseconds / 1000) us")
            let dirty = try collectDirty(vm: vm)
            let dirtyPages = dirty.reduce(0) { $0 + $1.nonzeroBitCount }
            progress.ramRemaining.store(UInt64(dirtyPages * Self.pageSize), ordering: .relaxed)
            // Bandwidth as the last pass achieved it, in pages per nanosecond of sending.
            let nanosecondsPerPage = Double(max(last.nanoseconds, 1)) / Double(max(last.pagesScanned, 1))
            let expected = Int64(Double(dirtyPages) * nanosecondsPerPage)
            progress.expectedDowntime.store(expected / 1_000_000, ordering: .relaxed)
            if expected <= downtimeLimit || pass >= Self.maxPasses {
                return dirty
            }
            last = try sendPass(bitmap: dirty, live: true)
            pass += 1
        }
    }

    /// Pages the guest (KVM's log), the VMM's devices or their back-ends (vhost's dirty
    /// log) wrote since the last collection.
    func collectDirty(vm: VirtualMachine, into bitmap: [UInt64]? = nil) throws -> [UInt64] {
        var dirty = bitmap ?? [UInt64](repeating: 0, count: memory.deviceDirty.wordCount)
        try vm.collectDirtyLog(memory: memory, into: &dirty)
        memory.deviceDirty.take(into: &dirty)
        for device in deviceLogs { device.collectDirty(into: &dirty) }
        progress.dirtySyncCount.add(1, ordering: .relaxed)
        return dirty
    }

    /// Word-wise: this runs over every page of RAM.
    static func isZeroPage(_ page: UnsafeRawBufferPointer) -> Bool {
        let words = page.count / 8
        for i in 0..<words where page.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self) != 0 { return false }
        return page[(words * 8)...].allSatisfy { $0 == 0 }
    }

    /// Target side: applies one RAM section.
    static func load(_ payload: [UInt8], into memory: GuestMemory, progress: MigrationState) throws {
        var r = StreamReader(payload, context: "RAM section")
        while !r.isAtEnd {
            let record = try r.u64("page address")
            let address = record & ~zeroPageFlag
            guard address % UInt64(pageSize) == 0 else { throw StreamError("RAM record for unaligned address \(hex(address))") }
            let target: UnsafeMutableRawBufferPointer
            do {
                target = try memory.slice(at: address, count: pageSize)
            } catch {
                throw StreamError("RAM page at \(hex(address)) lies outside this machine's RAM")
            }
            if record & zeroPageFlag != 0 {
                target.initializeMemory(as: UInt8.self, repeating: 0)
                progress.zeroPages.add(1, ordering: .relaxed)
            } else {
                try r.copy(pageSize, into: target, "page at \(hex(address))")
                progress.pagesTransferred.add(1, ordering: .relaxed)
            }
        }
        progress.ramTransferred.add(UInt64(payload.count), ordering: .relaxed)
    }
}

/// A migration target's RAM before pages are copied into it. The source sends no zero
/// page in its first pass, so RAM that may hold anything else (a file left by an earlier
/// guest, or filled by someone) is emptied first; RAM known to be zero is left alone,
/// so nothing is allocated for it.
extension GuestMemory {
    /// "device:inode" of the file behind this RAM, nil for a memfd.
    var fileIdentity: String? {
        guard case .file = backing, let st = try? backingStatus() else { return nil }
        return "\(st.st_dev):\(st.st_ino)"
    }

    /// Makes every page zero unless it is known to be. The vCPU has never run and an
    /// incoming machine loads no kernel, so a memfd (created empty by this process) is
    /// zero, and so is a file without data extents.
    func emptyForCopy(sourceRAMFile: String?) throws {
        guard case .file(let path) = backing, fileHasData() else { return }
        guard shared else {
            // share=off: the file is never written; anonymous memory at the same address
            // (KVM's slots follow the address) replaces the private mapping of it.
            guard let p = mmap(host, Int(size), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED | MAP_NORESERVE, -1, 0),
                  p != MAP_FAILED else { throw SystemError("mmap anonymous RAM over the private mapping of \(path)") }
            return
        }
        if let sourceRAMFile, sourceRAMFile == fileIdentity {
            throw StreamError("the source copies its RAM into \(path), the file this machine maps shared too: turn on x-ignore-shared on both sides to keep the RAM where it is, or give the target its own file")
        }
        if fd.withRaw({ cl_punch_hole($0, 0, off_t(size)) }) != 0 {
            // A filesystem without hole punching: write the zeros.
            UnsafeMutableRawBufferPointer(start: host, count: Int(size)).initializeMemory(as: UInt8.self, repeating: 0)
        }
    }

    /// Whether the backing file has any data extent (SEEK_DATA); true when that cannot be told.
    private func fileHasData() -> Bool {
        if fd.withRaw({ lseek($0, 0, CL_SEEK_DATA) }) >= 0 { return true }
        return errno != ENXIO
    }
}
