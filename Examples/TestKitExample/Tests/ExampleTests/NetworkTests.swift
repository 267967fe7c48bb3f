import TestKit
import Testing

// Suites that count lost packets run one at a time: a 2-core host cannot carry two
// guests and their pingers at once without losing packets to scheduling.
@Suite(.serialized, .keepsArtifactsOnFailure, .requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
struct NetworkTests {
    @Test func fiveHundredPingsOverFourQueues() async throws {
        try await NetworkedGuest.with(GuestNetwork(queues: 4)) { guest in
            let pinger = try guest.pinger(interval: .milliseconds(2), count: 500)
            try pinger.start()
            let report = await pinger.finish(timeout: .seconds(30))
            #expect(report.lost == 0, "\(report)")
        }
    }

    @Test func localMigrationLosesNoPing() async throws {
        try await MigrationPair.with(mode: .local, network: GuestNetwork(queues: 4)) { pair in
            let ticks = try await pair.source.guest.ticks()
            let pinger = try pair.pinger()
            try pinger.start()
            try await pinger.waitForReplies(50, timeout: .seconds(10))
            let result = try await pair.migrate()
            try await pinger.waitForReplies(pinger.report().received + 50, timeout: .seconds(10))
            pinger.stop()
            try await pinger.finish(timeout: .seconds(10)).checkLoss(inside: result.freeze, maximumLost: 0)
            #expect(try await pair.target.guest.ticks(after: .milliseconds(100)) > ticks)
        }
    }
}
