import CLinux
import Glibc

/// One end of a migration connection (a unix stream socket), used from a dedicated
/// thread with blocking I/O. Sends sections with their fds; receives sections and
/// collects every fd that arrives into `received`.
public final class MigrationChannel: @unchecked Sendable {
    public let fd: Int32
    public let received = ReceivedFDs()
    /// How long a receive polls before it blocks.
    static let spinNanoseconds: Int64 = 2_000_000

    /// Takes ownership of `fd`.
    public init(fd: Int32) { self.fd = fd }
    deinit { close(fd) }

    public static func connect(uri: MigrationURI) throws -> MigrationChannel {
        switch uri {
        case .unix(let path): MigrationChannel(fd: try UnixSocket.connect(path: path))
        case .tcp(let host, let port): MigrationChannel(fd: try TCPSocket.connect(host: host, port: port))
        }
    }

    /// Unblocks a transfer thread stuck in send or receive (migrate_cancel).
    public func abort() { shutdown(fd, Int32(SHUT_RDWR)) }

    public func send(_ bytes: [UInt8], fds: [Int32] = []) throws {
        var offset = 0
        if !fds.isEmpty {
            let n = bytes.withUnsafeBytes { cl_send_with_fds(fd, $0.baseAddress, $0.count, fds, Int32(fds.count)) }
            if n == -Int(EOPNOTSUPP) {
                throw SystemError("migration channel: this channel cannot carry file descriptors (only a unix socket can)", errno: Int32(-n))
            }
            guard n >= 0 else { throw SystemError("migration channel: sendmsg with \(fds.count) fd(s)", errno: Int32(-n)) }
            offset = n
        }
        guard bytes[offset...].withUnsafeBytes({ UnixSocket.writeAll(fd, $0) }) else {
            throw SystemError("migration channel: the peer closed the connection")
        }
    }

    public func send(_ section: MigrationStream.Section, fds: [Int32] = []) throws {
        precondition(section.fdCount == fds.count)
        try send(MigrationStream.encode(section), fds: fds)
    }

    /// Exactly `count` bytes, read straight into the result (never past it, so no
    /// buffering is needed); fds that come along are kept in `received`.
    public func receive(_ count: Int, what: String, pollFirst: Bool = false) throws -> [UInt8] {
        var fds = [Int32](repeating: -1, count: 64)
        var failure: StreamError?
        // Poll before sleeping where the wait is short and every microsecond is downtime
        // (the source waiting for the acknowledgement): a wake-up from sleep costs this
        // machine 100 us or more. Not everywhere: a poller takes a core from the peer.
        var spinUntil = pollFirst ? monotonicNanoseconds() + Self.spinNanoseconds : 0
        let bytes = [UInt8](unsafeUninitializedCapacity: count) { buffer, initialized in
            var offset = 0
            while offset < count {
                var fdCount: Int32 = 0
                let flags = spinUntil > 0 ? CL_MSG_DONTWAIT : 0
                let n = cl_recv_with_fds_flags(fd, buffer.baseAddress! + offset, count - offset, &fds, 64, &fdCount, flags)
                received.append(Array(fds.prefix(Int(fdCount))))
                if n == -Int(EAGAIN) {
                    if monotonicNanoseconds() >= spinUntil { spinUntil = 0 }
                    // Two cores: the peer's threads, which we wait for, may need this one.
                    sched_yield()
                    continue
                }
                if n == -Int(EINTR) { continue }
                guard n > 0 else {
                    failure = StreamError(n == 0 ? "migration stream ended while reading \(what) (the peer closed the connection)"
                                                 : "migration channel: \(String(cString: strerror(Int32(-n)))) while reading \(what)")
                    break
                }
                offset += n
            }
            // Zero what was not read so the array is fully initialised even on failure.
            if offset < count { (buffer.baseAddress! + offset).initialize(repeating: 0, count: count - offset) }
            initialized = count
        }
        if let failure { throw failure }
        return bytes
    }

    public func receiveSection(pollFirst: Bool = false) throws -> MigrationStream.Section {
        let length = try MigrationStream.frameLength(try receive(4, what: "a section length", pollFirst: pollFirst))
        return try MigrationStream.decode(frame: try receive(length, what: "a \(length)-byte section"))
    }
}
