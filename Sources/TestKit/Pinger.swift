import CLinux
import Glibc
import Synchronization

public enum PingerError: Error, CustomStringConvertible {
    case invalidArgument(String)
    case alreadyStarted
    /// Neither a raw ICMP socket (needs CAP_NET_RAW) nor an ICMP datagram socket (needs
    /// the group in net.ipv4.ping_group_range) could be opened.
    case noSocket(raw: SystemError, datagram: SystemError)
    case notEnoughReplies(wanted: Int, after: Duration, report: PingReport)

    public var description: String {
        switch self {
        case .invalidArgument(let text): return "Pinger: \(text)"
        case .alreadyStarted: return "Pinger: start() called twice"
        case .noSocket(let raw, let datagram):
            return "Pinger: no ICMP socket: raw \(raw); datagram \(datagram) (see net.ipv4.ping_group_range)"
        case .notEnoughReplies(let wanted, let after, let report):
            return "Pinger: fewer than \(wanted) replies after \(after):\n\(report)"
        }
    }
}

/// Sends ICMP echo requests at a fixed rate from inside a network namespace and records,
/// per sequence number, when each request left and when its reply came back.
///
/// ```swift
/// let pinger = try Pinger(namespace: ns, destination: "192.168.200.2", interval: .milliseconds(1))
/// try pinger.start()
/// ... migrate ...
/// pinger.stop()
/// let report = await pinger.finish(timeout: .seconds(5))
/// #expect(report.longestGap!.duration < .milliseconds(500), "\(report)")
/// ```
///
/// The socket is created in the namespace (on a thread that entered it) and keeps that
/// namespace for its life, so the sender and receiver are ordinary dedicated threads
/// (`tk-ping-tx`, `tk-ping-rx`). Requests go out at `start + n * interval` (absolute
/// `clock_nanosleep` deadlines, so the rate does not drift; a sender that fell behind
/// catches up at once). Replies whose identifier or payload cookie is not this pinger's
/// (another pinger, a `ping` run by hand) are ignored.
public final class Pinger: Sendable {
    public let destination: String
    public let interval: Duration
    /// nil: until `stop()` (or `finish`'s timeout).
    public let count: Int?
    public let payloadSize: Int
    /// How long the receiver waits for the last replies once sending has ended.
    public let replyTimeout: Duration
    /// The ICMP identifier this pinger's requests carry.
    public var identifier: UInt16 { core.identifier }
    /// A raw ICMP socket (root) or, without CAP_NET_RAW, an ICMP datagram socket.
    public var usesRawSocket: Bool { core.raw }

    private let core: Core
    private let threads = Mutex<[BlockingThread]>([])

    private static let counter = Atomic<Int>(0)

    /// Opens the socket in `namespace` (nil: the test process's own namespace); `start()` begins sending.
    /// `source` picks the local address requests come from (like `ping -I ADDR`), e.g. to
    /// make several flows that a multi-queue TAP steers to different queues.
    public convenience init(
        namespace: NetworkNamespace?, destination: String, interval: Duration = .seconds(1), count: Int? = nil,
        payloadSize: Int = 56, replyTimeout: Duration = .seconds(1), source: String? = nil
    ) throws {
        try self.init(
            namespace: namespace, destination: destination, interval: interval, count: count, payloadSize: payloadSize,
            replyTimeout: replyTimeout, datagramOnly: false, source: source)
    }

