import QMPWire
import Testing
@testable import TestKit

extension TestKitTests {
    /// Everything of the network helpers that needs no privileges: report math from
    /// synthetic samples, ICMP packets, parsers.
    @Suite struct NetReportTests {
        static let ms: Int64 = 1_000_000
        static let anchor = ClockAnchor(monotonic: 0, wallClock: 1_700_000_000 * 1_000_000_000)

        /// 12 requests every 10 ms; request i is answered after i+1 ms, except 3, 4, 5 and 9
        /// (lost); 7 is answered twice.
        static func samples() -> [PingSample] {
            (0..<12).map { i in
                let sent = Int64(i) * 10 * ms
                let lost = [3, 4, 5, 9].contains(i)
                return PingSample(sequence: i, sent: sent, received: lost ? nil : sent + Int64(i + 1) * ms, duplicates: i == 7 ? 1 : 0)
            }
        }

        @Test func countsAndLoss() {
            let report = PingReport(destination: "10.0.0.2", interval: .milliseconds(10), anchor: Self.anchor, samples: Self.samples())
            #expect(report.sent == 12)
            #expect(report.received == 8)
            #expect(report.lost == 4)
            #expect(abs(report.lossPercent - 100.0 / 3) < 1e-9)
            #expect(report.duplicates == 1)
            #expect(report.sendErrors == 0)
            #expect(report.lostSequences == [3, 4, 5, 9])
        }

        @Test func rttPercentilesByNearestRank() {
            let report = PingReport(destination: "10.0.0.2", interval: .milliseconds(10), anchor: Self.anchor, samples: Self.samples())
            // Answered: 0,1,2,6,7,8,10,11 → RTTs 1,2,3,7,8,9,11,12 ms.
            let rtt = try! #require(report.rtt)
            #expect(rtt.min == .milliseconds(1))
            #expect(rtt.p50 == .milliseconds(7))
            #expect(rtt.p90 == .milliseconds(12))
            #expect(rtt.p99 == .milliseconds(12))
            #expect(rtt.max == .milliseconds(12))

            let hundred = (1...100).map { PingSample(sequence: $0 - 1, sent: 0, received: Int64($0) * Self.ms) }
            let stats = try! #require(PingReport(destination: "x", interval: .milliseconds(1), anchor: Self.anchor, samples: hundred.shuffled()).rtt)
            #expect([stats.min, stats.p50, stats.p90, stats.p99, stats.max] == [1, 50, 90, 99, 100].map { .milliseconds($0) })
        }

        @Test func longestGapSpansTheLostRun() throws {
            let report = PingReport(destination: "10.0.0.2", interval: .milliseconds(10), anchor: Self.anchor, samples: Self.samples())
            // Replies arrive at 1, 12, 23, 67, 78, 89, 111, 122 ms.
            let gap = try #require(report.longestGap)
            #expect(gap.duration == .milliseconds(44))
            #expect(gap.start.monotonic == 23 * Self.ms)
            #expect(gap.end.monotonic == 67 * Self.ms)
            #expect(gap.lastBefore == 2)
            #expect(gap.firstAfter == 6)
            #expect(gap.lost == 3)
            let long = report.gaps(longerThan: .milliseconds(20))
            #expect(long.map(\.duration) == [.milliseconds(44), .milliseconds(22)])
            #expect(long.map(\.lost) == [3, 1])
            // Without loss the gaps are the reply spacing.
            #expect(report.gaps(longerThan: .milliseconds(10)).count == 7)
        }

        @Test func gapsFollowArrivalOrder() throws {
            // 1 overtakes 0; 2 is lost; 3 arrives last.
            let samples = [
                PingSample(sequence: 0, sent: 0, received: 5 * Self.ms),
                PingSample(sequence: 1, sent: 1 * Self.ms, received: 2 * Self.ms),
                PingSample(sequence: 2, sent: 2 * Self.ms),
                PingSample(sequence: 3, sent: 3 * Self.ms, received: 30 * Self.ms),
            ]
            let report = PingReport(destination: "x", interval: .milliseconds(1), anchor: Self.anchor, samples: samples)
            let gap = try #require(report.longestGap)
            #expect(gap.lastBefore == 0)
            #expect(gap.firstAfter == 3)
            #expect(gap.duration == .milliseconds(25))
            #expect(gap.lost == 1)
        }

