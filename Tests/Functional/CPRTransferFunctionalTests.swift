import Foundation
import Glibc
import QMPWire
import Synchronization
import TestKit
import Testing

/// cpr-transfer (live update) as the "Live update: tap and vhost" series defines it: a new
/// VMM takes over the running guest's RAM memfd and its `cpr=on` TAP queues from the cpr
/// channel, before it builds its devices. These need no pinger; the ones that count lost
/// pings are in `SerializedNetworkSuites.CPRTransferNetworkFunctionalTests`.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct CPRTransferFunctionalTests {
    static func refusal(_ qmp: QMPClient, _ command: String, _ arguments: JSONObject) async -> String? {
        do {
            _ = try await qmp.execute(command, arguments: arguments)
            return nil
        } catch {
            return "\(error)"
        }
    }

    static func unix(_ type: String, _ path: String) -> JSON {
        MigrationPair.channelJSON(type, ["transport": "socket", "type": "unix", "path": .string(path)])
    }

    /// RAM the next process cannot map (a private memfd) is refused when `migrate` is
    /// issued, naming the memory backend; the guest runs on and nothing started.
    @Test func privateRAMIsRefusedUpFront() async throws {
        try await withArtifacts { artifacts in
            let source = try await Machine.launch(.bundledGuest(
                arguments: ["-object", "memory-backend-ram,id=m0,size=64M", "-machine", "memory-backend=m0"], name: "source"), in: artifacts)
            try await source.console.waitForPrompt(timeout: .seconds(20))
            try await MigrationWaiter.enableEvents(on: source)
            try await source.qmp.execute("migrate-set-parameters", arguments: ["mode": "cpr-transfer"])
            let error = await Self.refusal(try source.qmp, "migrate", ["channels": [
                Self.unix("main", try artifacts.socketPath("main.sock")), Self.unix("cpr", try artifacts.socketPath("cpr.sock")),
            ]])
            #expect(error?.contains("Migration mode 'cpr-transfer' needs guest RAM the next process can map: memory backend 'm0' is private (share=off); use memory-backend-memfd or memory-backend-file with share=on") == true,
                    "\(error ?? "accepted")")
            try await source.qmp.expectNoEvent("MIGRATION", within: .milliseconds(200))
            #expect(try await source.qmp.execute("query-status")["status"] == "running")
            #expect(try await source.qmp.execute("query-migrate") == [:])
            try await source.console.run("echo still here", expect: "still here")
        }
    }

    /// TestKit's `MigrationPair.cprTransfer` when the source refuses `migrate`: the error
    /// reaches the test and the target, which waited for a cpr state that never came, is
    /// gone when it returns (before, it outlived the call, and a process that ended right
    /// after, such as vmm-bench, left it running).
    @Test func cprTransferHelperLeavesNoTargetWhenMigrateIsRefused() async throws {
        try await withArtifacts { artifacts in
            let source = try await Machine.launch(.bundledGuest(
                arguments: ["-object", "memory-backend-ram,id=m0,size=64M", "-machine", "memory-backend=m0"], name: "source"), in: artifacts)
            try await source.console.waitForPrompt(timeout: .seconds(20))
            var options = MachineOptions.bundledGuest(name: "target")
            options.startupTimeout = .seconds(3)
            await #expect(throws: QMPError.self) {
                _ = try await MigrationPair.cprTransfer(from: source, launching: options, in: artifacts)
            }
            // Within the target's 3 s start-up deadline: a launch still under way has spawned it by now.
            try await Task.sleep(for: .seconds(1))
            let marker = try artifacts.socketPath("target-main.sock")
            let targets = try FileManager.default.contentsOfDirectory(atPath: "/proc").filter { entry in
                guard Int(entry) != nil, let cmdline = FileManager.default.contents(atPath: "/proc/\(entry)/cmdline") else { return false }
                return String(decoding: cmdline, as: UTF8.self).contains(marker)
            }
            #expect(targets.isEmpty, "target processes still running: \(targets)")
            #expect(try await source.qmp.execute("query-status")["status"] == "running")
        }
    }

    /// The channels cpr-transfer needs, each missing one named; a cpr channel in another
    /// mode is refused too. The guest is never touched.
    @Test func channelsAreCheckedUpFront() async throws {
        try await withArtifacts { artifacts in
            let source = try await Machine.launch(.bundledGuest(name: "source"), in: artifacts)
            try await MigrationWaiter.enableEvents(on: source)
            let main = try artifacts.socketPath("main.sock")
            let cpr = try artifacts.socketPath("cpr.sock")
            let normal = await Self.refusal(try source.qmp, "migrate", ["channels": [Self.unix("main", main), Self.unix("cpr", cpr)]])
            #expect(normal?.contains("A cpr channel (unix:\(cpr)) is only used by migration mode 'cpr-transfer', but mode is 'normal'") == true,
                    "\(normal ?? "accepted")")
            try await source.qmp.execute("migrate-set-parameters", arguments: ["mode": "cpr-transfer"])
            #expect(try await source.qmp.execute("query-migrate-parameters")["mode"] == "cpr-transfer")
            for (channels, message) in [
                ([Self.unix("cpr", cpr)], "migrate: mode 'cpr-transfer' needs a main channel besides the cpr channel (unix:\(cpr)); give channels [main, cpr]"),
                ([Self.unix("main", main)], "migrate: mode 'cpr-transfer' needs a cpr channel besides the main channel (unix:\(main)); give channels [main, cpr]"),
                ([MigrationPair.channelJSON("main", ["transport": "socket", "type": "inet", "host": "127.0.0.1", "port": "4444"]), Self.unix("cpr", cpr)],
                 "migrate: mode 'cpr-transfer' passes file descriptors, which only a unix socket carries; the main channel is 'tcp:127.0.0.1:4444'"),
            ] as [([JSON], String)] {
                let error = await Self.refusal(try source.qmp, "migrate", ["channels": .array(channels)])
                #expect(error?.contains(message) == true, "\(error ?? "accepted")")
            }
            let uri = await Self.refusal(try source.qmp, "migrate", ["uri": .string("unix:" + main)])
            #expect(uri?.contains("needs a cpr channel besides the main channel") == true, "\(uri ?? "accepted")")
            try await source.qmp.expectNoEvent("MIGRATION", within: .milliseconds(200))
            #expect(try await source.qmp.execute("query-status")["status"] == "running")
            #expect(try await source.qmp.execute("query-migrate") == [:])
        }
    }

    /// The target reads the cpr channel before its monitor opens: something else there
    /// (a configuration section) ends it with status 1, saying what arrived.
    @Test func cprChannelCarriesOnlyTheCPRState() async throws {
        try await withArtifacts { artifacts in
            let cpr = try artifacts.socketPath("cpr.sock")
            // Without QMP (it would open only after the cpr state), so the launch returns at once.
            let target = try await Machine.launch(
                .bundledGuest(arguments: ["-incoming", "defer", "-incoming", Self.unix("cpr", cpr).serialized], connectQMP: false, name: "target"),
                in: artifacts)
            try await Self.waitForSocket(cpr)
            let fd = try UnixSocket.connect(path: cpr)
            defer { close(fd) }
            let bytes = MigrationChannelFunctionalTests.streamHeader + MigrationChannelFunctionalTests.frame(kind: 1)
            #expect(bytes.withUnsafeBytes { write(fd, $0.baseAddress, $0.count) } == bytes.count)
            #expect(try await target.wait(timeout: .seconds(10)) == .exited(1))
            let text = target.stderrTail(5).joined(separator: "\n")
            #expect(text.contains("vmm: -incoming cpr channel unix:\(cpr): the cpr state could not be applied: the cpr channel carries the cpr state only, not configuration"),
                    "\(text)")
            #expect(access(cpr, F_OK) != 0, "the cpr listener's socket is removed")
        }
    }

    /// RAM in a `share=on` file travels as that file's fd: the guest's RAM (its scribble
    /// round) and clock carry on in the next VMM, nothing copied.
    @Test func sharedFileRAMIsHandedOver() async throws {
        let path = "/dev/shm/svmm-cpr-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        defer { unlink(path) }
        try await withArtifacts { artifacts in
            let ram = ["-object", "memory-backend-file,id=m0,size=64M,mem-path=\(path),share=on", "-machine", "memory-backend=m0"]
            let source = try await Machine.launch(.bundledGuest(arguments: ram, name: "source"), in: artifacts)
            try await source.console.waitForPrompt(timeout: .seconds(20))
            let round = try await source.guest.scribble(rounds: 2)
            let ticks = try await source.guest.ticks()
            let next = try await MigrationPair.liveUpdate(from: source, to: .bundledGuest(arguments: ram, name: "next"), in: artifacts)
            #expect(try await source.qmp.execute("query-migrate")["ram"]?["normal"]?.intValue == 0)
            #expect(try await next.guest.ticks(after: .milliseconds(100)) > ticks)
            #expect(try await next.guest.scribble(rounds: 1) == round + 1)
        }
    }

    /// cpr-transfer passes fds by itself (004's rule): the `local` parameter left on at
    /// the source changes nothing, and a target that never set it takes the guest.
    @Test func localParameterDoesNotMatterInCPRTransfer() async throws {
        try await withArtifacts { artifacts in
            let source = try await Machine.launch(.bundledGuest(name: "source"), in: artifacts)
            try await source.console.waitForPrompt(timeout: .seconds(20))
            try await source.qmp.execute("migrate-set-parameters", arguments: ["local": true])
            let next = try await MigrationPair.liveUpdate(from: source, to: .bundledGuest(name: "next"), in: artifacts)
            try await next.console.run("echo updated", expect: "updated")
        }
    }

    /// A target waiting for its cpr state (no monitor yet) ends on SIGTERM like a running
    /// VMM: status 0, its listening socket removed.
    @Test func signalEndsTheWaitForTheCPRState() async throws {
        try await withArtifacts { artifacts in
            let cpr = try artifacts.socketPath("cpr.sock")
            let target = try await Machine.launch(
                .bundledGuest(arguments: ["-incoming", "defer", "-incoming", Self.unix("cpr", cpr).serialized], connectQMP: false, name: "target"),
                in: artifacts)
            try await Self.waitForSocket(cpr)
            #expect(target.kill(SIGTERM))
            #expect(try await target.wait(timeout: .seconds(10)) == .exited(0), "\(target.stderrTail())")
            #expect(access(cpr, F_OK) != 0, "the cpr listener's socket is removed")
        }
    }

    /// A target whose command line names both channels listens on the main one before the
    /// cpr state arrives (so a source can send the main stream right behind it); a signal
    /// while it waits removes both sockets.
    @Test func targetListensOnTheMainChannelBeforeTheCPRState() async throws {
        try await withArtifacts { artifacts in
            let main = try artifacts.socketPath("main.sock")
            let cpr = try artifacts.socketPath("cpr.sock")
            let target = try await Machine.launch(
                .bundledGuest(arguments: ["-incoming", Self.unix("main", main).serialized, "-incoming", Self.unix("cpr", cpr).serialized],
                              connectQMP: false, name: "target"),
                in: artifacts)
            try await Self.waitForSocket(cpr)
            #expect(access(main, F_OK) == 0, "the main channel listens while the target waits for the cpr state")
            #expect(target.kill(SIGTERM))
            #expect(try await target.wait(timeout: .seconds(10)) == .exited(0), "\(target.stderrTail())")
            #expect(access(main, F_OK) != 0, "the main listener's socket is removed")
            #expect(access(cpr, F_OK) != 0, "the cpr listener's socket is removed")
        }
    }

    /// When the target listens on its main channel already, the source connects it and
    /// sends the main stream right behind the cpr state, without waiting for the target to
    /// close the cpr channel (which a target in the series author's flow does only once
    /// `migrate-incoming` made it listen). The "target" here is two listening sockets that
    /// keep the cpr channel open; `migrate_cancel` then gives the source its guest back.
    @Test func sourceDoesNotWaitForTheCPRChannelToCloseWhenTheTargetListens() async throws {
        try await withArtifacts { artifacts in
            let source = try await Machine.launch(.bundledGuest(name: "source"), in: artifacts)
            try await source.console.waitForPrompt(timeout: .seconds(20))
            let main = try UnixListener(path: try artifacts.socketPath("main.sock"))
            let cpr = try UnixListener(path: try artifacts.socketPath("cpr.sock"))
            defer { main.close(); cpr.close() }
            try await MigrationWaiter.enableEvents(on: source)
            try await source.qmp.execute("migrate-set-parameters", arguments: ["mode": "cpr-transfer"])
            try await source.qmp.execute("migrate", arguments: ["channels": [Self.unix("main", main.path), Self.unix("cpr", cpr.path)]])
            let cprConnection = try await Self.accept(cpr, timeout: .seconds(10))
            defer { if let cprConnection { close(cprConnection) } }
            #expect(cprConnection != nil, "the source never connected the cpr channel")
            let mainConnection = try await Self.accept(main, timeout: .seconds(10))
            defer { if let mainConnection { close(mainConnection) } }
            #expect(mainConnection != nil, "the source did not connect the main channel while the cpr channel was open")
            if let mainConnection {
                var header = [UInt8](repeating: 0, count: MigrationChannelFunctionalTests.streamHeader.count)
                let n = header.withUnsafeMutableBytes { recv(mainConnection, $0.baseAddress, $0.count, Int32(MSG_WAITALL)) }
                #expect(n == header.count && header == MigrationChannelFunctionalTests.streamHeader, "main channel began with \(header.prefix(max(n, 0)))")
            }
            try await source.qmp.execute("migrate_cancel")
            _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "cancelled"], timeout: .seconds(10))
            #expect(try await source.qmp.execute("query-status")["status"] == "running")
            try await source.console.run("echo resumed", expect: "resumed")
        }
    }

    /// The connection `listener` accepted within `timeout`, or nil.
    static func accept(_ listener: UnixListener, timeout: Duration) async throws -> Int32? {
        let deadline = ContinuousClock.now + timeout
        while ContinuousClock.now < deadline {
            if let fd = try listener.acceptNow() { return fd }
            try await Task.sleep(for: .milliseconds(5))
        }
        return nil
    }

    /// The series author's flow up to its `netdev_add`s: a target started with `-incoming
    /// defer` and only a cpr channel (no NIC), and the source's `migrate` in cpr-transfer
    /// mode. Returns once the target's monitor is up, that is once it holds the cpr state's
    /// fds, with the main channel's path for its `migrate-incoming`.
    static func startDeferredTarget(
        from source: Machine, namespace: NetworkNamespace?, in artifacts: ArtifactDirectory
    ) async throws -> (target: Machine, main: String) {
        let main = try artifacts.socketPath("main.sock")
        let cpr = try artifacts.socketPath("cpr.sock")
        var targetOptions = MachineOptions.bundledGuest(arguments: ["-incoming", "defer", "-incoming", unix("cpr", cpr).serialized], name: "target")
        targetOptions.namespace = namespace
        let launch = Task { try await Machine.launch(targetOptions, in: artifacts) }
        try await waitForSocket(cpr)
        try await MigrationWaiter.enableEvents(on: source)
        try await source.qmp.execute("migrate-set-parameters", arguments: ["mode": "cpr-transfer"])
        try await source.qmp.execute("migrate", arguments: ["channels": [unix("main", main), unix("cpr", cpr)]])
        return (try await launch.value, main)
    }

    /// The VMM binds a unix channel's path at start-up; a connect just between its bind and
    /// listen is refused, so wait a moment more.
    static func waitForSocket(_ path: String) async throws {
        for _ in 0..<500 where access(path, F_OK) != 0 { try await Task.sleep(for: .milliseconds(20)) }
        try await Task.sleep(for: .milliseconds(100))
        #expect(access(path, F_OK) == 0, "\(path) never appeared")
    }
}

