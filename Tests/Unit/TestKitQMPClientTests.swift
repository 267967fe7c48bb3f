import Foundation
import QMPWire
import Synchronization
import Testing
@testable import TestKit

extension TestKitTests {
    @Suite struct QMPClientTests {
        @Test func readsGreetingAndNegotiates() async throws {
            let (fd, server, received) = try FakeQMP.start()
            defer { server.close() }
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5))
            defer { qmp.close() }

            #expect(qmp.greeting == FakeQMP.greeting)
            #expect(qmp.greeting["QMP"]?["version"]?["qemu"]?["major"] == 7)
            let first = try #require(received.first)
            #expect(first["execute"] == "qmp_capabilities")
            #expect(first["id"] != nil)
        }

        @Test func executeReturnsTheReturnValue() async throws {
            let (fd, server, _) = try FakeQMP.start()
            defer { server.close() }
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5))
            defer { qmp.close() }

            let status = try await qmp.execute("query-status", timeout: .seconds(5))
            #expect(status["status"] == "running")
        }

        @Test func argumentsAreSent() async throws {
            let (fd, server, received) = try FakeQMP.start { peer, command, id in
                guard command == "echo-args" else { return false }
                peer.send(QMPMessage.reply([:], id: id))
                return true
            }
            defer { server.close() }
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5))
            defer { qmp.close() }

            try await qmp.execute("echo-args", arguments: ["uri": "unix:/tmp/x", "n": 3], timeout: .seconds(5))
            let sent = try #require(received.last)
            #expect(sent["arguments"] == ["uri": "unix:/tmp/x", "n": 3])
        }

        @Test func errorReplyThrowsCommandFailed() async throws {
            let (fd, server, _) = try FakeQMP.start()
            defer { server.close() }
            let failures = FailureLog()
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5), onWaitFailure: failures.record)
            defer { qmp.close() }

            await #expect(throws: QMPError.commandFailed(
                class: "CommandNotFound", desc: "The command nope has not been found", command: "nope")
            ) {
                try await qmp.execute("nope", timeout: .seconds(5))
            }
            // A command error is an answer, not a broken wait: it does not keep artifacts.
            #expect(failures.count == 0)
            let reply = try await qmp.request("nope", timeout: .seconds(5))
            #expect(reply["error"]?["class"] == "CommandNotFound")
        }

        @Test func repliesAreMatchedByID() async throws {
            // The server answers "fast" first although "slow" was sent first.
            let slowID = Mutex<JSON?>(nil)
            let (fd, server, _) = try FakeQMP.start { peer, command, id in
                switch command {
                case "slow":
                    slowID.withLock { $0 = id }
                    return true
                case "fast":
                    peer.send(QMPMessage.reply("fast-result", id: id))
                    if let slow = slowID.withLock({ $0 }) { peer.send(QMPMessage.reply("slow-result", id: slow)) }
                    return true
                default:
                    return false
                }
            }
            defer { server.close() }
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5))
            defer { qmp.close() }

            async let slow = qmp.execute("slow", timeout: .seconds(5))
            while slowID.withLock({ $0 }) == nil { try await Task.sleep(for: .milliseconds(5)) }
            let fast = try await qmp.execute("fast", timeout: .seconds(5))
            #expect(fast == "fast-result")
            #expect(try await slow == "slow-result")
        }

        @Test func eventsAreBufferedAndConsumedInOrder() async throws {
            let (fd, server, _) = try FakeQMP.start()
            defer { server.close() }
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5))
            defer { qmp.close() }

            server.send(FakeQMP.event("STOP"))
            server.send(FakeQMP.event("NIC_RX_FILTER_CHANGED", ["name": "net0"]))
            server.send(FakeQMP.event("NIC_RX_FILTER_CHANGED", ["name": "net1", "path": "/x"]))
            server.send(FakeQMP.event("RESUME"))
            _ = try await qmp.execute("query-status", timeout: .seconds(5))  // all four have arrived

            // Waiting for a later event leaves earlier ones buffered.
            let resume = try await qmp.waitForEvent("RESUME", timeout: .seconds(1))
            #expect(resume.timestamp == QMPTimestamp(seconds: 1_700_000_000, microseconds: 42))
            let net1 = try await qmp.waitForEvent("NIC_RX_FILTER_CHANGED", matching: ["name": "net1"], timeout: .seconds(1))
            #expect(net1.data["path"] == "/x")
            let stop = try await qmp.waitForEvent("STOP", timeout: .seconds(1))
            #expect(stop.data == .object([:]))
            let any = try await qmp.waitForAnyEvent([("SHUTDOWN", nil), ("NIC_RX_FILTER_CHANGED", nil)], timeout: .seconds(1))
            #expect(any.data["name"] == "net0")
            // Consumed: a second wait for the same event needs a new one.
            await #expect(throws: QMPError.self) { try await qmp.waitForEvent("STOP", timeout: .milliseconds(50)) }
            #expect(qmp.events.map(\.name) == ["STOP", "NIC_RX_FILTER_CHANGED", "NIC_RX_FILTER_CHANGED", "RESUME"])
            qmp.clearEvents()
            #expect(qmp.events.isEmpty)
        }

        @Test func futureEventWakesTheWaiter() async throws {
            let (fd, server, _) = try FakeQMP.start()
            defer { server.close() }
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5))
            defer { qmp.close() }

            async let migration = qmp.waitForEvent("MIGRATION", matching: ["status": "completed"], timeout: .seconds(5))
            try await Task.sleep(for: .milliseconds(30))
            server.send(FakeQMP.event("MIGRATION", ["status": "active"]))
            server.send(FakeQMP.event("MIGRATION", ["status": "completed"]))
            #expect(try await migration.data["status"] == "completed")
            // The non-matching one stayed buffered for someone else.
            #expect(try await qmp.waitForEvent("MIGRATION", timeout: .seconds(1)).data["status"] == "active")
        }

        @Test func expectNoEvent() async throws {
            let (fd, server, _) = try FakeQMP.start()
            defer { server.close() }
            let failures = FailureLog()
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5), onWaitFailure: failures.record)
            defer { qmp.close() }

            try await qmp.expectNoEvent("STOP", within: .milliseconds(50))
            #expect(failures.count == 0)
            server.send(FakeQMP.event("STOP"))
            await #expect(throws: QMPError.self) { try await qmp.expectNoEvent("STOP", within: .seconds(2)) }
            #expect(failures.count == 1)
        }

        @Test func timeoutsAreTyped() async throws {
            let (fd, server, _) = try FakeQMP.start()
            defer { server.close() }
            let failures = FailureLog()
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5), onWaitFailure: failures.record)
            defer { qmp.close() }

            await #expect(throws: QMPError.timeout("reply to 'silent'", after: .milliseconds(100))) {
                try await qmp.execute("silent", timeout: .milliseconds(100))
            }
            await #expect(throws: QMPError.timeout("event NEVER matching {\"a\": 1}", after: .milliseconds(100))) {
                try await qmp.waitForEvent("NEVER", matching: ["a": 1], timeout: .milliseconds(100))
            }
            #expect(failures.count == 2)
            // The client still works after a timeout.
            #expect(try await qmp.execute("query-status", timeout: .seconds(5))["running"] == true)
        }

        @Test func greetingTimeout() async throws {
            let (client, serverFD) = try UnixSocket.pair()
            let mute = try FakePeer(fd: serverFD, onBytes: { _, _ in })
            defer { mute.close() }
            await #expect(throws: QMPError.timeout("the greeting", after: .milliseconds(100))) {
                _ = try await QMPClient.connect(takingOwnershipOf: client, timeout: .milliseconds(100))
            }
        }

        @Test func disconnectFailsPendingAndLaterCommands() async throws {
            let (fd, server, _) = try FakeQMP.start()
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5))
            defer { qmp.close() }

            let event = Task { try await qmp.waitForEvent("NEVER", timeout: .seconds(10)) }
            await #expect(throws: QMPError.disconnected) { try await qmp.execute("hangup", timeout: .seconds(10)) }
            await #expect(throws: QMPError.disconnected) { try await event.value }
            #expect(qmp.isClosed)
            await #expect(throws: QMPError.disconnected) { try await qmp.execute("query-status", timeout: .seconds(1)) }
            server.close()
        }

        @Test func rawLinesAndUnmatchedReplies() async throws {
            let (fd, server, _) = try FakeQMP.start()
            defer { server.close() }
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, timeout: .seconds(5))
            defer { qmp.close() }

            try qmp.sendRaw("\"not an object\"\n")
            let reply = try await qmp.readRawReply(timeout: .seconds(5))
            #expect(reply["error"]?["desc"] == "QMP input must be a JSON object")
            #expect(reply["id"] == nil)

            // A reply whose id nobody waits for also goes to the raw queue.
            try qmp.sendRaw("{\"execute\": \"query-status\", \"id\": \"mine\"}\r\n")
            #expect(try await qmp.readRawReply(timeout: .seconds(5))["id"] == "mine")

            server.write("this is not json\r\n")
            await #expect(throws: QMPError.self) { try await qmp.readRawReply(timeout: .seconds(5)) }
        }

        @Test func logRecordsBothDirections() async throws {
            let directory = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: directory) }
            let (fd, server, _) = try FakeQMP.start()
            defer { server.close() }
            let qmp = try await QMPClient.connect(takingOwnershipOf: fd, logPath: directory + "/qmp.log", timeout: .seconds(5))
            server.send(FakeQMP.event("STOP"))
            _ = try await qmp.execute("query-status", timeout: .seconds(5))
            qmp.close()

            let log = try String(contentsOfFile: directory + "/qmp.log", encoding: .utf8)
            let lines = log.split(separator: "\n")
            #expect(lines.contains { $0.contains("<<< {\"QMP\":") })
            #expect(lines.contains { $0.contains(">>> {\"execute\": \"qmp_capabilities\", \"id\": 1}") })
            #expect(lines.contains { $0.contains("<<< {\"timestamp\"") && $0.contains("STOP") })
            #expect(lines.contains { $0.contains(">>> {\"execute\": \"query-status\"") })
            #expect(lines.last?.contains("connection closed") == true)
            // 2025-11-20T15:48:00.123456Z
            #expect(lines.allSatisfy { $0.count > 28 && $0.dropFirst(10).first == "T" && $0.dropFirst(26).first == "Z" })
        }
    }
}