        @Test func noRepliesNoGapNoRTT() {
            let samples = (0..<5).map { PingSample(sequence: $0, sent: Int64($0) * Self.ms, sendError: $0 == 0 ? 101 : nil) }
            let report = PingReport(destination: "x", interval: .milliseconds(1), anchor: Self.anchor, samples: samples)
            #expect(report.received == 0)
            #expect(report.lossPercent == 100)
            #expect(report.rtt == nil)
            #expect(report.longestGap == nil)
            #expect(report.sendErrors == 1)
            #expect(report.description.contains("5 sent, 0 received, 5 lost (100.00%), 0 duplicates, 1 send errors"))
            let empty = PingReport(destination: "x", interval: .milliseconds(1), anchor: Self.anchor, samples: [])
            #expect(empty.lossPercent == 0)
            #expect(empty.longestGap == nil)
        }

        @Test func descriptionIsReadable() {
            let report = PingReport(destination: "10.0.0.2", interval: .milliseconds(10), anchor: Self.anchor, samples: Self.samples())
            let lines = report.description.split(separator: "\n").map(String.init)
            #expect(lines[0] == "ping 10.0.0.2 every 10.000 ms: 12 sent, 8 received, 4 lost (33.33%), 1 duplicates")
            #expect(lines[1] == "rtt min/p50/p90/p99/max = 1.000/7.000/12.000/12.000/12.000 ms")
            #expect(lines[2] == "longest gap: 44.000 ms from 2023-11-14T22:13:20.023000Z to 2023-11-14T22:13:20.067000Z (replies 2 and 6, 3 lost between)")
            #expect(lines[3] == "lost: 3-5, 9")
        }

        @Test func wallClockTimesLineUpWithQMPTimestamps() throws {
            let anchor = ClockAnchor(monotonic: 5_000_000_000, wallClock: 1_700_000_000_500_000_000)
            #expect(anchor.wallClock(ofMonotonic: 6_000_000_000) == QMPTimestamp(seconds: 1_700_000_001, microseconds: 500_000))
            #expect(anchor.wallClock(ofMonotonic: 5_499_999_999) == QMPTimestamp(seconds: 1_700_000_000, microseconds: 999_999))
            #expect(anchor.monotonic(of: QMPTimestamp(seconds: 1_700_000_001, microseconds: 500_000)) == 6_000_000_000)

            let report = PingReport(destination: "x", interval: .milliseconds(10), anchor: Self.anchor, samples: Self.samples())
            let gap = try #require(report.longestGap)
            // An event (say MIGRATION completed) 30 ms into the run falls inside the 23..67 ms gap.
            #expect(gap.contains(QMPTimestamp(seconds: 1_700_000_000, microseconds: 30_000)))
            #expect(!gap.contains(QMPTimestamp(seconds: 1_700_000_000, microseconds: 70_000)))
            let now = ClockAnchor.now()
            #expect(abs(now.wallClock - (now.wallClock(ofMonotonic: now.monotonic).seconds * 1_000_000_000)) < 1_000_000_000)
        }

        @Test func wireSequencesWrap() {
            #expect(Pinger.sampleIndex(wire: 5, newest: 10) == 5)
            #expect(Pinger.sampleIndex(wire: 10, newest: 10) == 10)
            #expect(Pinger.sampleIndex(wire: 11, newest: 10) == nil)  // a request never sent
            #expect(Pinger.sampleIndex(wire: 0, newest: 65536) == 65536)
            #expect(Pinger.sampleIndex(wire: 65535, newest: 65536) == 65535)
            #expect(Pinger.sampleIndex(wire: 3, newest: 70000) == 65539)
        }

        @Test func formatting() {
            #expect(PingReport.ranges([1, 2, 3, 7, 9, 10]) == "1-3, 7, 9-10")
            #expect(PingReport.ranges([]) == "")
            #expect(PingReport.milliseconds(.microseconds(1234)) == "1.234")
            #expect(PingReport.milliseconds(.nanoseconds(999_600)) == "1.000")
            #expect(PingReport.milliseconds(.seconds(2)) == "2000.000")
            #expect(PingReport.percent(0.5) == "0.50")
            #expect(PingReport.percent(100) == "100.00")
        }

        // MARK: ICMP

        @Test func internetChecksum() {
            // RFC 1071's example: 0001 f203 f4f5 f6f7 sums to ddf2.
            #expect(ICMPEcho.checksum([0x00, 0x01, 0xf2, 0x03, 0xf4, 0xf5, 0xf6, 0xf7]) == 0x220d)
            // Odd length: the last byte is padded with zero.
            #expect(ICMPEcho.checksum([0x01]) == ~UInt16(0x0100))
        }

