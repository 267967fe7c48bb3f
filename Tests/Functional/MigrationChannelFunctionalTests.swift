import Foundation
import Glibc
import QMPWire
import TestKit
import Testing

/// Migration channels as QEMU names them (`channel-type` main and cpr) on the target's
/// command line and over QMP, and the migration mode that will use the cpr channel.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct MigrationChannelFunctionalTests {
    static func channel(_ type: String, _ path: String) -> String {
        #"{"channel-type": "\#(type)", "addr": {"transport": "socket", "type": "unix", "path": "\#(path)"}}"#
    }

    static func channelJSON(_ type: String, _ path: String) -> JSON {
        ["channel-type": .string(type), "addr": ["transport": "socket", "type": "unix", "path": .string(path)]]
    }

    static func refusal(_ qmp: QMPClient, _ command: String, _ arguments: JSONObject) async -> String? {
        do {
            _ = try await qmp.execute(command, arguments: arguments)
            return nil
        } catch {
            return "\(error)"
        }
    }

    /// The target armed on its command line alone: the main channel in QEMU's JSON form,
    /// and its MIGRATION events on from the start (`-global migration.x-events=on`), so a
    /// test sees `setup` without racing `migrate`.
    @Test func jsonMainChannelAndEventsFromTheCommandLine() async throws {
        try await withArtifacts { artifacts in
            let path = try artifacts.socketPath("main.sock")
            let source = try await Machine.launch(.bundledGuest(name: "source"), in: artifacts)
            let target = try await Machine.launch(
                .bundledGuest(arguments: ["-incoming", Self.channel("main", path), "-global", "migration.x-events=on"], name: "target"),
                in: artifacts)
            let capabilities = try await target.qmp.execute("query-migrate-capabilities")
            #expect(capabilities.arrayValue?.contains(["capability": "events", "state": true]) == true, "\(capabilities.serialized)")
            try await source.console.waitForPrompt(timeout: .seconds(20))
            let before = try await source.guest.ticks()
            try await source.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [["capability": "events", "state": true]]])
            try await source.qmp.execute("migrate", arguments: ["channels": [Self.channelJSON("main", path)]])
            _ = try await target.qmp.waitForEvent("MIGRATION", matching: ["status": "setup"], timeout: .seconds(10))
            try await MigrationWaiter.waitForFinish(source: source, target: target, timeout: .seconds(30))
            try await target.qmp.execute("cont")
            #expect(try await target.guest.ticks(after: .milliseconds(100)) > before)
            _ = await source.shutdown()
            _ = await target.shutdown()
        }
    }

    /// `"type": "fd"`: the target listens on a socket it inherited (a management tool
    /// that bound it first, so the path exists before the VMM runs).
    @Test func mainChannelOnAnInheritedListeningSocket() async throws {
        try await withArtifacts { artifacts in
            let path = try artifacts.socketPath("main.sock")
            let listener = try Self.listen(path)
            defer { close(listener) }
            let source = try await Machine.launch(.bundledGuest(name: "source"), in: artifacts)
            var options = MachineOptions.bundledGuest(arguments: [
                "-incoming", #"{"channel-type": "main", "addr": {"transport": "socket", "type": "fd", "str": "\#(MachineOptions.inheritedNumber(of: 0))"}}"#,
            ], name: "target")
            options.inheritedFDs = [listener]
            let target = try await Machine.launch(options, in: artifacts)
            try await source.console.waitForPrompt(timeout: .seconds(20))
            let before = try await source.guest.ticks()
            for machine in [source, target] {
                try await machine.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [["capability": "events", "state": true]]])
            }
            try await source.qmp.execute("migrate", arguments: ["uri": .string("unix:" + path)])
            try await MigrationWaiter.waitForFinish(source: source, target: target, timeout: .seconds(30))
            try await target.qmp.execute("cont")
            #expect(try await target.guest.ticks(after: .milliseconds(100)) > before)
            // The source cannot send over an fd channel: that is the target's listener only.
            _ = await source.shutdown()
            _ = await target.shutdown()
        }
    }

    static func listen(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_un()
        address.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &address.sun_path) { buffer in
            for (i, byte) in path.utf8.prefix(buffer.count - 1).enumerated() { buffer[i] = byte }
        }
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
        }
        guard fd >= 0, bound == 0, Glibc.listen(fd, 1) == 0 else { throw POSIXError(.EIO) }
        return fd
    }

    /// QEMU's rule: the cpr channel is read before the monitor runs, so only `-incoming`
    /// can give it.
    @Test func migrateIncomingRefusesACPRChannel() async throws {
        try await withArtifacts { artifacts in
            let target = try await Machine.launch(.bundledGuest(arguments: ["-incoming", "defer"], name: "target"), in: artifacts)
            let main = try artifacts.socketPath("main.sock")
            let cpr = try artifacts.socketPath("cpr.sock")
            let error = await Self.refusal(try target.qmp, "migrate-incoming", ["channels": [Self.channelJSON("main", main), Self.channelJSON("cpr", cpr)]])
            #expect(error?.contains("migrate-incoming takes the main channel only; a cpr channel must be given with -incoming on the command line") == true,
                    "\(error ?? "accepted")")
            #expect(access(cpr, F_OK) != 0 && access(main, F_OK) != 0, "a refused migrate-incoming listens on nothing")
            // The refusal changed nothing: the main channel alone still works.
            try await target.qmp.execute("migrate-incoming", arguments: ["channels": [Self.channelJSON("main", main)]])
            #expect(access(main, F_OK) == 0)
            _ = await target.shutdown()
        }
    }

    /// A bad mode and an fd channel on the source are refused; the guest runs on.
    /// (cpr-transfer's own channel checks: CPRTransferFunctionalTests.)
    @Test func sourceRefusesABadModeAndAnFDChannel() async throws {
        try await withArtifacts { artifacts in
            let source = try await Machine.launch(.bundledGuest(name: "source"), in: artifacts)
            try await source.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [["capability": "events", "state": true]]])
            let bad = await Self.refusal(try source.qmp, "migrate-set-parameters", ["mode": "cpr-reboot"])
            #expect(bad?.contains("Parameter 'mode' does not accept value 'cpr-reboot' (normal or cpr-transfer)") == true, "\(bad ?? "accepted")")
            let fd = await Self.refusal(try source.qmp, "migrate", ["channels": [["channel-type": "main", "addr": ["transport": "socket", "type": "fd", "str": "3"]]]])
            #expect(fd?.contains("migrate: channel fd:3 is not supported; an fd channel is for the target's listening socket only") == true, "\(fd ?? "accepted")")
            try await source.qmp.expectNoEvent("MIGRATION", within: .milliseconds(200))
            #expect(try await source.qmp.execute("query-status")["status"] == "running")
            #expect(try await source.qmp.execute("query-migrate") == [:])
            _ = await source.shutdown()
        }
    }

    @Test func badChannelsOnTheCommandLineAreNamed() async throws {
        let cpr = Self.channel("cpr", "/tmp/unused-cpr.sock")
        for (arguments, message) in [
            (["-incoming", "unix:/tmp/a.sock", "-incoming", "unix:/tmp/b.sock"], "vmm: -incoming unix:/tmp/b.sock: the main channel is given twice"),
            (["-incoming", cpr, "-incoming", cpr], "the cpr channel is given twice"),
            (["-incoming", #"{"channel-type": "main", "addr": {"transport": "socket", "type": "vsock"}}"#], "channel socket type 'vsock' is not supported (unix, inet or fd)"),
            // stdin is no listening socket.
            (["-incoming", #"{"channel-type": "main", "addr": {"transport": "socket", "type": "fd", "str": "0"}}"#], "vmm: -incoming fd:0: fd 0 is not a listening socket"),
        ] {
            let result = try await runProcess(try VMMBinary.resolve().path, ["-kernel", BundledGuest.image, "-m", "64M", "-nodefaults"] + arguments)
            #expect(result.status == 1 && result.stderr.contains(message), "\(arguments): \(result.stderr)")
        }
    }

    /// The stream header and one section frame as the format defines them
    /// (docs/migration-format.md), built here so the test does not borrow the VMM's code.
    static let streamHeader: [UInt8] = Array("SVMMIGR".utf8) + [0] + le32(3)

    static func frame(kind: UInt8) -> [UInt8] {
        let body: [UInt8] = [kind] + le32(0) + [0, 0] + le32(0)
        let crc = crc32c(body)
        return le32(UInt32(body.count + 4)) + body + le32(crc)
    }

    static func le32(_ value: UInt32) -> [UInt8] { (0..<4).map { UInt8(truncatingIfNeeded: value >> (8 * $0)) } }

    static func crc32c(_ bytes: [UInt8]) -> UInt32 {
        var crc: UInt32 = 0xFFFF_FFFF
        for byte in bytes {
            crc ^= UInt32(byte)
            for _ in 0..<8 { crc = crc & 1 != 0 ? (crc >> 1) ^ 0x82F6_3B78 : crc >> 1 }
        }
        return ~crc
    }
}
