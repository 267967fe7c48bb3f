import Foundation
import Synchronization
import QMPWire
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// The local-migration series' rules and the failure paths around them, as a management
    /// tool meets them (issue 8 §3): `local-migration` only with `local`, an `incoming-fds`
    /// netdev that gets no queues, a TAP that is already open, an fd no section claims, and
    /// a failure after the source stopped its guest.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct MigrationConformanceFunctionalTests {
        typealias Pair = MigrationFunctionalTests
        typealias Failure = MigrationFailureFunctionalTests

        static func nic(ifname: String?, localMigration: Bool) -> [String] {
            let netdev = ifname.map { "tap,id=n0,ifname=\($0),queues=1,script=no,downscript=no" }
                ?? "tap,id=n0,incoming-fds=on,queues=1,script=no,downscript=no"
            return ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,id=nic0,mac=52:54:00:12:34:56,mq=on,local-migration=\(localMigration ? "on" : "off")"]
        }

        /// In the series `local-migration` matters only together with `local`: with `local`
        /// off a NIC whose property differs migrates like any other.
        @Test func localMigrationPropertyIsIgnoredWithoutLocal() async throws {
            try await Pair.withMigrationPair(
                taps: [("tap0", 1), ("tap1", 1)],
                source: Self.nic(ifname: "tap0", localMigration: true),
                target: Self.nic(ifname: "tap1", localMigration: false), configureGuest: false
            ) { _, source, target, uri in
                try await Pair.enableEvents(source, target)
                try await MigrationPair.migrate(from: source, to: target, uri: uri, timeout: .seconds(30))
                try await target.qmp.execute("cont")
                try await target.console.run("echo moved", expect: "moved")
            }
        }

        /// With `local` on both sides the property decides whether the TAP moves, so it must agree.
        @Test func localMigrationPropertyMustAgreeWithLocal() async throws {
            try await Pair.withMigrationPair(
                taps: [("tap0", 1)],
                source: Self.nic(ifname: "tap0", localMigration: true),
                target: Self.nic(ifname: nil, localMigration: false)
            ) { ns, source, target, uri in
                try await Pair.enableEvents(source)
                for vm in [source, target] { try await vm.qmp.execute("migrate-set-parameters", arguments: ["local": true]) }
                let fds = openFileDescriptors(source.pid)
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
                let log = target.stderrTail(20).joined(separator: "\n")
                #expect(log.contains("device 'nic0' (virtio-net-pci): property 'local-migration' is on on the source but off on the target"), "\(log)")
                try await Failure.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }

        /// A normal migration into an `incoming-fds` netdev: nothing brings it a TAP.
        @Test func incomingFDsTargetThatReceivesNoQueuesFails() async throws {
            try await Failure.withSingleTapPair { ns, source, target, uri, fds in
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(30))
                #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
                let log = target.stderrTail(20).joined(separator: "\n")
                #expect(log.contains("netdev 'n0' (incoming-fds=on) received no TAP queues: is migration parameter 'local' on at the source, and local-migration on for nic0?"), "\(log)")
                try await Failure.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }

        /// `local` on both sides, but the target opened its own TAP: the series' pre_load refusal.
        @Test func targetWithAnOpenTapRefusesIncomingQueues() async throws {
            try await Pair.withMigrationPair(
                taps: [("tap0", 1), ("tap1", 1)],
                source: Self.nic(ifname: "tap0", localMigration: true),
                target: Self.nic(ifname: "tap1", localMigration: true)
            ) { ns, source, target, uri in
                try await Pair.enableEvents(source)
                for vm in [source, target] { try await vm.qmp.execute("migrate-set-parameters", arguments: ["local": true]) }
                let fds = openFileDescriptors(source.pid)
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(30))
                #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
                let log = target.stderrTail(20).joined(separator: "\n")
                #expect(log.contains("TAP is already initialized and cannot receive incoming fd"), "\(log)")
                #expect(log.contains("netdev 'n0' was not created with incoming-fds=on"), "\(log)")
                try await Failure.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }

        /// A failure after the guest was stopped: a fake target answers the switch-over and
        /// hangs up when the state starts (the vCPU section), or, in local mode, when the
        /// section carrying the TAP queue fds arrives. The source must resume its guest
        /// (STOP, then RESUME), read its TAP again and hold the fds it held.
        @Test(arguments: [(false, "cpu0"), (true, "nic0")])
        func failureAfterTheStopResumesTheSourceAndItsTap(local: Bool, hangUpAt: String) async throws {
            try await Failure.withSingleTapPair { ns, source, _, uri, fds in
                if local { try await source.qmp.execute("migrate-set-parameters", arguments: ["local": true]) }
                let peer = try HangUpAtDeviceState(path: String(uri.dropFirst(5)) + ".fake", hangUpAt: hangUpAt)
                try await source.qmp.execute("migrate", arguments: ["uri": .string("unix:\(peer.path)")])
                _ = try await source.qmp.waitForEvent("STOP", timeout: .seconds(30))
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "device"], timeout: .seconds(10))
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                _ = try await source.qmp.waitForEvent("RESUME", timeout: .seconds(10))
                peer.join()
                #expect(peer.hungUpAt == hangUpAt, "the fake target hung up at \(peer.hungUpAt ?? "nothing")")
                let info = try await source.qmp.execute("query-migrate")
                #expect(info["status"] == "failed" && info["error-desc"] != nil, "\(info.serialized)")
                try await Failure.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }

        /// An fd that rides along with the stream and that no section claims: a relay
        /// between source and target adds one. The target closes it and fails, naming it.
        @Test(.enabled(if: VMMBinary.findExecutable("python3") != nil, "needs python3 for the relay"))
        func unclaimedFDIsClosedAndFailsTheMigration() async throws {
            try await Pair.withMigrationPair(
                taps: [("tap0", 1), ("tap1", 1)],
                source: Self.nic(ifname: "tap0", localMigration: true),
                target: Self.nic(ifname: "tap1", localMigration: true)
            ) { ns, source, target, uri in
                try await Pair.enableEvents(source, target)
                let fds = openFileDescriptors(source.pid)
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri), "exit-on-error": false])
                let relay = try FDInjectingRelay(listen: String(uri.dropFirst(5)) + ".relay", target: String(uri.dropFirst(5)))
                defer { relay.stop() }
                try await relay.waitUntilListening()
                try await source.qmp.execute("migrate", arguments: ["uri": .string("unix:\(relay.path)")])
                _ = try await target.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(30))
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(30))
                let info = try await target.qmp.execute("query-migrate")
                #expect(info["error-desc"]?.stringValue?.contains("received 1 file descriptor(s) that no section claimed") == true, "\(info.serialized)")
                #expect(!describeFileDescriptors(target.pid).contains(FDInjectingRelay.probeName), "\(describeFileDescriptors(target.pid))")
                try await Failure.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }
    }
}

