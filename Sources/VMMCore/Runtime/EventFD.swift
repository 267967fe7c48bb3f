import CLinux
import Glibc

/// A counter fd one thread writes to wake another that polls it.
public final class EventFD: @unchecked Sendable {
    public let fd: FileDescriptor

    public init(label: String = "eventfd") throws {
        fd = FileDescriptor(adopting: try syscallChecked("eventfd") { eventfd(0, Int32(EFD_CLOEXEC | EFD_NONBLOCK)) }, label: label)
    }

    public func signal() {
        var one: UInt64 = 1
        _ = fd.withRaw { write($0, &one, 8) }
    }

    /// Clears pending wakeups; returns whether there were any.
    @discardableResult
    public func drain() -> Bool {
        var value: UInt64 = 0
        return fd.withRaw { read($0, &value, 8) } == 8
    }

    /// Waits until signalled or the timeout passes (-1 waits forever); EINTR counts as a wakeup.
    public func wait(timeoutMilliseconds: Int32) {
        var pfd = fd.pollRequest()
        if poll(&pfd, 1, timeoutMilliseconds) > 0 { drain() }
    }
}
