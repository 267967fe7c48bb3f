import Glibc
import Logging
import Synchronization
import Testing
@testable import VMMCore

/// cpr-transfer with vhost-user (`-netdev vhost-user,...,cpr=on`) in one process, on the
/// bundled backend core: the connection travels in the cpr state as a local migration's
/// does (`netdev/<id>/vhost-user`), the old front-end lets go after its rings stopped, the
/// new one adopts it by netdev id and resumes the rings where they stopped; the backend
/// accepts one front-end in all.
@Suite struct CPRVhostUserTests {
    typealias FrontEnd = VhostUserFrontEndTests
    static let cpr = HandoverContext(mode: .cprTransfer)

    /// The cpr channel as a target's state machine reads it: RAM plus what the source sent.
    static func arrived(_ entries: [CPRState.Netdev], _ sent: [NamedFD]) throws -> IncomingMigrationTests.Fixture {
        let f = try IncomingMigrationTests.Fixture(expectsCPR: true)
        try f.beginCPR()
        let ram = try GuestMemory(size: IncomingMigrationTests.Fixture.ramSize, shared: true)
        let all = [NamedFD(name: CPRState.ramFDName, fd: ram.fd)] + sent
        f.cpr.append(try all.map { try $0.fd.duplicate() })
        let state = CPRState(ramKind: .memfd, ramSize: IncomingMigrationTests.Fixture.ramSize, netdevs: entries)
        try f.send(.init(kind: .cprState, payload: state.encoded(), fdNames: all.map(\.name)), on: .cpr)
        return f
    }

    @Test func theConnectionTravelsInTheCPRStateAndTheTargetResumesOnIt() throws {
        let served = try FrontEnd.Served(queuePairs: 1)
        defer { served.finish() }
        let loop = try EventLoop()
        let source = try FrontEnd.netdev(served.path, loop: loop)
        source.cpr = true
        defer { source.shutdown() }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let rings = FrontEnd.Rings(ram: ram)
        let sourcePath = try source.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        #expect(sourcePath.handsOverForCPR)
        var handed = try rings.start(sourcePath)
        #expect(try rings.receive(slot: 0, tapPeer: served.tapPeer, kick: handed[0]?.kick))
        // The pause stops the rings (GET_VRING_BASE), then the setup notifier lets go.
        rings.queues = sourcePath.stop()
        let sent = try sourcePath.prepareForHandover(Self.cpr)
        #expect(sent.map(\.name) == ["netdev/n0/vhost-user"])
        let (entry, queues) = try #require(CPRState.Netdev.handover(of: source))
        #expect(entry.kind == CPRState.Netdev.kindVhostUser && entry.vhostKind == .user && entry.queues == 1 && queues.isEmpty)

        let f = try Self.arrived([entry], sent)
        let (pairs, fd) = try VhostUserNetdev.claimCPRConnection(id: "n0", queues: 1, from: f.incoming)
        #expect(pairs == 1 && fd.label == "received netdev/n0/vhost-user")
        #expect(f.cpr.closeUnclaimed() == [])
        let target = VhostUserNetdev(id: "n0", incomingQueues: pairs, chardev: try FrontEnd.chardev(served.path), loop: loop, logger: Logger(label: "test"))
        try target.adoptIncoming([fd], vnetHeader: true)
        let targetPath = try target.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        handed = try rings.start(targetPath)
        #expect(try rings.receive(slot: 1, tapPeer: served.tapPeer, kick: handed[0]?.kick), "the target's rings run in the same backend")
        rings.queues = targetPath.stop()
        #expect(rings.queues[0]?.lastAvailable == 2 && rings.queues[0]?.usedIndex == 2)
        #expect(served.accepted.load(ordering: .relaxed) == 1, "one front-end connection in all")
        #expect(rings.failures.withLock { $0 } == [])
        target.shutdown()
    }

