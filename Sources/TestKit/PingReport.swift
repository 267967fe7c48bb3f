import Glibc
import QMPWire

/// CLOCK_MONOTONIC and CLOCK_REALTIME read together. Samples are timed with the
/// monotonic clock (immune to NTP steps); the anchor turns those times into wall-clock
/// times comparable with QMP event timestamps, which are CLOCK_REALTIME.
public struct ClockAnchor: Sendable, Equatable {
    /// Nanoseconds of CLOCK_MONOTONIC.
    public var monotonic: Int64
    /// Nanoseconds since the epoch at the same instant.
    public var wallClock: Int64

    public init(monotonic: Int64, wallClock: Int64) {
        self.monotonic = monotonic
        self.wallClock = wallClock
    }

    /// The wall clock read between two monotonic reads, paired with their midpoint.
    public static func now() -> ClockAnchor {
        let before = monotonicNow()
        var wall = timespec()
        clock_gettime(CLOCK_REALTIME, &wall)
        let after = monotonicNow()
        return ClockAnchor(monotonic: before + (after - before) / 2, wallClock: Int64(wall.tv_sec) * 1_000_000_000 + Int64(wall.tv_nsec))
    }

    public func wallClock(ofMonotonic nanoseconds: Int64) -> QMPTimestamp {
        let wall = wallClock + (nanoseconds - monotonic)
        let seconds = wall >= 0 ? wall / 1_000_000_000 : (wall - 999_999_999) / 1_000_000_000
        return QMPTimestamp(seconds: seconds, microseconds: (wall - seconds * 1_000_000_000) / 1000)
    }

    /// The monotonic time of a wall-clock timestamp, e.g. of a QMP event.
    public func monotonic(of timestamp: QMPTimestamp) -> Int64 {
        timestamp.seconds * 1_000_000_000 + timestamp.microseconds * 1000 - wallClock + monotonic
    }

    public static func monotonicNow() -> Int64 {
        var now = timespec()
        clock_gettime(CLOCK_MONOTONIC, &now)
        return Int64(now.tv_sec) * 1_000_000_000 + Int64(now.tv_nsec)
    }
}

/// An instant of a ping run, on both clocks.
public struct PingTime: Sendable, Equatable, Comparable, CustomStringConvertible {
    /// Nanoseconds of CLOCK_MONOTONIC.
    public var monotonic: Int64
    public var wallClock: QMPTimestamp

    public init(monotonic: Int64, anchor: ClockAnchor) {
        self.monotonic = monotonic
        wallClock = anchor.wallClock(ofMonotonic: monotonic)
    }

    public static func < (a: PingTime, b: PingTime) -> Bool { a.monotonic < b.monotonic }

    /// `2025-11-20T15:48:00.123456Z`, as in qmp.log and console.log.
    public var description: String {
        LogFile.timestamp(seconds: Int(wallClock.seconds), microseconds: Int(wallClock.microseconds))
    }
}

/// One echo request and what became of it.
public struct PingSample: Sendable, Equatable {
    /// 0, 1, 2, ...; on the wire it is this modulo 65536.
    public var sequence: Int
    /// CLOCK_MONOTONIC nanoseconds just before the request was sent.
    public var sent: Int64
    /// CLOCK_MONOTONIC nanoseconds when the first reply was read; nil: lost.
    public var received: Int64?
    /// Further replies to the same request.
    public var duplicates: Int
    /// errno of a failed send (e.g. ENETUNREACH while an address moves); such a request is lost.
    public var sendError: Int32?

    public init(sequence: Int, sent: Int64, received: Int64? = nil, duplicates: Int = 0, sendError: Int32? = nil) {
        self.sequence = sequence
        self.sent = sent
        self.received = received
        self.duplicates = duplicates
        self.sendError = sendError
    }

    public var rtt: Duration? { received.map { .nanoseconds($0 - sent) } }
}

