import CLinux
import Glibc

/// One vhost-user unix-socket connection, read and written with blocking calls: its
/// owner is a thread of its own (the backend's socket thread), never the cooperative pool.
public final class VhostUserConnection: @unchecked Sendable {
    public let socket: FileDescriptor

    public init(socket: FileDescriptor) { self.socket = socket }

    /// The next message, or nil when the peer closed the connection between messages.
    /// The fds arrive with the header's bytes (the sender's one sendmsg).
    public func receive() throws -> VhostUserReceived? {
        var headerBytes = [UInt8](repeating: 0, count: VhostUserCodec.headerSize)
        var raw = [Int32](repeating: -1, count: VhostUserCodec.maxFDs + 1)
        var count: Int32 = 0
        let n = socket.withRaw { fd in
            headerBytes.withUnsafeMutableBytes { buf in
                retryingEINTR { cl_recv_with_fds(fd, buf.baseAddress, buf.count, &raw, Int32(raw.count), &count) }
            }
        }
        let fds = raw[..<Int(max(count, 0))].map { FileDescriptor(adopting: $0, label: "vhost-user received fd") }
        if n == 0 { return nil }
        guard n > 0 else { throw SystemError("vhost-user receive", errno: Int32(-n)) }
        if n < headerBytes.count {
            try readExactly(into: &headerBytes, from: Int(n), what: "header")
        }
        let header = try VhostUserCodec.decodeHeader(headerBytes)
        var payload = [UInt8](repeating: 0, count: Int(header.size))
        try readExactly(into: &payload, from: 0, what: header.requestName)
        if fds.count > VhostUserCodec.maxFDs {
            for fd in fds { fd.close() }
            throw VhostUserError("vhost-user \(header.requestName): more than \(VhostUserCodec.maxFDs) fds attached")
        }
        do {
            return try VhostUserCodec.decode(header: header, payload: payload, fds: fds)
        } catch var error as VhostUserError {
            error.header = header
            throw error
        }
    }

    private func readExactly(into buffer: inout [UInt8], from start: Int, what: String) throws {
        var offset = start
        while offset < buffer.count {
            let n = socket.withRaw { fd in buffer.withUnsafeMutableBytes { b in retryingEINTR { let r = Glibc.read(fd, b.baseAddress! + offset, b.count - offset); return r < 0 ? -Int(errno) : r } } }
            if n == 0 { throw VhostUserError("vhost-user \(what): connection closed inside the message") }
            guard n > 0 else { throw SystemError("vhost-user read \(what)", errno: Int32(-n)) }
            offset += n
        }
    }

    /// Sends one message with its fds (lent for the call).
    public func send(_ message: VhostUserMessage, flags: VhostUserFlags = [], fds: [FileDescriptor] = []) throws {
        let bytes = VhostUserCodec.encode(message, flags: flags)
        let n = try fds.withRaw { raw in
            try socket.withRaw { fd in
                bytes.withUnsafeBytes { b in retryingEINTR { cl_send_with_fds(fd, b.baseAddress, b.count, raw, Int32(raw.count)) } }
            }
        }
        guard n == bytes.count else {
            throw n < 0 ? SystemError("vhost-user send \(message.request.name)", errno: Int32(-n))
                        : VhostUserError("vhost-user send \(message.request.name): short write of \(n) of \(bytes.count) bytes")
        }
    }
}

/// Repeats a call that returns -errno while it returns -EINTR.
private func retryingEINTR<T: SignedInteger>(_ call: () -> T) -> T {
    while true {
        let r = call()
        if r == T(-EINTR) { continue }
        return r
    }
}
