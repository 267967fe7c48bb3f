import CLinux
import Glibc

/// A failed system call, naming what was attempted so that a log line alone explains it.
public struct SystemError: Error, CustomStringConvertible, Sendable {
    public let operation: String
    public let errno: Int32

    public init(_ operation: String, errno: Int32 = Glibc.errno) {
        self.operation = operation
        self.errno = errno
    }

    public var description: String { "\(operation): \(String(cString: strerror(errno)))" }
}

/// Retries a system call interrupted by a signal, and turns -1 into a `SystemError`.
@discardableResult
func syscallRetrying(_ operation: @autoclosure () -> String, _ call: () -> Int32) throws -> Int32 {
    while true {
        let rc = call()
        if rc >= 0 { return rc }
        if errno == EINTR { continue }
        throw SystemError(operation())
    }
}

@discardableResult
func syscallChecked(_ operation: @autoclosure () -> String, _ call: () -> Int32) throws -> Int32 {
    let rc = call()
    if rc < 0 { throw SystemError(operation()) }
    return rc
}
