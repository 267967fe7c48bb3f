import Foundation
import QMPWire
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// Migrations that must not complete: cancelled, refused up front, a target that dies or
    /// maps different RAM. Each time the source must go back to running with its NIC working,
    /// holding exactly the fds it held before.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct MigrationFailureFunctionalTests {
        typealias Pair = MigrationFunctionalTests


        /// Slow enough to act on mid-way: the guest makes 1 MiB of its RAM non-zero, which
        /// pre-copy then sends at 500 kB/s.
        static func throttle(_ vm: Machine) async throws {
            try await vm.console.run("scribble 1", expect: "scribble ok")
            try await vm.qmp.execute("migrate-set-parameters", arguments: ["max-bandwidth": 500_000])
        }

        /// A normal migration between two TAPs, slowed down so that the body can act while
        /// it runs; `fds` is what the source held before it began.
        static func withThrottledMigration(
            _ body: (NetworkNamespace, Machine, Machine, String, Int) async throws -> Void
        ) async throws {
            try await Pair.withMigrationPair(
                taps: [("tap0", 2), ("tap1", 2)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 2, ifname: "tap0"),
                target: NetworkDeviceFunctionalTests.nicArguments(queues: 2, ifname: "tap1")
            ) { ns, source, target, uri in
                try await Pair.enableEvents(source, target)
                try await throttle(source)
                let fds = openFileDescriptors(source.pid)
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                try await body(ns, source, target, uri, fds)
            }
        }

        /// One TAP, a source on it and an `incoming-fds` target, events on at the source;
        /// `fds` is what the source holds before the body starts.
        static func withSingleTapPair(
            configureGuest: Bool = true, _ body: (NetworkNamespace, Machine, Machine, String, Int) async throws -> Void
        ) async throws {
            try await Pair.withMigrationPair(
                taps: [("tap0", 1)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap0"),
                target: Pair.incomingTapArguments(1), configureGuest: configureGuest
            ) { ns, source, target, uri in
                try await Pair.enableEvents(source)
                try await body(ns, source, target, uri, openFileDescriptors(source.pid))
            }
        }

        /// The source answers pings, runs, and holds `fds` descriptors again.
        static func expectSourceRecovered(_ source: Machine, ns: NetworkNamespace, fds: Int) async throws {
            #expect(try await source.qmp.execute("query-status")["status"] == "running")
            let pinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(2), count: 100)
            try pinger.start()
            let report = await pinger.finish(timeout: .seconds(20))
            #expect(report.lost == 0, "\(report)")
            try await source.console.run("echo source alive", expect: "source alive")
            #expect(openFileDescriptors(source.pid) == fds, "fds of the source: \(describeFileDescriptors(source.pid))")
        }

        @Test func cancelInTheMiddleResumesTheSourceWhichCanMigrateAgain() async throws {
            try await Self.withThrottledMigration { ns, source, target, uri, fds in
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "active"], timeout: .seconds(10))
                #expect(try await source.qmp.execute("query-migrate")["status"] == "active")
                try await source.qmp.execute("migrate_cancel")
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "cancelling"], timeout: .seconds(10))
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "cancelled"], timeout: .seconds(10))
                #expect(try await source.qmp.execute("query-migrate")["status"] == "cancelled")
                // The target saw the stream end early: it fails and exits, as QEMU's does.
                _ = try await target.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
                try await Self.expectSourceRecovered(source, ns: ns, fds: fds)

                // And it can migrate again, unthrottled, to a fresh target.
                var options = MachineOptions.bundledGuest(arguments: NetworkDeviceFunctionalTests.nicArguments(queues: 2, ifname: "tap1") + ["-incoming", "defer"])
                options.name = "target2"
                options.namespace = ns
                try await withArtifacts { artifacts in
                    let second = try await Machine.launch(options, in: artifacts)
                    try await Pair.enableEvents(second)
                    try await source.qmp.execute("migrate-set-parameters", arguments: ["max-bandwidth": 0])
                    try await MigrationPair.migrate(from: source, to: second, uri: uri, timeout: .seconds(30))
                    try await second.qmp.execute("cont")
                    try await second.console.run("echo moved", expect: "moved")
                }
            }
        }

        @Test func localOverTCPIsRefusedBeforeTheGuestStops() async throws {
            try await Self.withSingleTapPair { ns, source, _, _, fds in
                try await source.qmp.execute("migrate-set-parameters", arguments: ["local": true])
                let error = await #expect(throws: QMPError.self) {
                    try await source.qmp.execute("migrate", arguments: ["uri": "tcp:127.0.0.1:4444"])
                }
                #expect("\(error.map { "\($0)" } ?? "")".contains("Migration parameter 'local' requires a unix socket channel, got 'tcp:127.0.0.1:4444'"))
                // The same through the channels form.
                await #expect(throws: QMPError.self) {
                    try await source.qmp.execute("migrate", arguments: ["channels": [[
                        "channel-type": "main", "addr": ["transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"],
                    ]]])
                }
                try await source.qmp.expectNoEvent("MIGRATION", within: .milliseconds(200))
                try await source.qmp.expectNoEvent("STOP", within: .milliseconds(10))
                try await Self.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }

        /// Connecting happens off the control thread: an absent target is a failed
        /// migration (with the reason), not a blocked QMP monitor.
        @Test func absentTargetFailsTheMigrationAndTheSourceRuns() async throws {
            try await Self.withSingleTapPair { ns, source, _, uri, fds in
                try await source.qmp.execute("migrate", arguments: ["uri": .string(uri + ".absent")])
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                let info = try await source.qmp.execute("query-migrate")
                #expect(info["error-desc"]?.stringValue?.contains("connect \(uri.dropFirst(5)).absent") == true, "\(info.serialized)")
                try await Self.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }

        @Test func targetKilledMidStreamFailsTheMigrationAndTheSourceRuns() async throws {
            try await Self.withThrottledMigration { ns, source, target, uri, fds in
                _ = try await target.qmp.waitForEvent("MIGRATION", matching: ["status": "active"], timeout: .seconds(10))
                #expect(target.kill(SIGKILL))
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                let info = try await source.qmp.execute("query-migrate")
                #expect(info["error-desc"]?.stringValue?.contains("migration channel") == true, "\(info.serialized)")
                try await Self.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }

        /// Each configuration disagreement the reviewers met, refused by the target before
        /// any state loads, with device, property and both values; the source runs on.
        @Test(arguments: [
            (NetworkDeviceFunctionalTests.nicArguments(queues: 2, mq: false, ifname: "tap1"),
             "device 'nic0' (virtio-net-pci): property 'mq' is on on the source but off on the target"),
            // The later -m wins over guestOptions' 64M.
            (["-m", "128M"] + NetworkDeviceFunctionalTests.nicArguments(queues: 2, ifname: "tap1"),
             "machine: property 'ram-size' is 67108864 on the source but 134217728 on the target"),
            ([], "device 'nic0' (virtio-net-pci) exists on the source but not on the target"),
        ])
        func configurationMismatchIsRefused(target targetArguments: [String], message: String) async throws {
            try await Pair.withMigrationPair(
                taps: [("tap0", 2), ("tap1", 2)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 2, ifname: "tap0"),
                target: targetArguments
            ) { ns, source, target, uri in
                try await Pair.enableEvents(source)
                let fds = openFileDescriptors(source.pid)
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
                let log = target.stderrTail(20).joined(separator: "\n")
                #expect(log.contains(message), "\(log)")
                try await Self.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }

        /// A peer that is not this VMM, on either end: a clear error, the source runs on.
        @Test func targetRefusesAQEMUStream() async throws {
            try await Self.withSingleTapPair(configureGuest: false) { _, _, target, uri, _ in
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                let fd = try UnixSocket.connect(path: String(uri.dropFirst(5)))
                defer { close(fd) }
                // QEMU's stream header: magic "QEVM", version 3, then a section.
                let qemu: [UInt8] = [0x51, 0x45, 0x56, 0x4D, 0, 0, 0, 3, 0x01, 0, 0, 0, 0, 0, 0, 0]
                _ = qemu.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
                let log = target.stderrTail(20).joined(separator: "\n")
                #expect(log.contains("the peer sent a QEMU migration stream"), "\(log)")
            }
        }

        /// QEMU's exit-on-error=false: the failed target stays for questions, and is spent.
        @Test func targetWithoutExitOnErrorStaysAndReports() async throws {
            try await Self.withSingleTapPair(configureGuest: false) { _, _, target, uri, _ in
                try await Pair.enableEvents(target)
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri), "exit-on-error": false])
                let fd = try UnixSocket.connect(path: String(uri.dropFirst(5)))
                _ = Array("GET / HTTP/1.1\r\n\r\n".utf8).withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
                close(fd)
                _ = try await target.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                let info = try await target.qmp.execute("query-migrate")
                #expect(info["error-desc"]?.stringValue?.contains("not a swift-vmm migration stream") == true, "\(info.serialized)")
                #expect(try await target.qmp.execute("query-status")["status"] == "inmigrate")
                await #expect(throws: QMPError.self) {
                    try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                }
            }
        }

        @Test func sourceFailsOnAPeerThatIsNotAVMM() async throws {
            try await Self.withSingleTapPair { ns, source, _, uri, fds in
                let peer = try ForeignPeer(path: String(uri.dropFirst(5)) + ".peer")
                try await source.qmp.execute("migrate", arguments: ["uri": .string("unix:\(peer.path)")])
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(20))
                let info = try await source.qmp.execute("query-migrate")
                #expect(info["error-desc"]?.stringValue?.contains("instead of being ready to switch over") == true, "\(info.serialized)")
                peer.join()
                try await Self.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }

        /// x-ignore-shared skips RAM only if the target provably maps the same memory.
        @Test func sharedRAMInADifferentFileIsRefused() async throws {
            let sourceRAM = "/dev/shm/vmm-mig-src-\(getpid())"
            let targetRAM = "/dev/shm/vmm-mig-dst-\(getpid())"
            defer {
                unlink(sourceRAM)
                unlink(targetRAM)
            }
            func backend(_ path: String) -> [String] {
                ["-object", "memory-backend-file,id=ram0,size=64M,mem-path=\(path),share=on", "-machine", "memory-backend=ram0"]
            }
            try await Pair.withMigrationPair(
                taps: [("tap0", 1), ("tap1", 1)],
                source: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap0") + backend(sourceRAM),
                target: NetworkDeviceFunctionalTests.nicArguments(queues: 1, ifname: "tap1") + backend(targetRAM)
            ) { ns, source, target, uri in
                try await Pair.enableEvents(source, target)
                for vm in [source, target] {
                    try await vm.qmp.execute("migrate-set-capabilities", arguments: ["capabilities": [["capability": "x-ignore-shared", "state": true]]])
                }
                let fds = openFileDescriptors(source.pid)
                try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
                let log = target.stderrTail(20).joined(separator: "\n")
                #expect(log.contains("x-ignore-shared: the source skipped RAM because it maps \(sourceRAM) shared, but this machine maps file \(targetRAM)"), "\(log)")
                try await Self.expectSourceRecovered(source, ns: ns, fds: fds)
            }
        }
    }
}

