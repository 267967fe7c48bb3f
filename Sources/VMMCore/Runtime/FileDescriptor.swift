import CLinux
import Glibc
import Synchronization

/// An open file descriptor with exactly one owner: whoever holds this object. It closes
/// the fd when released, so no error path needs a hand-written `close`. Ownership moves
/// with `take()`; the raw number is lent out only for the duration of one call
/// (`withRaw`). A class rather than a `~Copyable` struct, because TAP queues, received fds
/// and per-ring eventfds live in arrays and dictionaries, which need copyable elements;
/// copies of the reference share the one fd, and `take()` is how it changes hands (as
/// apple/containerization's `Socket` keeps close-once state behind a lock).
public final class FileDescriptor: @unchecked Sendable, CustomStringConvertible {
    /// What the fd is, for messages: "netdev n1 TAP queue 2".
    public let label: String
    /// -1 once taken or closed.
    private let raw: Atomic<Int32>

    /// The only way a raw fd enters: a syscall result, SCM_RIGHTS, a duplicate.
    public init(adopting raw: Int32, label: String) {
        precondition(raw >= 0, "FileDescriptor(adopting: \(raw)) for \(label)")
        self.label = label
        self.raw = Atomic(raw)
    }

    deinit { close() }

    public var isOpen: Bool { raw.load(ordering: .acquiring) >= 0 }

    /// Lends the number for one syscall (or a poll registration that ends before the
    /// owner lets go); never store it. Using an fd after `take()` or `close()` is a
    /// programming error.
    public func withRaw<R>(_ body: (Int32) throws -> R) rethrows -> R {
        let fd = raw.load(ordering: .acquiring)
        precondition(fd >= 0, "\(label): used after it was handed on or closed")
        return try body(fd)
    }

    /// An entry for `poll`, for a caller that holds this object until the poll returns.
    public func pollRequest(events: Int16 = Int16(POLLIN)) -> pollfd {
        withRaw { pollfd(fd: $0, events: events, revents: 0) }
    }

    /// Moves ownership: the result owns the fd (under a new label if given, e.g. once a
    /// received fd knows what it is), this object is left empty.
    public func take(label newLabel: String? = nil) -> FileDescriptor {
        let fd = raw.exchange(-1, ordering: .acquiringAndReleasing)
        precondition(fd >= 0, "\(label): taken after it was handed on or closed")
        return FileDescriptor(adopting: fd, label: newLabel ?? label)
    }

    /// A second fd for the same open file (close-on-exec), owned by the result.
    public func duplicate(label: String? = nil) throws -> FileDescriptor {
        let copy = try withRaw { fd in try syscallChecked("duplicate \(self.label)") { cl_fcntl_int(fd, F_DUPFD_CLOEXEC, 0) } }
        return FileDescriptor(adopting: copy, label: label ?? self.label)
    }

    /// A copy of an fd this process inherited or was lent (`-netdev fd=N`, a `getfd`
    /// name resolved for one command): the caller keeps the number, the result owns the copy.
    public static func duplicating(inherited raw: Int32, label: String) throws -> FileDescriptor {
        FileDescriptor(adopting: try syscallChecked("duplicate fd \(raw) for \(label)") { cl_fcntl_int(raw, F_DUPFD_CLOEXEC, 0) },
                       label: label)
    }

    /// Closes now (idempotent); the object stays empty.
    public func close() {
        let fd = raw.exchange(-1, ordering: .acquiringAndReleasing)
        if fd >= 0 { _ = Glibc.close(fd) }
    }

    public var description: String {
        let fd = raw.load(ordering: .relaxed)
        return fd >= 0 ? "\(label) (fd \(fd))" : "\(label) (closed)"
    }
}

extension Array where Element == FileDescriptor {
    /// Lends every number for one call (sendmsg with SCM_RIGHTS, poll).
    public func withRaw<R>(_ body: ([Int32]) throws -> R) rethrows -> R {
        try body(map { $0.withRaw { $0 } })
    }
}