    /// `datagramOnly`: skip the raw socket, to test the unprivileged path as root.
    init(
        namespace: NetworkNamespace?, destination: String, interval: Duration, count: Int?, payloadSize: Int,
        replyTimeout: Duration, datagramOnly: Bool, source: String? = nil
    ) throws {
        var address = in_addr()
        guard inet_pton(AF_INET, destination, &address) == 1 else {
            throw PingerError.invalidArgument("destination '\(destination)' is not an IPv4 address")
        }
        var sourceAddress = in_addr()
        if let source, inet_pton(AF_INET, source, &sourceAddress) != 1 {
            throw PingerError.invalidArgument("source '\(source)' is not an IPv4 address")
        }
        guard interval > .zero else { throw PingerError.invalidArgument("interval \(interval) must be positive") }
        if let count, count < 1 { throw PingerError.invalidArgument("count \(count) must be at least 1") }
        guard (0...65507).contains(payloadSize) else { throw PingerError.invalidArgument("payload size \(payloadSize) out of 0...65507") }
        self.destination = destination
        self.interval = interval
        self.count = count
        self.payloadSize = payloadSize
        self.replyTimeout = replyTimeout

        let local = sourceAddress
        let opened = try namespace.map { namespace in try namespace.perform { try Self.openSocket(datagramOnly: datagramOnly, source: local) } }
            ?? Self.openSocket(datagramOnly: datagramOnly, source: local)
        let wake = cl_eventfd(0, CL_EFD_CLOEXEC | CL_EFD_NONBLOCK)
        guard wake >= 0 else {
            let error = SystemError("eventfd")
            closeDescriptor(opened.fd)
            throw error
        }
        // Raw sockets see every echo reply in the namespace; an identifier per pinger
        // (pid and a counter) tells ours apart. Datagram sockets get one from the kernel.
        let identifier = opened.identifier
            ?? UInt16(truncatingIfNeeded: Int(getpid()) &* 7919 &+ Self.counter.wrappingAdd(1, ordering: .relaxed).newValue)
        var cookie = [UInt8](repeating: 0, count: 8)
        var generator = SystemRandomNumberGenerator()
        for i in cookie.indices { cookie[i] = UInt8.random(in: .min ... .max, using: &generator) }
        let payload = (0..<payloadSize).map { $0 < cookie.count ? cookie[$0] : UInt8(truncatingIfNeeded: $0) }
        core = Core(
            fd: opened.fd, wake: wake, raw: opened.raw, destination: address, identifier: identifier, payload: payload,
            interval: Self.nanoseconds(interval), count: count, replyTimeout: Self.nanoseconds(replyTimeout))
    }

    /// Starts the sender and receiver threads.
    public func start() throws {
        try threads.withLock { threads in
            guard threads.isEmpty, !core.isStarted else { throw PingerError.alreadyStarted }
            core.markStarted()
            let core = self.core
            do {
                threads.append(try BlockingThread(name: "tk-ping-rx") { core.receive() })
                threads.append(try BlockingThread(name: "tk-ping-tx") { core.send() })
            } catch {
                core.abort()
                threads.forEach { $0.join() }
                threads = []
                core.closeDescriptors()
                // Without a receiver nobody would mark the run done; `finish` must not wait.
                core.markDone()
                throw error
            }
        }
    }

    /// Stops sending; replies to requests already sent are still awaited (up to
    /// `replyTimeout`), so that the last requests are not counted as lost.
    public func stop() { core.stop() }

    /// Waits for the run to end by itself (all `count` requests sent and answered, or
    /// `replyTimeout` after the last one, or after `stop()`). When `timeout` passes first,
    /// it stops sending and waits at most `replyTimeout` more. Then it releases the
    /// threads and the socket and returns the report. Idempotent.
    public func finish(timeout: Duration) async -> PingReport {
        if core.isStarted {
            do {
                try await core.waitUntilDone(timeout: timeout)
            } catch {
                core.stop()
                do {
                    try await core.waitUntilDone(timeout: replyTimeout + .milliseconds(100))
                } catch {
                    core.abort()
                }
            }
        }
        joinAndClose()
        let report = report()
        if let artifacts = ArtifactDirectory.current {
            try? report.record.write(toFile: artifacts.numberedFile("ping", extension: "txt"), atomically: false, encoding: .utf8)
        }
        return report
    }

    /// Both threads have ended or are about to (abort wakes them within 20 ms). The fds
    /// are closed under the same lock, after the joins, so that a concurrent `finish`
    /// cannot close them under a sender that is still running (its fd number could be
    /// reused by then).
    private func joinAndClose() {
        threads.withLock { threads in
            threads.forEach { $0.join() }
            threads = []
            core.closeDescriptors()
        }
    }

    /// The report so far; the run goes on.
    public func report() -> PingReport {
        PingReport(destination: destination, interval: interval, anchor: core.anchor, samples: core.samples())
    }

    /// Waits until `count` requests in total have been answered, e.g. to know that the
    /// guest's network is up before starting a migration.
    public func waitForReplies(_ count: Int = 1, timeout: Duration) async throws {
        try await core.waitForReplies(count, timeout: timeout) { [self] in
            PingerError.notEnoughReplies(wanted: count, after: timeout, report: report())
        }
    }

