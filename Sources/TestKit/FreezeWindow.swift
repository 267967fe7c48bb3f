/// The time a migrating guest may be unreachable: from just before `migrate` to just after
/// the target's `cont`, like the seed test's freeze_start/freeze_end.
///
/// ```swift
/// var window = FreezeWindow.begin()
/// try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
/// try await MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .seconds(30))
/// try await target.qmp.execute("cont")
/// window.close()
/// pinger.stop()
/// try await pinger.finish(timeout: .seconds(5)).checkLoss(inside: window, maximumLost: 0)
/// ```
///
/// Its ends are read from CLOCK_MONOTONIC, the clock `Pinger` stamps `PingSample.sent` and
/// `.received` with, so samples and window compare directly; the wall-clock halves only
/// serve messages and QMP timestamps.
public struct FreezeWindow: Sendable, Equatable, CustomStringConvertible {
    public var start: PingTime
    /// Equal to `start` until `close()`: an unclosed window is empty, so any loss lies
    /// outside it and a forgotten `close()` fails the check instead of passing it.
    public var end: PingTime

    public init(start: PingTime, end: PingTime) {
        self.start = start
        self.end = end
    }

    /// Call right before `migrate`.
    public static func begin() -> FreezeWindow {
        let now = Self.now()
        return FreezeWindow(start: now, end: now)
    }

    /// Call right after the target's `cont`.
    public mutating func close() { end = Self.now() }

    /// A copy closed now.
    public func ended() -> FreezeWindow {
        var window = self
        window.close()
        return window
    }

    public var duration: Duration { .nanoseconds(end.monotonic - start.monotonic) }

    /// `2025-11-20T15:48:00.123456Z to 2025-11-20T15:48:00.435456Z (312.000 ms)`.
    public var description: String { "\(start) to \(end) (\(PingReport.milliseconds(duration)) ms)" }

    private static func now() -> PingTime {
        let anchor = ClockAnchor.now()
        return PingTime(monotonic: anchor.monotonic, anchor: anchor)
    }
}

/// `PingReport.checkLoss` found loss outside the freeze window, or more loss than allowed.
public struct PingLossError: Error, CustomStringConvertible {
    public var window: FreezeWindow
    public var tolerance: Duration
    /// The bad samples outside the widened window, in sequence order.
    public var outside: [PingSample]
    /// Requests without a reply, inside the window or not.
    public var lost: Int
    public var maximumLost: Int?
    /// The whole report, for the counts, RTTs, longest gap and lost ranges.
    public var report: PingReport

    /// How many offending samples the message lists one by one.
    static let listed = 10

    public var description: String {
        let ms = PingReport.milliseconds
        var lines = ["ping loss check failed for freeze window \(window), ± \(ms(tolerance)) ms:"]
        if !outside.isEmpty {
            lines.append("\(outside.count) lost or late requests outside the window (times relative to its start):")
            for sample in outside.prefix(Self.listed) {
                func relative(_ t: Int64) -> String {
                    let text = ms(.nanoseconds(t - window.start.monotonic))
                    return (text.hasPrefix("-") ? "" : "+") + text + " ms"
                }
                let fate: String
                if let received = sample.received {
                    fate = "reply at \(relative(received)) (rtt \(ms(.nanoseconds(received - sample.sent))) ms)"
                } else {
                    fate = sample.sendError.map { "lost (send failed: errno \($0))" } ?? "lost"
                }
                lines.append("  seq \(sample.sequence): sent at \(relative(sample.sent)), \(fate)")
            }
            if outside.count > Self.listed { lines.append("  ... and \(outside.count - Self.listed) more") }
        }
        if let maximumLost, lost > maximumLost {
            lines.append("\(lost) requests lost, at most \(maximumLost) allowed")
        } else {
            lines.append("\(lost) requests lost in total")
        }
        lines.append(report.description)
        return lines.joined(separator: "\n")
    }
}

extension PingReport {
    /// The samples that went wrong outside `window`, widened by `tolerance` on both sides.
    ///
    /// A sample went wrong ("bad") when it got no reply (including a failed send), or when
    /// its reply took longer than `lateAfter`; pass the pinger's `replyTimeout` if it is not
    /// the default. A bad sample is excused when it was in flight during the widened
    /// window: its time span, from `sent` to `received` (to `sent` alone if lost), overlaps
    /// [start - tolerance, end + tolerance]. So a request lost or answered late is allowed
    /// when it was sent inside, answered inside, or sent before and answered after; ends
    /// count as inside. Fast replies are never returned, wherever they lie.
    public func lostOutside(
        _ window: FreezeWindow, tolerance: Duration = .milliseconds(50), lateAfter: Duration = .seconds(1)
    ) -> [PingSample] {
        let slack = Pinger.nanoseconds(tolerance)
        let low = window.start.monotonic - slack
        let high = window.end.monotonic + slack
        let late = Pinger.nanoseconds(lateAfter)
        return samples.filter { sample in
            let bad = sample.received.map { $0 - sample.sent > late } ?? true
            guard bad else { return false }
            let inFlight = sample.sent <= high && (sample.received ?? sample.sent) >= low
            return !inFlight
        }
    }

    /// Throws `PingLossError` when any sample went wrong outside the widened window (see
    /// `lostOutside`), or, with `maximumLost`, when more requests than that got no reply at
    /// all, inside the window or not. Local migration, which must lose nothing, passes 0;
    /// late replies are not loss there, since frames wait in the TAP during the switch.
    public func checkLoss(
        inside window: FreezeWindow, tolerance: Duration = .milliseconds(50), maximumLost: Int? = nil,
        lateAfter: Duration = .seconds(1)
    ) throws(PingLossError) {
        let outside = lostOutside(window, tolerance: tolerance, lateAfter: lateAfter)
        let tooMany = maximumLost.map { lost > $0 } ?? false
        guard !outside.isEmpty || tooMany else { return }
        throw PingLossError(
            window: window, tolerance: tolerance, outside: outside, lost: lost, maximumLost: maximumLost, report: self)
    }
}
