import CLinux
import Glibc

/// Unix stream sockets. Every fd is created close-on-exec so that a VMM spawned by a
/// concurrently running test never inherits another test's sockets.
public enum UnixSocket {
    /// The longest path that fits `sockaddr_un.sun_path` with its terminating NUL.
    public static let maxPathLength = MemoryLayout.size(ofValue: sockaddr_un().sun_path) - 1

    /// A connected pair, for fake guests and fake QMP servers in tests. The caller owns both.
    public static func pair() throws(SystemError) -> (Int32, Int32) {
        var fds: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0, &fds) == 0 else {
            throw SystemError("socketpair")
        }
        return (fds[0], fds[1])
    }

    /// Connects to a listening socket, e.g. a VMM started with `-qmp unix:PATH,server=on`.
    /// The caller owns the fd.
    public static func connect(path: String) throws(SystemError) -> Int32 {
        let fd = try socket()
        let rc = withAddress(path) { address, length in Glibc.connect(fd, address, length) }
        guard rc == 0 else {
            let error = SystemError("connect \(path)")
            closeDescriptor(fd)
            throw error
        }
        return fd
    }

    static func socket(nonBlocking: Bool = false) throws(SystemError) -> Int32 {
        let flags = Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue) | (nonBlocking ? Int32(SOCK_NONBLOCK.rawValue) : 0)
        let fd = Glibc.socket(AF_UNIX, flags, 0)
        guard fd >= 0 else { throw SystemError("socket") }
        return fd
    }

    static func withAddress<R>(_ path: String, _ body: (UnsafePointer<sockaddr>, socklen_t) -> R) -> R {
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        let bytes = Array(path.utf8.prefix(maxPathLength))
        withUnsafeMutableBytes(of: &address.sun_path) { raw in
            raw.copyBytes(from: bytes)
            raw[bytes.count] = 0
        }
        return withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                body($0, socklen_t(MemoryLayout<sockaddr_un>.size))
            }
        }
    }
}

/// A listening unix socket at a path; owns the fd and unlinks the path when closed. A test
/// can stand in for a migration peer with it.
public final class UnixListener {
    public let path: String
    public private(set) var fd: Int32

    public init(path: String) throws(SystemError) {
        guard path.utf8.count <= UnixSocket.maxPathLength else {
            throw SystemError("bind \(path)", code: ENAMETOOLONG)
        }
        // Non-blocking so that an accept after poll cannot hang if the peer vanished in between.
        let fd = try UnixSocket.socket(nonBlocking: true)
        unlink(path)
        let rc = UnixSocket.withAddress(path) { address, length in bind(fd, address, length) }
        guard rc == 0, listen(fd, 4) == 0 else {
            let error = SystemError("bind/listen \(path)")
            closeDescriptor(fd)
            throw error
        }
        self.path = path
        self.fd = fd
    }

    /// The accepted connection, owned by the caller; nil when nobody connected yet.
    public func acceptNow() throws(SystemError) -> Int32? {
        while true {
            let client = cl_accept(fd)
            if client >= 0 { return client }
            if errno == EINTR { continue }
            if errno == EAGAIN || errno == EWOULDBLOCK { return nil }
            throw SystemError("accept \(path)")
        }
    }

    public func close() {
        guard fd >= 0 else { return }
        closeDescriptor(fd)
        fd = -1
        unlink(path)
    }

    deinit { close() }
}