extension SerializedNetworkSuites {
    /// cpr-transfer with a guest on a TAP and a host pinger running.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct CPRTransferNetworkFunctionalTests {
        /// The issue's acceptance case: 4 queues, `cpr=on`, memfd RAM, pings at 500/s.
        /// The target completes, the source is in postmigrate, the target paused until
        /// `cont`; the guest's clock goes on; no RAM page travelled; the same TAP (ifindex)
        /// with the same 4 queues serves the guest; not one ping lost.
        @Test func liveUpdateKeepsTheTapAndLosesNoPing() async throws {
            try await MigrationPair.with(mode: .cprTransfer, network: GuestNetwork(queues: 4)) { pair in
                let tap = try await pair.namespace.withRoute { try $0.index(of: "tap0") }
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
                let targetInfo = try await pair.target.qmp.execute("query-migrate")
                #expect(targetInfo["status"] == "completed" && targetInfo["ram"]?["normal"]?.intValue == 0, "\(targetInfo.serialized)")
                #expect(try await pair.target.guest.ticks(after: .milliseconds(100)) > ticks)
                #expect(try await pair.namespace.withRoute { try $0.index(of: "tap0") } == tap)
                let info = try await pair.namespace.withRoute { try $0.tunInfo("tap0") }
                #expect(info.queues == 4, "\(info)")
                #expect(try await pair.source.qmp.execute("query-status")["status"] == "postmigrate")
                // Every queue pair still carries traffic on the target.
                let stats = try await pair.target.guest.stats()
                #expect(stats.queues.count == 4, "\(stats)")
                #expect(try await pair.target.guest.ping(pair.network.hostAddress).received == 1)
            }
        }

