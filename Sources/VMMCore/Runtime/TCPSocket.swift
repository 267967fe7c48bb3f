import CLinux
import Glibc

/// TCP sockets for migration across hosts (`tcp:HOST:PORT`). Names resolve with
/// getaddrinfo; every address it returns is tried in order, as QEMU does.
public enum TCPSocket {
    public static func connect(host: String, port: UInt16) throws -> Int32 {
        try withAddresses(host: host, port: port, passive: false, what: "connect") { fd, address, length in
            while Glibc.connect(fd, address, length) < 0 {
                if errno != EINTR { return errno }
            }
            setNoDelay(fd)
            return 0
        }
    }

    public static func listen(host: String, port: UInt16) throws -> Int32 {
        try withAddresses(host: host, port: port, passive: true, what: "listen on") { fd, address, length in
            var one: Int32 = 1
            setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
            if bind(fd, address, length) < 0 || Glibc.listen(fd, 1) < 0 { return errno }
            return 0
        }
    }

    /// QEMU's wording (util/qemu-sockets.c).
    struct ResolveError: Error, CustomStringConvertible {
        let host: String
        let port: UInt16
        let reason: String
        var description: String { "address resolution failed for \(host):\(port): \(reason)" }
    }

    /// Migration sends many small frames; waiting for Nagle would add to the downtime.
    static func setNoDelay(_ fd: Int32) {
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    private static func withAddresses(host: String, port: UInt16, passive: Bool, what: String,
                                      _ body: (Int32, UnsafePointer<sockaddr>, socklen_t) -> Int32) throws -> Int32 {
        var hints = addrinfo()
        hints.ai_socktype = Int32(SOCK_STREAM.rawValue)
        hints.ai_flags = passive ? AI_PASSIVE : 0
        var list: UnsafeMutablePointer<addrinfo>?
        let rc = getaddrinfo(host.isEmpty ? nil : host, String(port), &hints, &list)
        // getaddrinfo reports through its return value; errno is stale here.
        guard rc == 0 else { throw ResolveError(host: host, port: port, reason: String(cString: gai_strerror(rc))) }
        defer { freeaddrinfo(list) }
        var lastError: Int32 = EADDRNOTAVAIL
        var entry = list
        while let info = entry {
            entry = info.pointee.ai_next
            let fd = socket(info.pointee.ai_family, info.pointee.ai_socktype | Int32(SOCK_CLOEXEC.rawValue), info.pointee.ai_protocol)
            guard fd >= 0 else {
                lastError = errno
                continue
            }
            lastError = body(fd, info.pointee.ai_addr, info.pointee.ai_addrlen)
            if lastError == 0 { return fd }
            close(fd)
        }
        throw SystemError("\(what) tcp:\(host):\(port)", errno: lastError)
    }
}