        @Test func echoRequestLayoutAndReplyParsing() throws {
            let request = ICMPEcho.request(identifier: 0x1234, sequence: 0x0102, payload: [9, 8, 7])
            #expect(Array(request.prefix(2)) == [8, 0])
            #expect(Array(request[4..<8]) == [0x12, 0x34, 0x01, 0x02])
            #expect(ICMPEcho.checksum(request) == 0)  // a valid checksum sums to all ones

            var reply = request
            reply[0] = 0
            let ipHeader: [UInt8] = [0x45] + [UInt8](repeating: 0, count: 19)
            let parsed = (ipHeader + reply).withUnsafeBytes { ICMPEcho.parseReply($0, hasIPHeader: true) }
            #expect(parsed == ICMPEcho.Reply(identifier: 0x1234, sequence: 0x0102, payload: [9, 8, 7]))
            #expect(reply.withUnsafeBytes { ICMPEcho.parseReply($0, hasIPHeader: false) }?.sequence == 0x0102)
            // A request (our own, looped back) or a truncated packet is not a reply.
            #expect(request.withUnsafeBytes { ICMPEcho.parseReply($0, hasIPHeader: false) } == nil)
            #expect([UInt8](reply.prefix(5)).withUnsafeBytes { ICMPEcho.parseReply($0, hasIPHeader: false) } == nil)
        }

        // MARK: Parsers

        @Test func macAndIPv4Parsing() {
            #expect(RouteSocket.parseMAC("52:54:00:12:34:5f") == [0x52, 0x54, 0, 0x12, 0x34, 0x5f])
            #expect(RouteSocket.parseMAC("52-54-00-12-34-5F") == [0x52, 0x54, 0, 0x12, 0x34, 0x5f])
            #expect(RouteSocket.parseMAC("52:54:00:12:34") == nil)
            #expect(RouteSocket.parseMAC("52:54:00:12:34:5") == nil)
            #expect(RouteSocket.parseMAC("zz:54:00:12:34:56") == nil)
            #expect(RouteSocket.parseIPv4("192.168.200.1/24")! == ([192, 168, 200, 1], 24))
            #expect(RouteSocket.parseIPv4("10.0.0.1")! == ([10, 0, 0, 1], 32))
            #expect(RouteSocket.parseIPv4("10.0.0.1/33") == nil)
            #expect(RouteSocket.parseIPv4("10.0.0/8") == nil)
            #expect(RouteSocket.parseIPv4("fe80::1/64") == nil)
        }

        @Test func tunLinkInfoAttributes() {
            func attribute(_ type: Int, _ payload: [UInt8]) -> [UInt8] {
                let length = 4 + payload.count
                var bytes = [UInt8(length & 0xff), UInt8(length >> 8), UInt8(type & 0xff), UInt8(type >> 8)] + payload
                while bytes.count % 4 != 0 { bytes.append(0) }
                return bytes
            }
            func u32(_ value: UInt32) -> [UInt8] { withUnsafeBytes(of: value.littleEndian) { Array($0) } }
            let tunData = attribute(3, [2]) + attribute(5, [1]) + attribute(6, [1]) + attribute(7, [1]) + attribute(8, u32(4)) + attribute(9, u32(1))
            let linkInfo = attribute(1, Array("tun".utf8) + [0]) + attribute(2 | 0x8000, tunData)
            let header = [UInt8](repeating: 0, count: 16 + 16)  // nlmsghdr + ifinfomsg
            let message = header + attribute(3, Array("tap0".utf8) + [0]) + attribute(18 | 0x8000, linkInfo)
            let info = RouteSocket.parseTunInfo(message)
            #expect(info == TunInfo(isTap: true, vnetHeader: true, persistent: true, multiQueue: true, queues: 4, disabledQueues: 1))
            let veth = header + attribute(18, attribute(1, Array("veth".utf8) + [0]))
            #expect(RouteSocket.parseTunInfo(veth) == nil)
        }

        @Test func netlinkErrorsNameTheirCause() {
            let error = NetlinkError("add address 192.168.200.1/24 to tap0", code: -6)
            #expect(error.code == 6)
            #expect(error.description == "add address 192.168.200.1/24 to tap0: Object exists (libnl error 6)")
        }
    }
}