        /// A `cpr=off` netdev beside a `cpr=on` one: the target opens its own TAP for it (as
        /// in normal mode; the host address moves to it), the `cpr=on` one is handed over.
        @Test func cprOffNetdevOpensItsOwnTap() async throws {
            let guestNet = GuestNetwork(queues: 1)
            let handed = GuestNetwork(tap: "tapc", queues: 2, hostAddress: "192.168.101.1", guestAddress: "192.168.101.2",
                                      hostMAC: "e6:1d:44:b5:03:5e", guestMAC: "52:54:00:12:34:57", netdevID: "nc", deviceID: "nic1")
            try await NetworkNamespace.with { namespace in
                try await guestNet.createTap(in: namespace)
                try await guestNet.createTap(in: namespace, name: "tap1", address: false)
                try await handed.createTap(in: namespace)
                try await withArtifacts { artifacts in
                    var options = MachineOptions.bundledGuest(arguments: guestNet.arguments() + handed.arguments(cpr: true), name: "source")
                    options.namespace = namespace
                    let source = try await Machine.launch(options, in: artifacts)
                    try await source.console.waitForPrompt(timeout: .seconds(20))
                    try await source.guest.configureNetwork(address: guestNet.guestCIDR)
                    let handedIndex = try await namespace.withRoute { try $0.index(of: "tapc") }
                    let pinger = try Pinger(namespace: namespace, destination: guestNet.guestAddress, interval: .milliseconds(2))
                    try pinger.start()
                    try await pinger.waitForReplies(20, timeout: .seconds(10))
                    var freeze = FreezeWindow.begin()
                    var next = MachineOptions.bundledGuest(arguments: guestNet.arguments(ifname: "tap1") + handed.arguments(cpr: true), name: "target")
                    next.namespace = namespace
                    let (target, _) = try await MigrationPair.cprTransfer(from: source, launching: next, in: artifacts)
                    try await namespace.moveHostAddress(guestNet.hostCIDR, mac: guestNet.hostMAC, from: guestNet.tap, to: "tap1")
                    try await target.qmp.execute("cont")
                    freeze.close()
                    try await pinger.waitForReplies(pinger.report().received + 20, timeout: .seconds(10))
                    pinger.stop()
                    try await pinger.finish(timeout: .seconds(10)).checkLoss(inside: freeze)
                    #expect(await source.shutdown() == .exited(0))
                    let (tap0, tap1, tapc) = try await namespace.withRoute { route in
                        (try route.tunInfo("tap0"), try route.tunInfo("tap1"), try route.tunInfo("tapc"))
                    }
                    // The cpr=off TAPs: the source's is closed with it, the target opened tap1.
                    #expect(tap0.queues == 0 && tap1.queues == 1, "\(tap0) \(tap1)")
                    // The cpr=on TAP is the same device with the same queues, now the target's alone.
                    #expect(try await namespace.withRoute { try $0.index(of: "tapc") } == handedIndex)
                    #expect(tapc.queues == 2, "\(tapc)")
                    let pci = try await target.qmp.execute("query-pci")
                    let nics = pci.arrayValue?.first?["devices"]?.arrayValue?.compactMap { $0["x-virtio-net"] } ?? []
                    #expect(nics.map { $0["ifname"]?.stringValue ?? "" } == ["tap1", "tapc"], "\(pci.serialized)")
                    #expect(try await target.guest.ping(guestNet.hostAddress).received == 1)
                }
            }
        }

