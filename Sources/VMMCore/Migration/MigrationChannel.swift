import CLinux
import Glibc

/// One end of a migration connection (a unix stream socket), used from a dedicated
/// thread with blocking I/O. Sends sections with their fds; receives sections and
/// collects every fd that arrives into `received`.
public final class MigrationChannel: @unchecked Sendable {
    let socket: FileDescriptor
    public let received = ReceivedFDs()
    /// How long a receive polls before it blocks.
    static let spinNanoseconds: Int64 = 2_000_000

    /// Takes ownership of `socket`.
    public init(socket: FileDescriptor) { self.socket = socket.take() }

    public static func connect(uri: MigrationURI) throws -> MigrationChannel {
        switch uri {
        case .unix(let path):
            MigrationChannel(socket: FileDescriptor(adopting: try UnixSocket.connect(path: path), label: "migration channel to \(uri)"))
        case .tcp(let host, let port):
            MigrationChannel(socket: FileDescriptor(adopting: try TCPSocket.connect(host: host, port: port), label: "migration channel to \(uri)"))
        case .fd:
            throw StreamError("migration channel \(uri): an fd channel is for the target's listening socket only; migrate to unix:PATH or tcp:HOST:PORT")
        }
    }

    /// Unblocks a transfer thread stuck in send or receive (migrate_cancel).
    public func abort() { socket.withRaw { _ = shutdown($0, Int32(SHUT_RDWR)) } }

    /// `fds` stay their owners'; the peer receives copies.
    public func send(_ bytes: [UInt8], fds: [FileDescriptor] = []) throws {
        try socket.withRaw { try send(bytes, fds: fds, on: $0) }
    }

    private func send(_ bytes: [UInt8], fds: [FileDescriptor], on fd: Int32) throws {
        var offset = 0
        if !fds.isEmpty {
            let n = fds.withRaw { raw in bytes.withUnsafeBytes { cl_send_with_fds(fd, $0.baseAddress, $0.count, raw, Int32(raw.count)) } }
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

    /// `section` with `fds` (named in the frame, in this order).
    public func send(_ section: MigrationStream.Section, fds: [NamedFD] = []) throws {
        try send([(section, fds)])
    }

    /// `sections` (after `prefix`, e.g. the stream header) in one write, so the peer wakes
    /// once for all of them, not once per section. Each frame names its own fds; they all
    /// go with the first bytes, in order, which is the order the frames bind them in.
    public func send(_ sections: [(MigrationStream.Section, [NamedFD])], after prefix: [UInt8] = []) throws {
        var bytes = prefix
        var fds: [FileDescriptor] = []
        for (section, named) in sections {
            var section = section
            section.fdNames = named.map(\.name)
            bytes += MigrationStream.encode(section)
            fds += named.map(\.fd)
        }
        try send(bytes, fds: fds)
    }

    /// Exactly `count` bytes, read straight into the result (never past it, so no
    /// buffering is needed); fds that come along are kept in `received`.
    public func receive(_ count: Int, what: String, pollFirst: Bool = false) throws -> [UInt8] {
        try socket.withRaw { try receive(count, what: what, pollFirst: pollFirst, on: $0) }
    }

    private func receive(_ count: Int, what: String, pollFirst: Bool, on fd: Int32) throws -> [UInt8] {
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
                received.append(fds.prefix(Int(fdCount)).map { FileDescriptor(adopting: $0, label: "received migration fd") })
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

    /// Waits until the peer closes the connection (cpr-transfer's HUP: the target took the
    /// cpr state and is ready for the main channel). Bytes from it are an error; so is
    /// anything but an orderly close. A shutdown by `abort` also returns here (the caller
    /// checks for the cancel).
    public func waitForPeerClose(what: String) throws {
        var byte: UInt8 = 0
        // The guest is stopped while the target builds its devices: poll a while before
        // sleeping, as `receive(pollFirst:)` does, yielding the core to the target.
        var spinUntil = monotonicNanoseconds() + Self.spinNanoseconds
        while true {
            let n = socket.withRaw { recv($0, &byte, 1, spinUntil > 0 ? Int32(MSG_DONTWAIT) : 0) }
            if n == 0 { return }
            if n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) {
                if monotonicNanoseconds() >= spinUntil { spinUntil = 0 }
                sched_yield()
                continue
            }
            if n < 0 && errno == EINTR { continue }
            if n < 0 { throw SystemError("migration channel: waiting for \(what)") }
            throw StreamError("migration channel: the peer sent data while this side waited for \(what) (it should close the channel)")
        }
    }

    /// Whether `count` bytes wait in the socket, so that reading them cannot block.
    func hasQueued(_ count: Int) -> Bool {
        var queued: Int32 = 0
        return socket.withRaw { ioctl($0, UInt(FIONREAD), &queued) } == 0 && Int(queued) >= count
    }

    /// Whether the next section's whole frame waits in the socket (its length is peeked,
    /// not taken), so that `receiveSection` cannot block. A length that does not parse
    /// counts as queued: reading it fails at once.
    func nextSectionQueued() -> Bool {
        guard hasQueued(4) else { return false }
        var prefix = [UInt8](repeating: 0, count: 4)
        let n = socket.withRaw { fd in prefix.withUnsafeMutableBytes { recv(fd, $0.baseAddress, 4, Int32(MSG_PEEK | MSG_DONTWAIT)) } }
        guard n == 4 else { return false }
        guard let length = try? MigrationStream.frameLength(prefix) else { return true }
        return hasQueued(4 + length)
    }

    public func receiveSection(version: UInt32 = MigrationStream.version, pollFirst: Bool = false) throws -> MigrationStream.Section {
        let length = try MigrationStream.frameLength(try receive(4, what: "a section length", pollFirst: pollFirst))
        return try MigrationStream.decode(frame: try receive(length, what: "a \(length)-byte section"), version: version)
    }
}