/// A fake migration target: reads the stream frame by frame (docs/migration-format.md),
/// answers the switch-over (kind 6) with the ready byte, and hangs up when the vCPU or
/// device section named `hangUpAt` arrives; the source sends those only after it stopped
/// its guest. Fds riding along are discarded unread.
final class HangUpAtDeviceState: @unchecked Sendable {
    let hangUpAt: String
    private let seen = Mutex<String?>(nil)
    private var peer: OneConnectionPeer!
    var path: String { peer.path }
    /// The section at which it hung up, once it did.
    var hungUpAt: String? { seen.withLock { $0 } }

    init(path: String, hangUpAt: String) throws {
        self.hangUpAt = hangUpAt
        peer = try OneConnectionPeer(path: path) { [self] fd in serve(fd) }
    }

    private static func readExactly(_ fd: Int32, _ count: Int) -> [UInt8]? {
        var bytes = [UInt8](repeating: 0, count: count)
        var got = 0
        while got < count {
            let n = bytes.withUnsafeMutableBytes { read(fd, $0.baseAddress! + got, count - got) }
            if n <= 0 { return nil }
            got += n
        }
        return bytes
    }

    private func serve(_ fd: Int32) {
        guard Self.readExactly(fd, 12) != nil else { return }  // "SVMMIGR\0" and the version
        while let length = Self.readExactly(fd, 4) {
            let size = Int(UInt32(length[0]) | UInt32(length[1]) << 8 | UInt32(length[2]) << 16 | UInt32(length[3]) << 24)
            guard size > 0, let frame = Self.readExactly(fd, size) else { return }
            // frame := kind:u8 name:(length:u32 bytes) ...
            guard frame.count >= 5 else { return }
            let nameLength = Int(UInt32(frame[1]) | UInt32(frame[2]) << 8 | UInt32(frame[3]) << 16 | UInt32(frame[4]) << 24)
            guard frame.count >= 5 + nameLength else { return }
            let name = String(decoding: frame[5..<5 + nameLength], as: UTF8.self)
            if frame[0] == 6 {
                var ready: UInt8 = 0x05
                _ = write(fd, &ready, 1)
            } else if (frame[0] == 3 || frame[0] == 4) && name == hangUpAt {
                seen.withLock { $0 = name }
                return
            }
        }
    }

    func join() { peer.join() }
}

/// A unix-socket relay (python3) from a migration source to its target that sends one
/// extra fd, a memfd named `probeName`, with the first bytes of the stream.
final class FDInjectingRelay: @unchecked Sendable {
    static let probeName = "vmm-unclaimed-probe"
    static let script = #"""
import os, select, socket, sys
listen_path, target_path = sys.argv[1], sys.argv[2]
server = socket.socket(socket.AF_UNIX)
server.bind(listen_path)
server.listen(1)
print("listening", flush=True)
source, _ = server.accept()
target = socket.socket(socket.AF_UNIX)
target.connect(target_path)
probe = os.memfd_create("vmm-unclaimed-probe")
injected = False
peers = {source: target, target: source}
try:
    while True:
        ready, _, _ = select.select(list(peers), [], [])
        for s in ready:
            data = s.recv(65536)
            if not data:
                raise SystemExit(0)
            if s is source and not injected:
                socket.send_fds(target, [data[:1]], [probe])
                data = data[1:]
                injected = True
            peers[s].sendall(data)
finally:
    os.unlink(listen_path)
"""#

    let path: String
    private let process = Process()
    private let output = Pipe()

    init(listen path: String, target: String) throws {
        self.path = path
        process.executableURL = URL(fileURLWithPath: VMMBinary.findExecutable("python3") ?? "/usr/bin/python3")
        process.arguments = ["-c", Self.script, path, target]
        process.standardOutput = output
        process.standardInput = FileHandle.nullDevice
        try process.run()
    }

    func waitUntilListening() async throws {
        let line = String(decoding: output.fileHandleForReading.availableData, as: UTF8.self)
        guard line.contains("listening") else { throw FixtureError("relay did not start: \(line.debugDescription)") }
    }

    func stop() {
        if process.isRunning { process.terminate() }
        process.waitUntilExit()
        unlink(path)
    }
}