        /// The series author's flow: the target starts with `-incoming defer` and only the
        /// cpr channel, no NIC; its monitor opens once the cpr state arrived; then
        /// `netdev_add` with `cpr: true` (the same arguments as the source), `device_add`,
        /// `migrate-set-parameters mode=cpr-transfer` and `migrate-incoming` with the main channel.
        @Test func seriesAuthorsFlow() async throws {
            let network = GuestNetwork(queues: 2)
            try await NetworkNamespace.with { namespace in
                try await network.createTap(in: namespace)
                try await withArtifacts { artifacts in
                    var options = MachineOptions.bundledGuest(arguments: network.arguments(cpr: true), name: "source")
                    options.namespace = namespace
                    let source = try await Machine.launch(options, in: artifacts)
                    try await source.console.waitForPrompt(timeout: .seconds(20))
                    try await source.guest.configureNetwork(address: network.guestCIDR)
                    let ticks = try await source.guest.ticks()
                    let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(2))
                    try pinger.start()
                    try await pinger.waitForReplies(20, timeout: .seconds(10))

                    let main = try artifacts.socketPath("main.sock")
                    let cpr = try artifacts.socketPath("cpr.sock")
                    var targetOptions = MachineOptions.bundledGuest(
                        arguments: ["-incoming", "defer", "-incoming", CPRTransferFunctionalTests.unix("cpr", cpr).serialized], name: "target")
                    targetOptions.namespace = namespace
                    let monitorOpened = Mutex(false)
                    let launch = Task {
                        defer { monitorOpened.withLock { $0 = true } }
                        return try await Machine.launch(targetOptions, in: artifacts)
                    }
                    try await CPRTransferFunctionalTests.waitForSocket(cpr)
                    // As QEMU's: no monitor before the cpr state arrived.
                    try await Task.sleep(for: .milliseconds(300))
                    #expect(!monitorOpened.withLock { $0 }, "the target's monitor opened before the cpr state")
                    try await MigrationWaiter.enableEvents(on: source)
                    try await source.qmp.execute("migrate-set-parameters", arguments: ["mode": "cpr-transfer"])
                    try await source.qmp.execute("migrate", arguments: ["channels": [CPRTransferFunctionalTests.unix("main", main), CPRTransferFunctionalTests.unix("cpr", cpr)]])
                    let target = try await launch.value
                    try await MigrationWaiter.enableEvents(on: target)
                    #expect(try await target.qmp.execute("query-status")["status"] == "inmigrate")
                    // The source stopped the guest and waits for the target's main channel.
                    #expect(try await source.qmp.execute("query-status")["status"] == "finish-migrate")
                    try await target.qmp.execute("netdev_add", arguments: [
                        "type": "tap", "id": .string(network.netdevID), "ifname": .string(network.tap), "queues": .int(Int64(network.queues)),
                        "script": "no", "downscript": "no", "cpr": true,
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
                    #expect(try await target.guest.ticks(after: .milliseconds(100)) > ticks)
                    #expect(try await target.qmp.execute("query-migrate")["ram"]?["normal"]?.intValue == 0)
                    _ = await source.shutdown()
                    _ = await target.shutdown()
                }
            }
        }

        /// Cancelled, or the target killed, after the cpr state went out: the source goes
        /// back to its previous run state (running, or paused: then `cont`), answers pings
        /// on the TAP again, and holds exactly the fds it held before. The pings sent while
        /// the guest was stopped waited in the TAP and are answered too.
        @Test(arguments: ["cancel", "kill", "cancel while paused"])
        func sourceResumesAfterTheCPRStateWasSent(how: String) async throws {
            let network = GuestNetwork(queues: 2)
            try await NetworkNamespace.with { namespace in
                try await network.createTap(in: namespace)
                try await withArtifacts { artifacts in
                    var options = MachineOptions.bundledGuest(arguments: network.arguments(cpr: true), name: "source")
                    options.namespace = namespace
                    let source = try await Machine.launch(options, in: artifacts)
                    try await source.console.waitForPrompt(timeout: .seconds(20))
                    try await source.guest.configureNetwork(address: network.guestCIDR)
                    let fdsBefore = ProcessSnapshot.describeFileDescriptors(of: source.pid)
                    let paused = how == "cancel while paused"
                    if paused { try await source.qmp.execute("stop") }
                    // Across the attempt (running source): the guest is stopped meanwhile, so
                    // replies may come late, but none may be missing.
                    let across = paused ? nil : try Pinger(namespace: namespace, destination: network.guestAddress,
                                                           interval: .milliseconds(5), replyTimeout: .seconds(10))
                    try across?.start()
                    try await across?.waitForReplies(10, timeout: .seconds(10))
                    // The target's monitor is up: it holds the RAM and the TAP queues now.
                    let (target, main) = try await CPRTransferFunctionalTests.startDeferredTarget(from: source, namespace: namespace, in: artifacts)
                    #expect(try await source.qmp.execute("query-status")["status"] == "finish-migrate")
                    if how != "kill" {
                        try await source.qmp.execute("migrate_cancel")
                        _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "cancelled"], timeout: .seconds(10))
                    } else {
                        #expect(target.kill(SIGKILL))
                        _ = try await source.qmp.waitForEvent("MIGRATION", matching: ["status": "failed"], timeout: .seconds(10))
                        let info = try await source.qmp.execute("query-migrate")
                        #expect(info["error-desc"]?.stringValue?.contains("cpr-transfer: the target closed the cpr channel, but its main channel unix:\(main) cannot be reached (did the target exit?)") == true,
                                "\(info.serialized)")
                    }
                    _ = await target.shutdown()
                    #expect(try await source.qmp.execute("query-status")["status"] == (paused ? "paused" : "running"))
                    if paused { try await source.qmp.execute("cont") }
                    if let across {
                        try await across.waitForReplies(across.report().received + 20, timeout: .seconds(10))
                        across.stop()
                        let report = await across.finish(timeout: .seconds(15))
                        #expect(report.lost == 0, "across the attempt: \(report)")
                    }
                    let pinger = try Pinger(namespace: namespace, destination: network.guestAddress, interval: .milliseconds(2), count: 100)
                    try pinger.start()
                    let report = await pinger.finish(timeout: .seconds(20))
                    #expect(report.lost == 0, "\(report)")
                    #expect(ProcessSnapshot.describeFileDescriptors(of: source.pid) == fdsBefore)
                    #expect(try await namespace.withRoute { try $0.tunInfo("tap0") }.queues == 2)
                    try await source.console.run("echo resumed", expect: "resumed")
                }
            }
        }

        /// A target whose netdev is `cpr=off` (`netdev_add` without `cpr`) claims none of the
        /// TAP queues the cpr state carried: at the end it closes them, counts and names them,
        /// and fails (with `exit-on-error: false` it stays, saying so in query-migrate); the
        /// source resumes with the guest still answering.
        @Test func unclaimedCPRFDsAreClosedAndCounted() async throws {
            let network = GuestNetwork(queues: 2)
            try await NetworkNamespace.with { namespace in
                try await network.createTap(in: namespace)
                try await withArtifacts { artifacts in
                    var options = MachineOptions.bundledGuest(arguments: network.arguments(cpr: true), name: "source")
                    options.namespace = namespace
                    let source = try await Machine.launch(options, in: artifacts)
                    try await source.console.waitForPrompt(timeout: .seconds(20))
                    try await source.guest.configureNetwork(address: network.guestCIDR)
                    let (target, main) = try await CPRTransferFunctionalTests.startDeferredTarget(from: source, namespace: namespace, in: artifacts)
                    try await MigrationWaiter.enableEvents(on: target)
                    // The same TAP, opened by the target itself: it adds queues of its own.
                    try await target.qmp.execute("netdev_add", arguments: [
                        "type": "tap", "id": .string(network.netdevID), "ifname": .string(network.tap), "queues": .int(Int64(network.queues)),
                        "script": "no", "downscript": "no",
                    ])
                    try await target.qmp.execute("device_add", arguments: [
                        "driver": "virtio-net-pci", "netdev": .string(network.netdevID), "id": .string(network.deviceID),
                        "mac": .string(network.guestMAC), "mq": "on",
                    ])
                    try await target.qmp.execute("migrate-incoming", arguments: [
                        "channels": [CPRTransferFunctionalTests.unix("main", main)], "exit-on-error": false,
                    ])
                    let outcome = try await MigrationWaiter.waitForFinish(
                        source: source, target: target, expecting: ("failed", "failed"), runStates: ("running", "inmigrate"), timeout: .seconds(30))
                    #expect(outcome.sourceStatus == "failed")
                    let info = try await target.qmp.execute("query-migrate")
                    #expect(info["error-desc"]?.stringValue?.contains(
                        "received 2 file descriptor(s) that no section claimed: netdev/n0/tap.0, netdev/n0/tap.1") == true, "\(info.serialized)")
                    #expect(target.stderrTail(20).contains { $0.contains("incoming migration failed: received 2 file descriptor(s) that no section claimed") })
                    _ = await target.shutdown()
                    let reply = try await source.guest.ping(network.hostAddress)
                    #expect(reply.received == 1)
                    #expect(try await namespace.withRoute { try $0.tunInfo("tap0") }.queues == 2)
                }
            }
        }

        /// Hundreds of live updates with a pinger running, to catch races; by hand:
        /// `CPR_SOAK_UPDATES=300 swift test --filter cprSoak`. Its result goes in docs/reliability.md.
        @Test(.enabled(if: ProcessInfo.processInfo.environment["CPR_SOAK_UPDATES"] != nil, "set CPR_SOAK_UPDATES=N to run N live updates"),
              .timeLimit(.minutes(60)))
        func cprSoak() async throws {
            let updates = Int(ProcessInfo.processInfo.environment["CPR_SOAK_UPDATES"] ?? "") ?? 200
            try await MigrationPair.with(mode: .cprTransfer, network: GuestNetwork(queues: 4)) { pair in
                let pinger = try pair.pinger()
                try pinger.start()
                try await pinger.waitForReplies(20, timeout: .seconds(10))
                try await pair.migrate()
                var current = pair.target
                _ = await pair.source.shutdown()
                try await withArtifacts { artifacts in
                    for update in 2...max(2, updates) {
                        var options = MachineOptions.bundledGuest(arguments: pair.network.arguments(cpr: true), name: "u\(update)")
                        options.namespace = pair.namespace
                        let next = try await MigrationPair.liveUpdate(from: current, to: options, in: artifacts)
                        #expect(await current.shutdown() == .exited(0), "update \(update)")
                        current = next
                    }
                    try await pinger.waitForReplies(pinger.report().received + 20, timeout: .seconds(10))
                    pinger.stop()
                    let report = await pinger.finish(timeout: .seconds(10))
                    #expect(report.lost == 0, "\(updates) updates: \(report)")
                    print("cprSoak: \(updates) live updates with pings every 2 ms: \(report.sent) sent, \(report.lost) lost, "
                          + "longest gap \(report.longestGap.map { "\($0.duration)" } ?? "none")")
                    _ = await current.shutdown()
                }
            }
        }
    }
}