/// A time without replies: from one reply to the next one, in the order they arrived.
public struct PingGap: Sendable, Equatable, CustomStringConvertible {
    /// When the reply before the gap arrived.
    public var start: PingTime
    /// When the first reply after it arrived.
    public var end: PingTime
    /// Sequence numbers of those two replies.
    public var lastBefore: Int
    public var firstAfter: Int
    /// Requests sent between the two that were never answered.
    public var lost: Int

    public var duration: Duration { .nanoseconds(end.monotonic - start.monotonic) }

    /// Whether a wall-clock instant (a QMP event's timestamp) falls inside the gap.
    public func contains(_ timestamp: QMPTimestamp) -> Bool {
        let t = timestamp.seconds * 1_000_000 + timestamp.microseconds
        return t >= start.wallClock.seconds * 1_000_000 + start.wallClock.microseconds
            && t <= end.wallClock.seconds * 1_000_000 + end.wallClock.microseconds
    }

    public var description: String {
        "\(PingReport.milliseconds(duration)) ms from \(start) to \(end) (replies \(lastBefore) and \(firstAfter), \(lost) lost between)"
    }
}

/// Round-trip times; percentiles by nearest rank (p50 of 1...100 ms is 50 ms).
public struct RTTStatistics: Sendable, Equatable {
    public var min: Duration
    public var p50: Duration
    public var p90: Duration
    public var p99: Duration
    public var max: Duration
}

/// The outcome of a `Pinger` run, computed from its samples.
public struct PingReport: Sendable, CustomStringConvertible {
    public let destination: String
    public let interval: Duration
    public let anchor: ClockAnchor
    /// One per request, in sequence order.
    public let samples: [PingSample]

    public var sent: Int { samples.count }
    /// Requests with at least one reply.
    public let received: Int
    public var lost: Int { sent - received }
    public var lossPercent: Double { sent == 0 ? 0 : Double(lost) * 100 / Double(sent) }
    public let duplicates: Int
    public let sendErrors: Int
    public let rtt: RTTStatistics?
    /// The longest time between two consecutive replies; nil with fewer than two replies.
    /// Losses before the first or after the last reply are in `lostSequences` only.
    public let longestGap: PingGap?
    public let lostSequences: [Int]

    public init(destination: String, interval: Duration, anchor: ClockAnchor, samples: [PingSample]) {
        self.destination = destination
        self.interval = interval
        self.anchor = anchor
        self.samples = samples
        var received = 0
        var duplicates = 0
        var sendErrors = 0
        var rtts: [Int64] = []
        var lost: [Int] = []
        for sample in samples {
            duplicates += sample.duplicates
            if sample.sendError != nil { sendErrors += 1 }
            if let reply = sample.received {
                received += 1
                rtts.append(reply - sample.sent)
            } else {
                lost.append(sample.sequence)
            }
        }
        self.received = received
        self.duplicates = duplicates
        self.sendErrors = sendErrors
        lostSequences = lost
        rtts.sort()
        if rtts.isEmpty {
            rtt = nil
        } else {
            func percentile(_ p: Int) -> Duration {
                let rank = (p * rtts.count + 99) / 100
                return .nanoseconds(rtts[Swift.max(0, rank - 1)])
            }
            rtt = RTTStatistics(
                min: .nanoseconds(rtts[0]), p50: percentile(50), p90: percentile(90), p99: percentile(99),
                max: .nanoseconds(rtts[rtts.count - 1]))
        }
        longestGap = Self.gaps(samples, anchor: anchor).max { $0.duration < $1.duration }
    }

    /// Every gap longer than `threshold`, in time order; e.g. `gaps(longerThan: .milliseconds(100))`
    /// lists the outages around a migration.
    public func gaps(longerThan threshold: Duration) -> [PingGap] {
        Self.gaps(samples, anchor: anchor).filter { $0.duration > threshold }
    }

    /// A sample's time as a `PingTime`.
    public func time(ofMonotonic nanoseconds: Int64) -> PingTime { PingTime(monotonic: nanoseconds, anchor: anchor) }

