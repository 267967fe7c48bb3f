import CLinux
import Glibc
import Synchronization

/// Owns one connected stream socket. A reader thread hands every chunk to `onData` and
/// reports the end once; writers share a lock. Closing shuts the socket down first, which
/// wakes the blocked `read`, then joins the reader, and only then closes the fd, so the
/// number can never be reused while the reader still holds it.
final class SocketStream: Sendable {
    let fd: Int32
    private let writeClosed = Mutex(false)
    private let closeStarted = Mutex(false)
    private let reader: BlockingThread

    /// Takes ownership of `fd`, also when it throws.
    init(
        takingOwnershipOf fd: Int32, threadName: String,
        onData: @escaping @Sendable ([UInt8]) -> Void,
        onEnd: @escaping @Sendable (SystemError?) -> Void
    ) throws(SystemError) {
        self.fd = fd
        do {
            reader = try BlockingThread(name: threadName) {
                var buffer = [UInt8](repeating: 0, count: 65536)
                while true {
                    let n = buffer.withUnsafeMutableBytes { Glibc.read(fd, $0.baseAddress, $0.count) }
                    if n > 0 {
                        onData(Array(buffer[0..<n]))
                    } else if n == 0 {
                        onEnd(nil)
                        return
                    } else if errno != EINTR {
                        // ECONNRESET is how QEMU's quit often ends the stream: still just an end.
                        let code = errno
                        onEnd(code == ECONNRESET ? nil : SystemError("read", code: code))
                        return
                    }
                }
            }
        } catch {
            closeDescriptor(fd)
            throw error
        }
    }

    /// Sends `bytes`; `fds` ride along (SCM_RIGHTS) with the first part of the message.
    func write(_ bytes: [UInt8], fds: [Int32] = []) throws(SystemError) {
        try writeClosed.withLock { closed throws(SystemError) in
            if closed { throw SystemError("send", code: EBADF) }
            var rest = bytes[...]
            if !fds.isEmpty {
                let n = bytes.withUnsafeBytes { cl_send_with_fds(fd, $0.baseAddress, $0.count, fds, Int32(fds.count)) }
                if n < 0 { throw SystemError("sendmsg with \(fds.count) fd(s)", code: Int32(-n)) }
                rest = bytes[n...]
            }
            if !rest.isEmpty { try sendAll(fd, Array(rest)) }
        }
    }

    /// Idempotent; safe from any thread including the reader's own callbacks.
    func close() {
        let first = closeStarted.withLock { started in
            defer { started = true }
            return !started
        }
        guard first else { return }
        // Outside the write lock: shutdown also unblocks a writer stuck on a full socket.
        _ = Glibc.shutdown(fd, Int32(SHUT_RDWR))
        writeClosed.withLock { $0 = true }
        reader.join()
        closeDescriptor(fd)
    }

    deinit { close() }
}

/// Cuts a byte stream into lines at LF, dropping a CR before it (QMP ends lines with CRLF).
struct LineSplitter {
    private var pending: [UInt8] = []

    mutating func append(_ bytes: [UInt8]) -> [String] {
        pending.append(contentsOf: bytes)
        var lines: [String] = []
        var start = 0
        while let newline = pending[start...].firstIndex(of: UInt8(ascii: "\n")) {
            var end = newline
            if end > start, pending[end - 1] == UInt8(ascii: "\r") { end -= 1 }
            lines.append(String(decoding: pending[start..<end], as: UTF8.self))
            start = newline + 1
        }
        pending.removeFirst(start)
        return lines
    }

    /// What arrived after the last newline, e.g. an unterminated reply.
    var remainder: String { String(decoding: pending, as: UTF8.self) }
}