/// Entries in /proc/PID/fd.
func openFileDescriptors(_ pid: pid_t) -> Int { ProcessSnapshot(pid: pid)?.fileDescriptors ?? -1 }

/// What each fd of `pid` points to, for failure messages.
func describeFileDescriptors(_ pid: pid_t) -> String { ProcessSnapshot.describeFileDescriptors(of: pid) }

/// A listening unix socket for a fake migration peer (backlog 1).
func listenOnUnixSocket(_ path: String) throws -> Int32 {
    let listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
    var address = sockaddr_un()
    address.sun_family = sa_family_t(AF_UNIX)
    withUnsafeMutableBytes(of: &address.sun_path) { raw in
        let bytes = Array(path.utf8)
        raw.copyBytes(from: bytes)
        raw[bytes.count] = 0
    }
    let bound = withUnsafePointer(to: &address) {
        $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
    }
    guard bound == 0, listen(listener, 1) == 0 else {
        close(listener)
        throw FixtureError("cannot listen on \(path)")
    }
    return listener
}

/// A unix-socket peer for a migration source: serves one connection with `handle` on a
/// thread of its own, then closes its socket and removes the file. `join` waits for that.
final class OneConnectionPeer: @unchecked Sendable {
    let path: String
    private let listener: Int32
    private let done = DispatchSemaphore(value: 0)

