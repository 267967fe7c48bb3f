import Glibc

/// A failed system call, with the errno text a user can act on ("/dev/kvm: Permission denied").
public struct SystemError: Error, Equatable, CustomStringConvertible {
    public var operation: String
    public var code: Int32

    public init(_ operation: String, code: Int32 = errno) {
        self.operation = operation
        self.code = code
    }

    public var description: String { "\(operation): \(SystemError.text(code))" }

    public static func text(_ code: Int32) -> String { String(cString: strerror(code)) }
}

/// Closes an fd whose owner is going away. EINTR is not retried: on Linux the fd is gone anyway.
func closeDescriptor(_ fd: Int32) {
    if fd >= 0 { _ = Glibc.close(fd) }
}

/// Writes every byte or throws; `send` with MSG_NOSIGNAL so a peer that went away is
/// an EPIPE error instead of a SIGPIPE that kills the test runner.
func sendAll(_ fd: Int32, _ bytes: [UInt8]) throws(SystemError) {
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { buffer in
            Glibc.send(fd, buffer.baseAddress! + offset, buffer.count - offset, Int32(MSG_NOSIGNAL))
        }
        if n < 0 {
            if errno == EINTR { continue }
            throw SystemError("send")
        }
        offset += n
    }
}

/// Writes every byte to a regular file or pipe.
func writeAll(_ fd: Int32, _ bytes: [UInt8]) throws(SystemError) {
    var offset = 0
    while offset < bytes.count {
        let n = bytes.withUnsafeBytes { buffer in
            Glibc.write(fd, buffer.baseAddress! + offset, buffer.count - offset)
        }
        if n < 0 {
            if errno == EINTR { continue }
            throw SystemError("write")
        }
        offset += n
    }
}