    /// Cancelled after the state went out (the target took a copy and never ran): the
    /// source takes the connection back and its rings start again on it.
    @Test func aCancelTakesTheConnectionBack() throws {
        let served = try FrontEnd.Served(queuePairs: 1)
        defer { served.finish() }
        let loop = try EventLoop()
        let source = try FrontEnd.netdev(served.path, loop: loop)
        source.cpr = true
        defer { source.shutdown() }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let rings = FrontEnd.Rings(ram: ram)
        let datapath = try source.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        _ = try rings.start(datapath)
        rings.queues = datapath.stop()
        let sent = try datapath.prepareForHandover(Self.cpr)
        do {
            let f = try Self.arrived([try #require(CPRState.Netdev.handover(of: source)).0], sent)
            _ = try VhostUserNetdev.claimCPRConnection(id: "n0", queues: 1, from: f.incoming)
        }
        datapath.cancelHandover(Self.cpr, host: DeviceHost(loop: loop, wakeGuest: {}, setHaltWakeSources: { _, _ in }))
        let handed = try rings.start(datapath)
        #expect(try rings.receive(slot: 0, tapPeer: served.tapPeer, kick: handed[0]?.kick))
        #expect(served.accepted.load(ordering: .relaxed) == 1)
        #expect(rings.failures.withLock { $0 } == [])
    }

    /// The target's netdev must be what the source's was, with as many queue pairs; the
    /// entry's kinds must fit each other.
    @Test func theTargetsNetdevMustAgree() throws {
        let tapOnly = try Self.arrived([.init(id: "n0", queues: 1, vnetHeader: true, ifname: "tap0")], [])
        #expect { _ = try VhostUserNetdev.claimCPRConnection(id: "n0", queues: 1, from: tapOnly.incoming) } throws: {
            "\($0)" == "netdev n0 is cpr=on, but the cpr state hands over no vhost-user connection for it (was the source's netdev vhost-user with cpr=on?)"
        }
        let entry = CPRState.Netdev(id: "n0", kind: CPRState.Netdev.kindVhostUser, queues: 2, vnetHeader: true, ifname: "vhost-user:/s", vhostKind: .user)
        let two = try Self.arrived([entry], [])
        #expect { _ = try VhostUserNetdev.claimCPRConnection(id: "n0", queues: 4, from: two.incoming) } throws: {
            "\($0)" == "netdev n0: queues=4, but the vhost-user connection the cpr state hands over serves 2 queue pair(s)"
        }
        #expect { _ = try VhostUserNetdev.claimCPRConnection(id: "n0", queues: 2, from: two.incoming) } throws: {
            "\($0)" == "netdev 'n0' (vhost-user) expects netdev/n0/vhost-user, which the stream did not carry"
        }
        var bad = CPRState(ramKind: .memfd, ramSize: 4096, netdevs: [entry]).encoded()
        bad[bad.count - 1] = 0
        #expect { _ = try CPRState.decode(bad, owner: "cpr") } throws: { "\($0)" == "cpr state: netdev 'n0' of kind 2 cannot have vhost kind 0" }
        #expect(try CPRState.decode(CPRState(ramKind: .memfd, ramSize: 4096, netdevs: [entry]).encoded(), owner: "cpr").netdevs == [entry])
    }

    /// `-netdev vhost-user,...,cpr=on` keeps its chardev (the same options as the source's);
    /// it cannot also wait for a local migration's connection.
    @Test func commandLineSpelling() throws {
        let spec = try NetdevSpec.parse("vhost-user,id=n0,chardev=c0,queues=2,cpr=on", option: "-netdev")
        #expect(spec.cpr && spec.vhostUser && spec.vhostUserChardev == "c0" && spec.queues == 2)
        #expect(try !NetdevSpec.parse("vhost-user,id=n0,chardev=c0", option: "-netdev").cpr)
        #expect { _ = try NetdevSpec.parse("vhost-user,id=n0,queues=2,incoming-fds=on,cpr=on", option: "-netdev") } throws: {
            "\($0)" == "-netdev vhost-user,id=n0,queues=2,incoming-fds=on,cpr=on: cpr=on and incoming-fds=on exclude each other (cpr-transfer passes the connection on the cpr channel, local migration in the stream)"
        }
    }

    /// The taken-over connection is dead by the time the target's rings first run (the
    /// backend restarted meanwhile): a cpr target keeps its chardev, so with `reconnect=`
    /// it connects afresh and its rings run, instead of staying down like a local
    /// migration's target without a chardev.
    @Test func aDeadTakenOverConnectionReconnectsThroughTheChardev() throws {
        let served = try FrontEnd.Served(queuePairs: 1)
        defer { served.finish() }
        let loop = try FrontEnd.LoopThread()
        let source = try FrontEnd.netdev(served.path, loop: loop.loop)
        source.cpr = true
        let target = VhostUserNetdev(id: "n0", incomingQueues: 1, chardev: try FrontEnd.chardev(served.path, reconnect: 1), loop: loop.loop,
                                     logger: Logger(label: "test"))
        try loop.run()
        defer {
            loop.sync { source.shutdown(); target.shutdown() }
            loop.finish()
        }
        let ram = try GuestMemory(size: 1 << 20, backing: .memfd, shared: true)
        let rings = FrontEnd.Rings(ram: ram)
        let sourcePath = try source.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        _ = try rings.start(sourcePath)
        rings.queues = sourcePath.stop()
        let sent = try sourcePath.prepareForHandover(Self.cpr)
        try target.adoptIncoming([try sent[0].fd.duplicate()], vnetHeader: true)
        served.dropFrontEnd()
        #expect(FrontEnd.eventually { !source.linkUp })
        let targetPath = try target.makeDatapath(pairs: 1, memory: ram, memoryBackend: nil)
        let handed = try rings.start(targetPath)
        #expect(FrontEnd.eventually { served.accepted.load(ordering: .relaxed) == 2 && target.linkUp })
        // The reconnect sent the rings on the new connection.
        #expect(try rings.receive(slot: 0, tapPeer: served.tapPeer, kick: handed[0]?.kick))
        #expect(rings.failures.withLock { $0 } == [])
    }
}