/// Twenty live updates in a row (A→B→C…): every VMM holds the same number of fds and
/// threads as the first, the TAP keeps its 4 queues, and this test process gets back
/// what it took. (RAM is a memfd: nothing in /dev/shm to check, and other suites' RAM
/// files there come and go meanwhile.)
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(10)), .requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces,
       .countsProcessResources)
struct CPRTransferLeakFunctionalTests {
    @Test func twentyLiveUpdatesLeakNothing() async throws {
        let network = GuestNetwork(queues: 4)
        let processBefore = try #require(ProcessSnapshot.current())
        try await NetworkNamespace.with { namespace in
            try await network.createTap(in: namespace)
            try await withArtifacts { artifacts in
                var options = MachineOptions.bundledGuest(arguments: network.arguments(cpr: true), name: "u0")
                options.namespace = namespace
                var current = try await Machine.launch(options, in: artifacts)
                try await current.console.waitForPrompt(timeout: .seconds(20))
                try await current.guest.configureNetwork(address: network.guestCIDR)
                var first: ProcessSnapshot?
                for update in 1...20 {
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
                    #expect(try await namespace.withRoute { try $0.tunInfo("tap0") }.queues == 4, "update \(update)")
                }
                #expect(try await current.guest.ping(network.hostAddress).received == 1)
                _ = await current.shutdown()
            }
        }
        // TestKit's reader and reaper threads end right after each machine; a leak of one
        // per update would show as 20 or more.
        let slack = 5
        var after = try #require(ProcessSnapshot.current())
        for _ in 0..<50 where after.fileDescriptors > processBefore.fileDescriptors + slack || after.threads > processBefore.threads + slack {
            try await Task.sleep(for: .milliseconds(20))
            after = try #require(ProcessSnapshot.current())
        }
        #expect(after.fileDescriptors <= processBefore.fileDescriptors + slack, "\(processBefore) -> \(after)")
        #expect(after.threads <= processBefore.threads + slack, "\(processBefore) -> \(after)")
    }
}
