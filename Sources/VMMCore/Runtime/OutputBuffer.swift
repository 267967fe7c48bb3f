import Glibc

/// Bytes waiting for a peer that reads slower than we write (a QMP client, a console
/// client). Writers append and never block; the event loop flushes when the fd is
/// writable. `limit` bounds the memory one slow peer can hold; what happens beyond it
/// (disconnect, drop) is the owner's choice.
struct OutputBuffer {
    let limit: Int
    private var bytes: [UInt8] = []
    private var head = 0

    init(limit: Int) { self.limit = limit }

    var count: Int { bytes.count - head }
    var isEmpty: Bool { count == 0 }

    /// Appends all of `data`, or nothing (false) when it would pass `limit`.
    mutating func append(_ data: some Collection<UInt8>) -> Bool {
        guard count + data.count <= limit else { return false }
        bytes.append(contentsOf: data)
        return true
    }

    enum FlushResult { case drained, pending, peerGone }

    /// Writes what the fd takes now without blocking.
    mutating func flush(to fd: Int32) -> FlushResult {
        while head < bytes.count {
            let n = bytes[head...].withUnsafeBytes { UnixSocket.writeNonBlocking(fd, $0) }
            guard let n else { return .peerGone }
            if n == 0 { break }
            head += n
        }
        // Compact once the sent prefix dominates, so appends stay amortized O(1).
        if head == bytes.count {
            bytes.removeAll(keepingCapacity: bytes.count <= 1 << 16)
            head = 0
        } else if head > bytes.count / 2 {
            bytes.removeFirst(head)
            head = 0
        }
        return isEmpty ? .drained : .pending
    }

    mutating func removeAll() {
        bytes = []
        head = 0
    }
}