    deinit {
        core.abort()
        joinAndClose()
    }

    // MARK: Socket

    private struct OpenedSocket: Sendable {
        var fd: Int32
        var raw: Bool
        var identifier: UInt16?
    }

    /// A raw ICMP socket, else an unprivileged ICMP datagram socket; in the calling thread's namespace.
    private static func openSocket(datagramOnly: Bool, source: in_addr) throws -> OpenedSocket {
        let cloexec = Int32(SOCK_CLOEXEC.rawValue)
        let raw = datagramOnly ? -1 : socket(AF_INET, Int32(SOCK_RAW.rawValue) | cloexec, Int32(IPPROTO_ICMP))
        if raw >= 0 {
            // The kernel drops every ICMP type but echo reply before it reaches us; without
            // this, our own requests to a local address would come back as well.
            var filter: UInt32 = ~(UInt32(1) << UInt32(ICMPEcho.echoReply))
            _ = setsockopt(raw, socketLevelRaw, icmpFilter, &filter, socklen_t(MemoryLayout<UInt32>.size))
            enlargeReceiveBuffer(raw)
            if source.s_addr != 0 {
                var local = sockaddr_in()
                local.sin_family = sa_family_t(AF_INET)
                local.sin_addr = source
                let bound = withUnsafePointer(to: &local) {
                    $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(raw, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) == 0 }
                }
                guard bound else {
                    let error = SystemError("bind raw ICMP socket to the source address")
                    closeDescriptor(raw)
                    throw error
                }
            }
            return OpenedSocket(fd: raw, raw: true, identifier: nil)
        }
        let rawError = SystemError("socket(AF_INET, SOCK_RAW, IPPROTO_ICMP)", code: datagramOnly ? EPERM : errno)
        let datagram = socket(AF_INET, Int32(SOCK_DGRAM.rawValue) | cloexec, Int32(IPPROTO_ICMP))
        guard datagram >= 0 else {
            throw PingerError.noSocket(raw: rawError, datagram: SystemError("socket(AF_INET, SOCK_DGRAM, IPPROTO_ICMP)"))
        }
        // Bind to get the identifier now: the kernel writes the socket's port into every request.
        var local = sockaddr_in()
        local.sin_family = sa_family_t(AF_INET)
        local.sin_addr = source
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        let bound = withUnsafeMutablePointer(to: &local) { pointer in
            pointer.withMemoryRebound(to: sockaddr.self, capacity: 1) { address in
                bind(datagram, address, length) == 0 && getsockname(datagram, address, &length) == 0
            }
        }
        guard bound else {
            let error = SystemError("bind ICMP datagram socket")
            closeDescriptor(datagram)
            throw PingerError.noSocket(raw: rawError, datagram: error)
        }
        enlargeReceiveBuffer(datagram)
        return OpenedSocket(fd: datagram, raw: false, identifier: UInt16(bigEndian: local.sin_port))
    }

    /// At 1 ms the default buffer is plenty, but a stalled receiver thread must not turn into loss.
    private static func enlargeReceiveBuffer(_ fd: Int32) {
        var size: Int32 = 1 << 20
        _ = setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &size, socklen_t(MemoryLayout<Int32>.size))
    }

    /// SOL_RAW and ICMP_FILTER from linux/icmp.h, which clashes with glibc's netinet headers.
    private static let socketLevelRaw: Int32 = 255
    private static let icmpFilter: Int32 = 1

    /// Wire sequences wrap at 65536: a reply belongs to the newest request sent with
    /// those low 16 bits (a reply more than 65536 requests late is taken for a newer one).
    static func sampleIndex(wire: UInt16, newest: Int) -> Int? {
        let index = newest - Int(UInt16(truncatingIfNeeded: newest) &- wire)
        return index >= 0 ? index : nil
    }

    static func nanoseconds(_ duration: Duration) -> Int64 {
        let (seconds, attoseconds) = duration.components
        return seconds * 1_000_000_000 + attoseconds / 1_000_000_000
    }

    // MARK: Threads' side

    /// What the threads share; it does not hold the Pinger, whose deinit stops them.
    private final class Core: Sendable {
        let fd: Int32
        let wake: Int32
        let raw: Bool
        let destination: in_addr_t
        let identifier: UInt16
        let payload: [UInt8]
        let interval: Int64
        let count: Int?
        let replyTimeout: Int64

        private struct State {
            var anchor = ClockAnchor.now()
            var started = false
            var samples: [PingSample] = []
            var received = 0
            var sendErrors = 0
            var lastSend: Int64 = 0
            var sendingDone = false
            var done = false
            var closed = false
            var doneWaiters: [OneShot<Void>] = []
            var replyWaiters: [(count: Int, shot: OneShot<Void>)] = []
        }
        private let state = Mutex(State())
        private let stopping = Atomic<Bool>(false)
        private let aborting = Atomic<Bool>(false)

        init(
            fd: Int32, wake: Int32, raw: Bool, destination: in_addr, identifier: UInt16, payload: [UInt8], interval: Int64,
            count: Int?, replyTimeout: Int64
        ) {
            self.fd = fd
            self.wake = wake
            self.raw = raw
            self.destination = destination.s_addr
            self.identifier = identifier
            self.payload = payload
            self.interval = interval
            self.count = count
            self.replyTimeout = replyTimeout
        }

        var isStarted: Bool { state.withLock { $0.started } }
        var anchor: ClockAnchor { state.withLock { $0.anchor } }
        func samples() -> [PingSample] { state.withLock { $0.samples } }

        func markStarted() {
            state.withLock { state in
                state.started = true
                state.anchor = ClockAnchor.now()
            }
        }

        func stop() {
            stopping.store(true, ordering: .sequentiallyConsistent)
            poke()
        }

        /// Ends both threads at once, without waiting for outstanding replies.
        func abort() {
            aborting.store(true, ordering: .sequentiallyConsistent)
            stopping.store(true, ordering: .sequentiallyConsistent)
            poke()
        }

        private func poke() {
            var one: UInt64 = 1
            state.withLock { state in
                if !state.closed { _ = write(wake, &one, 8) }
            }
        }

        func closeDescriptors() {
            state.withLock { state in
                guard !state.closed else { return }
                state.closed = true
                closeDescriptor(fd)
                closeDescriptor(wake)
            }
        }

        // MARK: Sender

        func send() {
            let start = ClockAnchor.monotonicNow()
            var destinationAddress = sockaddr_in()
            destinationAddress.sin_family = sa_family_t(AF_INET)
            destinationAddress.sin_addr.s_addr = destination
            var sequence = 0
            while count.map({ sequence < $0 }) ?? true {
                guard sleep(until: start + Int64(sequence) * interval) else { break }
                let packet = ICMPEcho.request(identifier: identifier, sequence: UInt16(truncatingIfNeeded: sequence), payload: payload)
                let now = ClockAnchor.monotonicNow()
                // Recorded before the send, so that a fast reply always finds its sample.
                state.withLock { state in
                    state.samples.append(PingSample(sequence: sequence, sent: now))
                    state.lastSend = now
                }
                var result: Int
                repeat {
                    // MSG_DONTWAIT: a full socket buffer is a lost request, not a stalled sender.
                    result = packet.withUnsafeBytes { bytes in
                        withUnsafePointer(to: &destinationAddress) { address in
                            address.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                                sendto(fd, bytes.baseAddress, bytes.count, Int32(MSG_DONTWAIT), $0, socklen_t(MemoryLayout<sockaddr_in>.size))
                            }
                        }
                    }
                } while result < 0 && errno == EINTR
                if result < 0 {
                    let error = errno
                    state.withLock { state in
                        state.samples[sequence].sendError = error
                        state.sendErrors += 1
                    }
                }
                sequence += 1
            }
            state.withLock { $0.sendingDone = true }
            poke()
        }

        /// Sleeps until the absolute CLOCK_MONOTONIC `deadline`, in slices of at most 20 ms
        /// so that `stop` is seen soon even with long intervals. False when stopped.
        private func sleep(until deadline: Int64) -> Bool {
            while true {
                if stopping.load(ordering: .relaxed) { return false }
                let now = ClockAnchor.monotonicNow()
                if now >= deadline { return true }
                let target = min(deadline, now + 20_000_000)
                var time = timespec(tv_sec: Int(target / 1_000_000_000), tv_nsec: Int(target % 1_000_000_000))
                _ = clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &time, nil)
            }
        }

        // MARK: Receiver

        func markDone() {
            let waiters = state.withLock { state in
                state.done = true
                defer { state.doneWaiters = [] }
                return state.doneWaiters
            }
            waiters.forEach { $0.resolve(.success(())) }
        }

        func receive() {
            var buffer = [UInt8](repeating: 0, count: 65536)
            while !aborting.load(ordering: .relaxed) {
                let timeout: Int32? = state.withLock { state in
                    guard state.sendingDone else { return -1 }
                    let outstanding = state.samples.count - state.sendErrors - state.received
                    let remaining = state.lastSend + replyTimeout - ClockAnchor.monotonicNow()
                    if outstanding <= 0 || remaining <= 0 { return nil }
                    return Int32(clamping: remaining / 1_000_000 + 1)
                }
                guard let timeout else { break }
                var fds = [pollfd(fd: fd, events: Int16(POLLIN), revents: 0), pollfd(fd: wake, events: Int16(POLLIN), revents: 0)]
                let n = poll(&fds, 2, timeout)
                if n < 0 {
                    if errno == EINTR { continue }
                    break
                }
                if fds[1].revents != 0 {
                    var value: UInt64 = 0
                    _ = read(wake, &value, 8)
                }
                if fds[0].revents != 0 { drain(&buffer) }
            }
            let (doneWaiters, replyWaiters) = state.withLock { state in
                state.done = true
                defer {
                    state.doneWaiters = []
                    state.replyWaiters = []
                }
                return (state.doneWaiters, state.replyWaiters.map(\.shot))
            }
            doneWaiters.forEach { $0.resolve(.success(())) }
            replyWaiters.forEach { $0.resolve(.failure(CancellationError())) }
        }

        private func drain(_ buffer: inout [UInt8]) {
            while true {
                var from = sockaddr_in()
                var length = socklen_t(MemoryLayout<sockaddr_in>.size)
                let n = buffer.withUnsafeMutableBytes { bytes in
                    withUnsafeMutablePointer(to: &from) { address in
                        address.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                            recvfrom(fd, bytes.baseAddress, bytes.count, Int32(MSG_DONTWAIT), $0, &length)
                        }
                    }
                }
                if n < 0 {
                    if errno == EINTR { continue }
                    return
                }
                let now = ClockAnchor.monotonicNow()
                guard from.sin_addr.s_addr == destination else { continue }
                let reply = buffer.withUnsafeBytes { ICMPEcho.parseReply(UnsafeRawBufferPointer(rebasing: $0[..<n]), hasIPHeader: raw) }
                guard let reply, reply.identifier == identifier,
                    reply.payload.prefix(8).elementsEqual(payload.prefix(8))
                else { continue }
                record(reply.sequence, at: now)
            }
        }

        private func record(_ wireSequence: UInt16, at time: Int64) {
            let satisfied: [OneShot<Void>] = state.withLock { state in
                guard let last = state.samples.indices.last,
                    let index = Pinger.sampleIndex(wire: wireSequence, newest: last)
                else { return [] }
                if state.samples[index].received != nil {
                    state.samples[index].duplicates += 1
                    return []
                }
                state.samples[index].received = time
                state.received += 1
                let received = state.received
                let ready = state.replyWaiters.filter { $0.count <= received }.map(\.shot)
                state.replyWaiters.removeAll { $0.count <= received }
                return ready
            }
            satisfied.forEach { $0.resolve(.success(())) }
        }

        // MARK: Waiting

        func waitUntilDone(timeout: Duration?) async throws {
            let shot = OneShot<Void>()
            let finished = state.withLock { state in
                if state.done { return true }
                state.doneWaiters.append(shot)
                return false
            }
            if finished { return }
            try await shot.value(timeout: timeout) { CancellationError() }
        }

        func waitForReplies(_ count: Int, timeout: Duration, onFailure: @escaping @Sendable () -> any Error) async throws {
            let shot = OneShot<Void>()
            let known: Bool? = state.withLock { state in
                if state.received >= count { return true }
                if state.done { return false }
                state.replyWaiters.append((count, shot))
                return nil
            }
            if known == true { return }
            if known == false { throw onFailure() }
            do {
                try await shot.value(timeout: timeout, onTimeout: onFailure)
            } catch is CancellationError {
                // The run ended first (resolved with CancellationError); a real task
                // cancellation is reported as such.
                if Task.isCancelled { throw CancellationError() }
                throw onFailure()
            }
        }
    }
}