    init(path: String, handle: @escaping @Sendable (Int32) -> Void) throws {
        self.path = path
        listener = try listenOnUnixSocket(path)
        Thread { [self] in
            defer {
                close(listener)
                unlink(path)
                done.signal()
            }
            let fd = accept(listener, nil, nil)
            guard fd >= 0 else { return }
            defer { close(fd) }
            handle(fd)
        }.start()
    }

    func join() { done.wait() }
}

/// A unix-socket server that swallows whatever a migration source sends and, once the
/// source goes quiet (it waits for an answer), replies with text no VMM would send.
final class ForeignPeer: @unchecked Sendable {
    private let peer: OneConnectionPeer
    var path: String { peer.path }

    init(path: String) throws {
        peer = try OneConnectionPeer(path: path) { fd in
            var buffer = [UInt8](repeating: 0, count: 1 << 16)
            var quiet = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            // Swallow until the source has been silent for 300 ms.
            while poll(&quiet, 1, 300) > 0 {
                if buffer.withUnsafeMutableBytes({ read(fd, $0.baseAddress, $0.count) }) <= 0 { return }
            }
            let answer = Array("HTTP/1.1 400 Bad Request\r\n\r\n".utf8)
            _ = answer.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) }
            // Until the source hangs up.
            while buffer.withUnsafeMutableBytes({ read(fd, $0.baseAddress, $0.count) }) > 0 {}
        }
    }

    func join() { peer.join() }
}
