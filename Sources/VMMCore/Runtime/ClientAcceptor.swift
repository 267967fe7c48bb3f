import CLinux
import Glibc
import Logging

/// Accepts clients on a listening socket from the event loop. An accept that fails for
/// lack of fds or memory leaves the connection queued and the socket readable, so
/// watching it would spin at 100% CPU: the acceptor stops watching for a while instead
/// (or until its owner frees an fd and calls `resume`), and logs once per episode.
final class ClientAcceptor {
    /// How long a starved listener rests before it tries again.
    static let retryNanoseconds: Int64 = 250_000_000

    let fd: Int32
    private let what: String
    private let loop: EventLoop
    private let logger: Logger
    private let onClient: (Int32) -> Void
    private var resting = false
    private var starved = false

    /// `wanted` pauses accepting while the owner has no use for a client (a console that has one).
    init(fd: Int32, what: String, loop: EventLoop, logger: Logger, wanted: @escaping () -> Bool = { true },
         onClient: @escaping (Int32) -> Void) {
        self.fd = fd
        self.what = what
        self.loop = loop
        self.logger = logger
        self.onClient = onClient
        // A client that gives up between poll and accept must not block the loop in accept.
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        loop.watch(fd, interest: { [unowned self] in !resting && wanted() ? Int16(POLLIN) : 0 }) { [unowned self] _ in
            acceptOne()
        }
    }

    private func acceptOne(_ handle: ((Int32) -> Void)? = nil) {
        let client = cl_accept(fd)
        if client >= 0 {
            if starved {
                starved = false
                logger.info("\(what): accepting clients again")
            }
            (handle ?? onClient)(client)
            return
        }
        let error = errno
        switch error {
        case EMFILE, ENFILE, ENOBUFS, ENOMEM:
            if !starved {
                starved = true
                logger.warning("\(what): cannot accept a client: \(String(cString: strerror(error))); retrying every \(Self.retryNanoseconds / 1_000_000) ms until it works")
            }
            resting = true
            loop.after(nanoseconds: Self.retryNanoseconds) { [weak self] in self?.resting = false }
        default:
            // EAGAIN, EINTR, ECONNABORTED: nothing to take now; poll says when there is.
            break
        }
    }

    /// Takes a client that connected before this acceptor existed now, not at the loop's
    /// next poll (a cpr-transfer source connects the main channel before the target's
    /// devices exist). `handle` takes it instead of `onClient`: the owner may treat a
    /// client that was already waiting differently.
    func acceptPending(_ handle: @escaping (Int32) -> Void) { acceptOne(handle) }

    /// Tries again at once: the owner just closed an fd.
    func resume() { resting = false }

    func close() { loop.unwatch(fd) }
}
