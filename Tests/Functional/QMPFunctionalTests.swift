import Foundation
import QMPWire
import TestKit
import Testing

/// The VMM's QMP server as a client sees it: run states, events, errors, several clients.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct QMPFunctionalTests {
    @Test func stopAndContChangeStateEmitEventsAndReallyStopTheGuest() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            try await vm.qmp.execute("stop")
            _ = try await vm.qmp.waitForEvent("STOP", timeout: .seconds(5))
            #expect(try await vm.qmp.execute("query-status")["status"] == "paused")
            // A stopped vCPU cannot echo what we type.
            try vm.console.send("echo after-cont\r")
            try await vm.console.expectSilence(for: .milliseconds(500))
            try await vm.qmp.execute("cont")
            let resume = try await vm.qmp.waitForEvent("RESUME", timeout: .seconds(5))
            #expect(resume.timestamp.seconds > 0)
            #expect(try await vm.qmp.execute("query-status")["status"] == "running")
            try await vm.console.waitFor("after-cont\r\n", timeout: .seconds(10))
            try await vm.console.waitFor("after-cont", timeout: .seconds(10))
        }
    }

    @Test func startPausedStaysInPrelaunchUntilCont() async throws {
        try await Machine.with(MachineOptions.bundledGuest(startPaused: true)) { vm in
            #expect(try await vm.qmp.execute("query-status") == ["status": "prelaunch", "singlestep": false, "running": false])
            try await vm.console.expectSilence(for: .milliseconds(500))
            try await vm.qmp.execute("cont")
            _ = try await vm.qmp.waitForEvent("RESUME", timeout: .seconds(5))
            try await vm.console.waitFor("SwiftVMM test guest", timeout: .seconds(20))
            #expect(try await vm.qmp.execute("query-status")["status"] == "running")
        }
    }

    @Test func quitSendsShutdownAndExitsZero() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            try await vm.qmp.execute("quit")
            let event = try await vm.qmp.waitForEvent("SHUTDOWN", timeout: .seconds(5))
            #expect(event.data == ["guest": false, "reason": "host-qmp-quit"])
            #expect(try await vm.wait(timeout: .seconds(10)) == .exited(0))
        }
    }

    @Test func malformedInputGetsErrorsAndTheConnectionStaysUsable() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            let qmp = try vm.qmp
            for bad in ["{\"execute\": }", "[1, 2, 3]", "{\"arguments\": {}}", "\"just a string\""] {
                try qmp.sendRaw(bad + "\n")
                let reply = try await qmp.readRawReply(timeout: .seconds(5))
                #expect(reply["error"]?["class"] == "GenericError", "\(bad) -> \(reply.serialized)")
            }
            await #expect(throws: QMPError.self) { try await qmp.execute("no-such-command") }
            await #expect(throws: QMPError.self) { try await qmp.execute("stop", arguments: ["bogus": 1]) }
            #expect(try await qmp.execute("query-status")["status"] == "running")
            try await vm.console.run("echo still alive", expect: "still alive", timeout: .seconds(20))
        }
    }

    @Test func versionAndCommandList() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            let version = try await vm.qmp.execute("query-version")
            #expect(version["qemu"]?["major"]?.intValue != nil)
            let commands = try await vm.qmp.execute("query-commands").arrayValue ?? []
            let names = Set(commands.compactMap { $0["name"]?.stringValue })
            #expect(names.isSuperset(of: ["qmp_capabilities", "query-status", "stop", "cont", "quit", "query-version", "query-commands"]))
        }
    }

    @Test func serverSocketServesClientsOneAfterAnotherAndTogether() async throws {
        let dir = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/qmp.sock"
        try await Machine.with(MachineOptions.bundledGuest(arguments: ["-qmp", "unix:\(path),server=on,wait=off"], connectQMP: false)) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            for _ in 0..<3 {
                let client = try await QMPClient.connect(path: path)
                #expect(client.greeting["QMP"]?["capabilities"] == [])
                #expect(try await client.execute("query-status")["status"] == "running")
                client.close()
            }
            let a = try await QMPClient.connect(path: path)
            let b = try await QMPClient.connect(path: path, negotiate: false)
            defer {
                a.close()
                b.close()
            }
            // Before negotiation a client gets CommandNotFound and no events.
            let early = try await b.request("query-status")
            #expect(early["error"]?["class"] == "CommandNotFound")
            try await a.execute("stop")
            _ = try await a.waitForEvent("STOP", timeout: .seconds(5))
            try await b.negotiate()
            try await b.execute("cont")
            _ = try await a.waitForEvent("RESUME", timeout: .seconds(5))
            _ = try await b.waitForEvent("RESUME", timeout: .seconds(5))
            #expect(!b.events.contains { $0.name == "STOP" })
        }
    }
}
