import CLinux
import Glibc

/// Unix stream sockets for QMP, the serial console and (later) migration channels.
public enum UnixSocket {
    /// The longest path a `sockaddr_un` holds (107 bytes on Linux).
    public static let maxPathLength = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    static func address(_ path: String) throws -> (sockaddr_un, socklen_t) {
        var addr = sockaddr_un()
        addr.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8)
        let capacity = MemoryLayout.size(ofValue: addr.sun_path)
        guard !bytes.isEmpty, bytes.count < capacity else {
            throw SystemError("unix socket path '\(path)' (must be 1..\(capacity - 1) bytes)", errno: ENAMETOOLONG)
        }
        withUnsafeMutableBytes(of: &addr.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return (addr, socklen_t(MemoryLayout<sockaddr_un>.size))
    }

    /// Binds and listens; a stale socket file from an earlier run is replaced. The file
    /// appears under `path` only once the socket listens (bound under a temporary name,
    /// then renamed): a client that waits for the file and connects at once would
    /// otherwise meet ECONNREFUSED between bind and listen.
    public static func listen(path: String, backlog: Int32 = 8) throws -> Int32 {
        _ = try address(path)
        let temporary = path + ".\(getpid())~"
        // A path too long for the temporary name is bound directly (with the short race).
        let bindPath = (try? address(temporary)) != nil ? temporary : path
        var (addr, len) = try address(bindPath)
        let fd = try syscallChecked("socket(AF_UNIX)") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        for stale in Set([bindPath, path]) {
            var st = stat()
            if lstat(stale, &st) == 0 && (st.st_mode & S_IFMT) == S_IFSOCK { unlink(stale) }
        }
        let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, len) } }
        if rc < 0 {
            let e = errno
            close(fd)
            throw SystemError("bind \(path)", errno: e)
        }
        if Glibc.listen(fd, backlog) < 0 {
            let e = errno
            close(fd)
            unlink(bindPath)
            throw SystemError("listen \(path)", errno: e)
        }
        if bindPath != path && rename(bindPath, path) < 0 {
            let e = errno
            close(fd)
            unlink(bindPath)
            throw SystemError("bind \(path)", errno: e)
        }
        return fd
    }

    public static func connect(path: String) throws -> Int32 {
        var (addr, len) = try address(path)
        let fd = try syscallChecked("socket(AF_UNIX)") { socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0) }
        while true {
            let rc = withUnsafePointer(to: &addr) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, len) } }
            if rc == 0 { return fd }
            if errno == EINTR { continue }
            let e = errno
            close(fd)
            throw SystemError("connect \(path)", errno: e)
        }
    }

    public static func accept(_ listener: Int32) -> Int32? {
        while true {
            let fd = cl_accept(listener)
            if fd >= 0 { return fd }
            if errno == EINTR { continue }
            return nil
        }
    }

    /// Writes what `fd` takes now without blocking: the count (0 when full), nil when
    /// the peer is gone. Sockets get MSG_DONTWAIT; a pipe, tty or file (stdio) is written
    /// only when poll says there is room, at most PIPE_BUF bytes, which then cannot block.
    public static func writeNonBlocking(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Int? {
        guard !bytes.isEmpty else { return 0 }
        while true {
            let n = send(fd, bytes.baseAddress!, bytes.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT))
            if n >= 0 { return n }
            switch errno {
            case EINTR: continue
            case EAGAIN: return 0
            case ENOTSOCK:
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                guard poll(&p, 1, 0) == 1 else { return 0 }
                if p.revents & Int16(POLLERR | POLLHUP) != 0 { return nil }
                let w = Glibc.write(fd, bytes.baseAddress!, min(bytes.count, Int(PIPE_BUF)))
                if w >= 0 { return w }
                if errno == EINTR || errno == EAGAIN { return 0 }
                return nil
            default: return nil
            }
        }
    }

    /// Writes everything, retrying short writes; false when the peer is gone.
    @discardableResult
    public static func writeAll(_ fd: Int32, _ bytes: UnsafeRawBufferPointer) -> Bool {
        var offset = 0
        while offset < bytes.count {
            let n = send(fd, bytes.baseAddress! + offset, bytes.count - offset, Int32(MSG_NOSIGNAL))
            if n > 0 {
                offset += n
            } else if n < 0 && errno == EINTR {
                continue
            } else if n < 0 && errno == ENOTSOCK {
                // stdio or a file: plain write.
                let w = Glibc.write(fd, bytes.baseAddress! + offset, bytes.count - offset)
                if w > 0 { offset += w } else if w < 0 && errno == EINTR { continue } else { return false }
            } else {
                return false
            }
        }
        return true
    }
}
