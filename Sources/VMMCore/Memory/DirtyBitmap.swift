import CLinux

/// One bit per 4 KiB page of guest RAM (by host offset), for the pages the VMM writes
/// itself: KVM's dirty log only sees the guest's writes, so virtio used rings and RX
/// buffers written by device threads would otherwise miss the next pre-copy round.
/// Always on: a relaxed atomic OR per written buffer costs nothing next to the syscall
/// that fills it.
public final class DirtyBitmap: @unchecked Sendable {
    public static let pageSize: UInt64 = 4096
    public let pageCount: Int
    private let words: UnsafeMutablePointer<UInt64>
    public let wordCount: Int

    public init(bytes: UInt64) {
        pageCount = Int((bytes + Self.pageSize - 1) / Self.pageSize)
        wordCount = (pageCount + 63) / 64
        words = .allocate(capacity: wordCount)
        words.initialize(repeating: 0, count: wordCount)
    }

    deinit { words.deallocate() }

    /// Marks the pages of host-offset range `[offset, offset + count)`.
    public func mark(offset: UInt64, count: Int) {
        guard count > 0 else { return }
        var page = Int(offset / Self.pageSize)
        let last = min(Int((offset + UInt64(count) - 1) / Self.pageSize), pageCount - 1)
        while page <= last {
            let bit = page % 64
            let n = min(64 - bit, last - page + 1)
            let mask = n == 64 ? UInt64.max : ((UInt64(1) << UInt64(n)) - 1) << UInt64(bit)
            cl_atomic_or_u64(words + page / 64, mask)
            page += n
        }
    }

    /// Clears the map and ORs what it held into `into` (word-indexed like this map).
    public func take(into target: inout [UInt64]) {
        precondition(target.count >= wordCount)
        for i in 0..<wordCount {
            let w = cl_atomic_take_u64(words + i)
            if w != 0 { target[i] |= w }
        }
    }
}