    private static func gaps(_ samples: [PingSample], anchor: ClockAnchor) -> [PingGap] {
        let replied = samples.filter { $0.received != nil }.sorted { $0.received! < $1.received! }
        guard replied.count >= 2 else { return [] }
        // lostBefore[i]: lost requests among the samples before position i, for O(1) counts per gap.
        var lostBefore = [0]
        lostBefore.reserveCapacity(samples.count + 1)
        for sample in samples { lostBefore.append(lostBefore.last! + (sample.received == nil ? 1 : 0)) }
        let position = Dictionary(uniqueKeysWithValues: samples.enumerated().map { ($1.sequence, $0) })
        return zip(replied, replied.dropFirst()).map { before, after in
            let a = position[before.sequence]!
            let b = position[after.sequence]!
            let (low, high) = (Swift.min(a, b), Swift.max(a, b))
            return PingGap(
                start: PingTime(monotonic: before.received!, anchor: anchor),
                end: PingTime(monotonic: after.received!, anchor: anchor),
                lastBefore: before.sequence, firstAfter: after.sequence,
                lost: lostBefore[high] - lostBefore[low + 1])
        }
    }

    public var description: String {
        var lines = [
            "ping \(destination) every \(Self.milliseconds(interval)) ms: \(sent) sent, \(received) received, "
                + "\(lost) lost (\(Self.percent(lossPercent))%), \(duplicates) duplicates"
                + (sendErrors > 0 ? ", \(sendErrors) send errors" : "")
        ]
        if let rtt {
            lines.append(
                "rtt min/p50/p90/p99/max = " + [rtt.min, rtt.p50, rtt.p90, rtt.p99, rtt.max].map(Self.milliseconds).joined(separator: "/")
                    + " ms")
        }
        if let longestGap { lines.append("longest gap: \(longestGap)") }
        if !lostSequences.isEmpty { lines.append("lost: \(Self.ranges(lostSequences))") }
        return lines.joined(separator: "\n")
    }

    /// The summary, then one line per request: sequence, send time (wall clock), and the
    /// round trip or `lost`; what TestKit writes to the artifacts as `ping-N.txt`.
    public var record: String {
        var lines = [description, "", "seq sent rtt_ms"]
        lines.reserveCapacity(samples.count + 3)
        for sample in samples {
            let outcome = sample.rtt.map(Self.milliseconds) ?? "lost"
            var line = "\(sample.sequence) \(time(ofMonotonic: sample.sent)) \(outcome)"
            if sample.duplicates > 0 { line += " +\(sample.duplicates) duplicates" }
            if let error = sample.sendError { line += " send error \(error)" }
            lines.append(line)
        }
        return lines.joined(separator: "\n") + "\n"
    }

    /// `[1, 2, 3, 7]` → `1-3, 7`.
    static func ranges(_ sorted: [Int]) -> String {
        var parts: [String] = []
        var index = 0
        while index < sorted.count {
            var end = index
            while end + 1 < sorted.count, sorted[end + 1] == sorted[end] + 1 { end += 1 }
            parts.append(end == index ? "\(sorted[index])" : "\(sorted[index])-\(sorted[end])")
            index = end + 1
        }
        return parts.joined(separator: ", ")
    }

    /// `1.234` (milliseconds with microsecond resolution).
    static func milliseconds(_ duration: Duration) -> String {
        let (seconds, attoseconds) = duration.components
        let microseconds = seconds * 1_000_000 + (attoseconds + 500_000_000_000 * (attoseconds < 0 ? -1 : 1)) / 1_000_000_000_000
        let sign = microseconds < 0 ? "-" : ""
        let magnitude = abs(microseconds)
        let fraction = String(magnitude % 1000)
        return "\(sign)\(magnitude / 1000).\(String(repeating: "0", count: 3 - fraction.count))\(fraction)"
    }

    static func percent(_ value: Double) -> String {
        let hundredths = Int((value * 100).rounded())
        let fraction = String(hundredths % 100)
        return "\(hundredths / 100).\(fraction.count == 1 ? "0" : "")\(fraction)"
    }
}
