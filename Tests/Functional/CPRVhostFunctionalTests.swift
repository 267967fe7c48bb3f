import Foundation
import Glibc
import QMPWire
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// cpr-transfer with the vhost datapaths: the next VMM takes over the TAP queues with
    /// the `/dev/vhost-net` fds (`tap,vhost=on,cpr=on`), which the old one gave up first
    /// (VHOST_RESET_OWNER), so the new one's SET_OWNER cannot fail with EBUSY.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct CPRVhostFunctionalTests {
        /// The live update with a pinger at 500/s: both sides complete, 0 pings lost, no RAM
        /// copied, the target's NIC on the same datapath; `check` adds the datapath's own proof.
        static func liveUpdate(_ network: GuestNetwork, check: (MigrationPair) async throws -> Void) async throws {
            try await MigrationPair.with(mode: .cprTransfer, network: network) { pair in
                let ticks = try await pair.source.guest.ticks()
                let pinger = try pair.pinger()
                try pinger.start()
                try await pinger.waitForReplies(50, timeout: .seconds(10))
                let result = try await pair.migrate()
                #expect(result.outcome == MigrationOutcome(sourceStatus: "completed", targetStatus: "completed",
                                                           sourceRunState: "postmigrate", targetRunState: "paused"))
                try await pinger.waitForReplies(pinger.report().received + 50, timeout: .seconds(10))
                pinger.stop()
                let report = await pinger.finish(timeout: .seconds(10))
                #expect(report.lost == 0, "\(report)")
                #expect(result.info["ram"]?["normal"]?.intValue == 0, "\(result.info.serialized)")
                #expect(try await pair.target.guest.ticks(after: .milliseconds(100)) > ticks)
                let nic = try await NetworkDeviceFunctionalTests.nicInfo(pair.target.qmp, id: network.deviceID)
                #expect(nic["x-virtio-net"]?["datapath"] == .string(network.datapath.rawValue), "\(nic.serialized)")
                #expect(try await pair.target.guest.ping(network.hostAddress, count: 3, waitSeconds: 2).received == 3)
                try await check(pair)
            }
        }

        /// Kernel vhost, 2 pairs: the target took the source's vhost devices and owns them
        /// (a SET_OWNER refused with EBUSY would have failed its netdev and the migration).
        @Test(.requiresVhostNet) func liveUpdateWithKernelVhost() async throws {
            try await Self.liveUpdate(GuestNetwork(queues: 2, datapath: .vhostKernel)) { pair in
                let log = pair.target.stderrTail(200).joined(separator: "\n")
                #expect(!log.contains("Device or resource busy") && !log.contains("VHOST_SET_OWNER"), "\(log)")
            }
        }

        /// Cancelled after the cpr state went out (the series author's flow: the target has
        /// the fds but no netdev claimed them yet): the source takes its host side back (kernel
        /// vhost: SET_OWNER after its RESET_OWNER) and resumes, answering every ping, on the
        /// same datapath; `check` adds the datapath's own proof.
        static func cancelAfterTheCPRState(_ network: GuestNetwork, check: (VhostUserBackendProcess?) async throws -> Void) async throws {
            try await NetworkNamespace.with { namespace in
                try await network.createTap(in: namespace)
                try await withArtifacts { artifacts in
                    let backend = try await network.startBackendProcess(in: namespace, artifacts: artifacts)
                    var options = MachineOptions.bundledGuest(arguments: network.arguments(vhostUserSocket: backend?.socketPath, cpr: true), name: "source")
                    options.namespace = namespace
                    let source = try await Machine.launch(options, in: artifacts)
                    try await source.console.waitForPrompt(timeout: .seconds(20))
                    try await source.guest.configureNetwork(address: network.guestCIDR)
                    let across = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(5), replyTimeout: .seconds(10))
                    try across.start()
                    try await across.waitForReplies(10, timeout: .seconds(10))
                    // The target's monitor is up: it holds the cpr state's fds now.
                    let (target, _) = try await CPRTransferFunctionalTests.startDeferredTarget(from: source, namespace: namespace, in: artifacts)
                    #expect(try await source.qmp.execute("query-status")["status"] == "finish-migrate")
                    try await source.qmp.execute("migrate_cancel")
                    _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "cancelled"], timeout: .seconds(10))
                    _ = await target.shutdown()
                    #expect(try await source.qmp.execute("query-status")["status"] == "running")
                    try await across.waitForReplies(across.report().received + 20, timeout: .seconds(10))
                    across.stop()
                    let acrossReport = await across.finish(timeout: .seconds(15))
                    #expect(acrossReport.lost == 0, "across the attempt: \(acrossReport)")
                    let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(2), count: 100)
                    try pinger.start()
                    let report = await pinger.finish(timeout: .seconds(20))
                    #expect(report.lost == 0, "\(report)")
                    let nic = try await NetworkDeviceFunctionalTests.nicInfo(source.qmp, id: network.deviceID)
                    #expect(nic["x-virtio-net"]?["datapath"] == .string(network.datapath.rawValue), "\(nic.serialized)")
                    let log = source.stderrTail(200).joined(separator: "\n")
                    #expect(!log.contains("Device or resource busy") && !log.contains("NEEDS_RESET"), "\(log)")
                    try await check(backend)
                    _ = await source.shutdown()
                }
            }
        }

        @Test(.requiresVhostNet) func cancelAfterTheCPRStateWithKernelVhost() async throws {
            try await Self.cancelAfterTheCPRState(GuestNetwork(queues: 2, datapath: .vhostKernel)) { _ in }
        }

        /// The backend served one front-end connection throughout (accepted once, never
        /// gone, nothing refused): the connection moved, no second front-end appeared.
        static func checkOneConnection(_ backend: VhostUserBackendProcess?, pid: pid_t?) throws {
            let backend = try #require(backend)
            #expect(backend.isRunning && backend.pid == pid)
            let log = backend.log
            #expect(log.components(separatedBy: "front-end connected").count == 2, "\(log)")
            #expect(!log.contains("front-end gone") && !log.contains("closing the connection"), "\(log)")
        }

        /// vhost-user, 2 pairs: the backend's connection travels in the cpr state; the
        /// same backend process serves the target on the one connection it accepted, and
        /// the old VMM's exit afterwards does not end it.
        @Test func liveUpdateWithVhostUser() async throws {
            try await Self.liveUpdate(GuestNetwork(queues: 2, datapath: .vhostUser)) { pair in
                let pid = pair.backend?.pid
                let nic = try await NetworkDeviceFunctionalTests.nicInfo(pair.target.qmp, id: pair.network.deviceID)
                #expect(nic["x-virtio-net"]?["max-queue-pairs"] == 2 && nic["x-virtio-net"]?["link"] == "up", "\(nic.serialized)")
                #expect(await pair.source.shutdown() == .exited(0))
                #expect(try await pair.target.guest.ping(pair.network.hostAddress, count: 3, waitSeconds: 2).received == 3,
                        "after the old VMM exited; backend: \(pair.backend?.log ?? "")")
                try Self.checkOneConnection(pair.backend, pid: pid)
            }
        }

        /// Cancelled after the cpr state went out: the old front-end takes its connection
        /// back (the target had a copy, never used) and its rings start again in the backend.
        @Test func cancelAfterTheCPRStateWithVhostUser() async throws {
            try await Self.cancelAfterTheCPRState(GuestNetwork(queues: 2, datapath: .vhostUser)) { backend in
                try Self.checkOneConnection(backend, pid: backend?.pid)
            }
        }

        /// The series author's flow with vhost-user: the target starts with only the cpr
        /// channel and no NIC; once its monitor is up, `chardev-add`, `netdev_add {type:
        /// vhost-user, cpr: true}` (the source's arguments), `device_add`, the mode and
        /// `migrate-incoming`. The netdev took the connection, so it never connected
        /// through the chardev: the backend still saw one front-end.
        @Test func seriesAuthorsFlowWithVhostUser() async throws {
            let network = GuestNetwork(queues: 2, datapath: .vhostUser)
            try await NetworkNamespace.with { namespace in
                try await network.createTap(in: namespace)
                try await withArtifacts { artifacts in
                    let backend = try #require(try await network.startBackendProcess(in: namespace, artifacts: artifacts))
                    var options = MachineOptions.bundledGuest(arguments: network.arguments(vhostUserSocket: backend.socketPath, cpr: true), name: "source")
                    options.namespace = namespace
                    let source = try await Machine.launch(options, in: artifacts)
                    try await source.console.waitForPrompt(timeout: .seconds(20))
                    try await source.guest.configureNetwork(address: network.guestCIDR)
                    let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(2))
                    try pinger.start()
                    try await pinger.waitForReplies(20, timeout: .seconds(10))
                    let (target, main) = try await CPRTransferFunctionalTests.startDeferredTarget(from: source, namespace: namespace, in: artifacts)
                    try await MigrationWaiter.enableEvents(on: target)
                    try await target.qmp.execute("chardev-add", arguments: ["id": .string(network.chardevID), "backend": [
                        "type": "socket", "data": ["addr": ["type": "unix", "data": ["path": .string(backend.socketPath)]], "server": false],
                    ]])
                    try await target.qmp.execute("netdev_add", arguments: [
                        "type": "vhost-user", "id": .string(network.netdevID), "chardev": .string(network.chardevID),
                        "queues": .int(Int64(network.queues)), "cpr": true,
                    ])
                    try await target.qmp.execute("device_add", arguments: [
                        "driver": "virtio-net-pci", "netdev": .string(network.netdevID), "id": .string(network.deviceID),
                        "mac": .string(network.guestMAC), "mq": "on",
                    ])
                    try await target.qmp.execute("migrate-set-parameters", arguments: ["mode": "cpr-transfer"])
                    try await target.qmp.execute("migrate-incoming", arguments: ["channels": [CPRTransferFunctionalTests.unix("main", main)]])
                    try await MigrationWaiter.waitForFinish(source: source, target: target, timeout: .seconds(30))
                    try await target.qmp.execute("cont")
                    try await pinger.waitForReplies(pinger.report().received + 20, timeout: .seconds(10))
                    pinger.stop()
                    let report = await pinger.finish(timeout: .seconds(10))
                    #expect(report.lost == 0, "\(report)")
                    let nic = try await NetworkDeviceFunctionalTests.nicInfo(target.qmp, id: network.deviceID)
                    #expect(nic["x-virtio-net"]?["datapath"] == "vhost-user", "\(nic.serialized)")
                    _ = await source.shutdown()
                    #expect(try await target.guest.ping(network.hostAddress, count: 3, waitSeconds: 2).received == 3)
                    try Self.checkOneConnection(backend, pid: backend.pid)
                    _ = await target.shutdown()
                }
            }
        }

        /// Five live updates in a row on vhost-user (A→B→…): each VMM takes the connection
        /// its predecessor had taken over and hands it on; every VMM holds the same number
        /// of fds and threads, the backend serves the one connection it first accepted, and
        /// the guest answers at the end.
        @Test func liveUpdatesInARowWithVhostUser() async throws {
            let network = GuestNetwork(queues: 2, datapath: .vhostUser)
            try await NetworkNamespace.with { namespace in
                try await network.createTap(in: namespace)
                try await withArtifacts { artifacts in
                    let backend = try #require(try await network.startBackendProcess(in: namespace, artifacts: artifacts))
                    var options = MachineOptions.bundledGuest(arguments: network.arguments(vhostUserSocket: backend.socketPath, cpr: true), name: "u0")
                    options.namespace = namespace
                    var current = try await Machine.launch(options, in: artifacts)
                    try await current.console.waitForPrompt(timeout: .seconds(20))
                    try await current.guest.configureNetwork(address: network.guestCIDR)
                    let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(5), replyTimeout: .seconds(5))
                    try pinger.start()
                    try await pinger.waitForReplies(10, timeout: .seconds(10))
                    var first: ProcessSnapshot?
                    for update in 1...5 {
                        var next = options
                        next.name = "u\(update)"
                        let updated = try await MigrationPair.liveUpdate(from: current, to: next, in: artifacts)
                        #expect(await current.shutdown() == .exited(0), "update \(update)")
                        current = updated
                        let now = try #require(ProcessSnapshot(pid: current.pid))
                        let reference = first ?? now
                        first = reference
                        #expect(now.fileDescriptors == reference.fileDescriptors,
                                "update \(update): \(now) vs \(reference): \(ProcessSnapshot.describeFileDescriptors(of: current.pid))")
                        #expect(now.threads == reference.threads, "update \(update): \(now) vs \(reference)")
                    }
                    try await pinger.waitForReplies(pinger.report().received + 20, timeout: .seconds(10))
                    pinger.stop()
                    let report = await pinger.finish(timeout: .seconds(10))
                    #expect(report.lost == 0, "\(report)")
                    #expect(try await current.guest.ping(network.hostAddress, count: 3, waitSeconds: 2).received == 3)
                    try Self.checkOneConnection(backend, pid: backend.pid)
                    _ = await current.shutdown()
                }
            }
        }
    }
}
