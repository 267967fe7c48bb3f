import QMPWire
import Synchronization
import Testing
@testable import TestKit

extension TestKitTests {
    /// MigrationWaiter against fake QMP servers, and the freeze-window loss check on
    /// synthetic ping samples. Unlike its siblings the name repeats "TestKit", so that
    /// `--filter TestKitMigration` selects it.
    @Suite struct TestKitMigrationTests {
        // MARK: MigrationWaiter

        /// One side of a migration: `query-status` reports `runState`; `query-migrate` reports
        /// `errorDesc` when given.
        static func side(
            runState: String, errorDesc: String? = nil, onWaitFailure: (@Sendable (String) -> Void)? = nil
        ) async throws -> (qmp: QMPClient, server: FakePeer) {
            let (fd, server, _) = try FakeQMP.start { peer, command, id in
                switch command {
                case "query-status":
                    peer.send(QMPMessage.reply(["status": .string(runState), "running": .bool(runState == "running")], id: id))
                case "query-migrate":
                    var info: JSONObject = ["status": errorDesc == nil ? "completed" : "failed"]
                    if let errorDesc { info["error-desc"] = .string(errorDesc) }
                    peer.send(QMPMessage.reply(.object(info), id: id))
                default:
                    return false
                }
                return true
            }
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5), onWaitFailure: onWaitFailure)
            return (qmp, server)
        }

        static func migration(_ status: String) -> JSON { FakeQMP.event("MIGRATION", ["status": .string(status)]) }

        @Test func waitsForBothEndEventsAndChecksRunStates() async throws {
            let source = try await Self.side(runState: "postmigrate")
            let target = try await Self.side(runState: "paused")
            defer { [source, target].forEach { $0.qmp.close(); $0.server.close() } }

            // The source's events came before the call (buffered); the target's come during it.
            for status in ["setup", "active", "device", "completed"] { source.server.send(Self.migration(status)) }
            _ = try await source.qmp.execute("query-status", timeout: .seconds(5))
            async let outcome = MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .seconds(5))
            try await Task.sleep(for: .milliseconds(30))
            for status in ["setup", "active", "completed"] { target.server.send(Self.migration(status)) }

            let result = try await outcome
            #expect(result == MigrationOutcome(
                sourceStatus: "completed", targetStatus: "completed", sourceRunState: "postmigrate", targetRunState: "paused"))
            #expect(result.description == "source: completed/postmigrate, target: completed/paused")
            // Only the end event was consumed; the earlier ones stay for whoever wants them.
            #expect(try await source.qmp.waitForEvent("MIGRATION", timeout: .seconds(1)).data["status"] == "setup")
            // Consumed: the next migration needs a new end event.
            await #expect(throws: QMPError.timeout("event MIGRATION matching {\"status\": \"completed\"} or event MIGRATION matching {\"status\": \"failed\"} or event MIGRATION matching {\"status\": \"cancelled\"}", after: .milliseconds(50))) {
                try await MigrationWaiter.waitForEnd(of: target.qmp, timeout: .milliseconds(50))
            }
        }

        @Test func waitForEndSkipsCancelling() async throws {
            let side = try await Self.side(runState: "running")
            defer { side.qmp.close(); side.server.close() }
            side.server.send(Self.migration("cancelling"))
            side.server.send(Self.migration("cancelled"))
            #expect(try await MigrationWaiter.waitForEnd(of: side.qmp, timeout: .seconds(5)) == "cancelled")
        }

        @Test func failedTargetNamesAllFourValuesAndTheSourceError() async throws {
            let desc = "device 'nic0' (virtio-net-pci): property 'max_queue_pairs' is 4 on the source but 2 on the target"
            let source = try await Self.side(runState: "running", errorDesc: desc)
            let target = try await Self.side(runState: "inmigrate")
            defer { [source, target].forEach { $0.qmp.close(); $0.server.close() } }
            source.server.send(Self.migration("failed"))
            target.server.send(Self.migration("failed"))

            let error = await #expect(throws: MigrationWaitError.self) {
                try await MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .seconds(5))
            }
            #expect(error?.outcome == MigrationOutcome(
                sourceStatus: "failed", targetStatus: "failed", sourceRunState: "running", targetRunState: "inmigrate"))
            #expect(error?.sourceError == desc)
            #expect(error?.description == "migration did not end as expected: source: failed/running, target: failed/inmigrate "
                + "(expected source: completed/postmigrate, target: completed/paused); source error-desc: \(desc)")

            // The same ending, when it is what the test wants, passes.
            source.server.send(Self.migration("failed"))
            target.server.send(Self.migration("failed"))
            let outcome = try await MigrationWaiter.waitForFinish(
                source: source.qmp, target: target.qmp, expecting: ("failed", "failed"), runStates: ("running", "inmigrate"),
                timeout: .seconds(5))
            #expect(outcome.description == "source: failed/running, target: failed/inmigrate")
        }

        @Test func deadTargetIsReportedNotThrownAsQMPError() async throws {
            let source = try await Self.side(runState: "postmigrate")
            let target = try await Self.side(runState: "paused")
            defer { [source, target].forEach { $0.qmp.close(); $0.server.close() } }
            // Like a QEMU target that reports the failure and exits.
            source.server.send(Self.migration("completed"))
            target.server.send(Self.migration("failed"))
            target.server.close()

            let error = await #expect(throws: MigrationWaitError.self) {
                try await MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .seconds(5))
            }
            #expect(error?.outcome.targetStatus == "failed")
            #expect(error?.outcome.targetRunState == "unreachable: QMP: connection closed")
            #expect(error?.outcome.sourceRunState == "postmigrate")
            #expect(error?.sourceError == nil)
            #expect(error?.description.contains("target: failed/unreachable: QMP: connection closed") == true)

            // Died before reporting anything: no waiting for the timeout either.
            let second = try await Self.side(runState: "paused")
            defer { second.qmp.close() }
            second.server.close()
            source.server.send(Self.migration("completed"))
            let clock = ContinuousClock()
            let started = clock.now
            let early = await #expect(throws: MigrationWaitError.self) {
                try await MigrationWaiter.waitForFinish(source: source.qmp, target: second.qmp, timeout: .seconds(20))
            }
            #expect(clock.now - started < .seconds(5))
            #expect(early?.outcome.targetStatus == "no MIGRATION end event: QMP: connection closed")
            #expect(early?.outcome.targetRunState == "unreachable: QMP: connection closed")
        }

        @Test func missingEventIsATimeoutInTheMessage() async throws {
            let failures = FailureLog()
            let source = try await Self.side(runState: "postmigrate")
            let target = try await Self.side(runState: "inmigrate", onWaitFailure: failures.record)
            defer { [source, target].forEach { $0.qmp.close(); $0.server.close() } }
            source.server.send(Self.migration("completed"))
            target.server.send(Self.migration("active"))

            let error = await #expect(throws: MigrationWaitError.self) {
                try await MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .milliseconds(200))
            }
            #expect(error?.outcome.targetStatus == "no MIGRATION end event within 0.2s")
            #expect(error?.description.hasPrefix(
                "migration did not end as expected: source: completed/postmigrate, target: no MIGRATION end event within 0.2s/inmigrate")
                == true)
            // A wait that timed out keeps the artifacts, like any other TestKit wait.
            #expect(failures.count == 1)
            #expect(MigrationWaiter.seconds(.seconds(30)) == "30s")
            #expect(MigrationWaiter.seconds(.milliseconds(1500)) == "1.5s")
        }

        // MARK: FreezeWindow

        static let ms: Int64 = 1_000_000
        static let anchor = ClockAnchor(monotonic: 0, wallClock: 1_700_000_000 * 1_000_000_000)

        static func window(_ startMs: Int64, _ endMs: Int64) -> FreezeWindow {
            FreezeWindow(start: PingTime(monotonic: startMs * ms, anchor: anchor), end: PingTime(monotonic: endMs * ms, anchor: anchor))
        }

        static func report(_ samples: [PingSample]) -> PingReport {
            PingReport(destination: "192.168.100.2", interval: .milliseconds(1), anchor: anchor, samples: samples)
        }

        /// Sequences numbered in order; `sent` and `received` in nanoseconds.
        static func report(_ samples: [(sent: Int64, received: Int64?)]) -> PingReport {
            report(samples.enumerated().map { PingSample(sequence: $0, sent: $1.sent, received: $1.received) })
        }

        @Test func windowUsesThePingersClock() async throws {
            let before = ClockAnchor.monotonicNow()
            var window = FreezeWindow.begin()
            let after = ClockAnchor.monotonicNow()
            #expect(window.start.monotonic >= before && window.start.monotonic <= after)
            #expect(window.end == window.start)
            let wall = ClockAnchor.now().wallClock / 1_000_000_000
            #expect(abs(window.start.wallClock.seconds - wall) <= 1)

            try await Task.sleep(for: .milliseconds(20))
            let closed = window.ended()
            window.close()
            #expect(closed.duration >= .milliseconds(20))
            #expect(window.end >= closed.end)
            // A sample stamped as the Pinger stamps them, during the freeze, is inside.
            let report = PingReport(destination: "x", interval: .milliseconds(1), anchor: ClockAnchor.now(), samples: [
                PingSample(sequence: 0, sent: (window.start.monotonic + window.end.monotonic) / 2)
            ])
            #expect(report.lostOutside(window, tolerance: .zero).isEmpty)
            #expect(Self.window(1000, 1300).description
                == "2023-11-14T22:13:21.000000Z to 2023-11-14T22:13:21.300000Z (300.000 ms)")
        }

        @Test func lossInsideTheWindowIsExcused() throws {
            // Every 1 ms from 900 to 1399 ms, answered in 1 ms except those sent during 1000..<1300.
            let samples = (900..<1400).map { t -> (sent: Int64, received: Int64?) in
                (Int64(t) * Self.ms, (1000..<1300).contains(t) ? nil : Int64(t + 1) * Self.ms)
            }
            let report = Self.report(samples)
            let window = Self.window(1000, 1300)
            #expect(report.lost == 300)
            #expect(report.lostOutside(window).isEmpty)
            try report.checkLoss(inside: window)
            try report.checkLoss(inside: window, maximumLost: 300)
            // Local migration: no loss at all, even inside.
            let error = #expect(throws: PingLossError.self) { try report.checkLoss(inside: window, maximumLost: 0) }
            #expect(error?.outside.isEmpty == true)
            #expect(error?.description.contains("300 requests lost, at most 0 allowed") == true)
        }

        @Test func toleranceEdgesAreInside() {
            // Window 1000..1300 ms, ±50 ms: lost requests sent at the widened ends, and just past them.
            let report = Self.report([
                (950 * Self.ms, nil), (950 * Self.ms - 1, nil), (1350 * Self.ms, nil), (1350 * Self.ms + 1, nil),
                (1000 * Self.ms, nil), (1300 * Self.ms, nil),
            ])
            let window = Self.window(1000, 1300)
            #expect(report.lostOutside(window).map(\.sequence) == [1, 3])
            #expect(report.lostOutside(window, tolerance: .milliseconds(51)).isEmpty)
            // Without tolerance only the window's own ends are inside.
            #expect(report.lostOutside(window, tolerance: .zero).map(\.sequence) == [0, 1, 2, 3])
        }

        @Test func lateRepliesCountByTheirTimeInFlight() {
            // Window 3000..3300 ms, widened to 2950..3350. Late: rtt over 1 s.
            let report = Self.report([
                (500 * Self.ms, 1600 * Self.ms),  // 0: late, all before: outside
                (2500 * Self.ms, 3600 * Self.ms),  // 1: late, spans the window
                (2000 * Self.ms, 3100 * Self.ms),  // 2: late, answered inside
                (3200 * Self.ms, 4300 * Self.ms),  // 3: late, sent inside
                (3400 * Self.ms, 4500 * Self.ms),  // 4: late, all after: outside
                (600 * Self.ms, 1500 * Self.ms),  // 5: slow (900 ms), not late
                (700 * Self.ms, 1700 * Self.ms),  // 6: exactly 1 s, not late
                (5000 * Self.ms, 5001 * Self.ms),  // 7: fast, outside, fine
            ])
            let window = Self.window(3000, 3300)
            #expect(report.lost == 0)
            #expect(report.lostOutside(window).map(\.sequence) == [0, 4])
            #expect(report.lostOutside(window, lateAfter: .milliseconds(500)).map(\.sequence) == [0, 4, 5, 6])
            #expect(report.lostOutside(window, lateAfter: .seconds(2)).isEmpty)
            let error = #expect(throws: PingLossError.self) { try report.checkLoss(inside: window, maximumLost: 0) }
            #expect(error?.outside.map(\.sequence) == [0, 4])
            #expect(error?.description.contains("0 requests lost in total") == true)
        }

        @Test func unclosedWindowIsEmpty() {
            let report = Self.report([(1100 * Self.ms, nil)])
            let open = FreezeWindow(start: PingTime(monotonic: 1000 * Self.ms, anchor: Self.anchor), end: PingTime(monotonic: 1000 * Self.ms, anchor: Self.anchor))
            #expect(report.lostOutside(open).map(\.sequence) == [0])
            #expect(report.lostOutside(Self.window(1000, 1300)).isEmpty)
        }

        @Test func errorMessageShowsWindowTimesAndReport() {
            let samples = [
                PingSample(sequence: 0, sent: 0, received: 1 * Self.ms),
                PingSample(sequence: 1, sent: 500 * Self.ms),
                PingSample(sequence: 2, sent: 1100 * Self.ms),
                PingSample(sequence: 3, sent: 1500 * Self.ms, received: 2600 * Self.ms),
                PingSample(sequence: 4, sent: 1600 * Self.ms, sendError: 101),
            ]
            let report = Self.report(samples)
            let error = #expect(throws: PingLossError.self) { try report.checkLoss(inside: Self.window(1000, 1300), maximumLost: 0) }
            let lines = error?.description.split(separator: "\n").map(String.init) ?? []
            #expect(Array(lines.prefix(6)) == [
                "ping loss check failed for freeze window 2023-11-14T22:13:21.000000Z to 2023-11-14T22:13:21.300000Z (300.000 ms), ± 50.000 ms:",
                "3 lost or late requests outside the window (times relative to its start):",
                "  seq 1: sent at -500.000 ms, lost",
                "  seq 3: sent at +500.000 ms, reply at +1600.000 ms (rtt 1100.000 ms)",
                "  seq 4: sent at +600.000 ms, lost (send failed: errno 101)",
                "3 requests lost, at most 0 allowed",
            ])
            #expect(Array(lines.dropFirst(6)) == report.description.split(separator: "\n").map(String.init))
        }

        @Test func errorMessageListsAtMostTen() {
            let report = Self.report((0..<25).map { (Int64($0) * Self.ms, nil) })
            let error = #expect(throws: PingLossError.self) { try report.checkLoss(inside: Self.window(1000, 1300)) }
            #expect(error?.outside.count == 25)
            let lines = error?.description.split(separator: "\n").map(String.init) ?? []
            #expect(lines.filter { $0.hasPrefix("  seq ") }.count == 10)
            #expect(lines.contains("  seq 9: sent at -991.000 ms, lost"))
            #expect(lines.contains("  ... and 15 more"))
            #expect(lines.contains("25 requests lost in total"))
            #expect(lines.contains("lost: 0-24"))
        }
    }
}
