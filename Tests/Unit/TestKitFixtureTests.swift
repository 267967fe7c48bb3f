@testable import TestKit
import Testing

@Suite struct GuestShellParsingTests {
    @Test func statsParsesEveryQueueAndTheTotals() throws {
        let output = """
            stats\r
            rx0: 12 packets tx0: 3 packets\r
            rx1: 7 packets tx1: 0 packets\r
            total: rx 19 packets tx 3 packets, 1 bad, 2 send drops
            """
        let stats = try #require(GuestStats(parsing: output))
        #expect(stats.queues == [.init(received: 12, sent: 3), .init(received: 7, sent: 0)])
        #expect(stats.received == 19 && stats.sent == 3)
        #expect(stats.bad == 1 && stats.sendDrops == 2)
    }

    @Test func statsWithoutTheTotalLineIsRefused() {
        #expect(GuestStats(parsing: "rx0: 1 packets tx0: 1 packets\n") == nil)
        #expect(GuestStats(parsing: "ip: can't find device 'eth0'\n") == nil)
    }

    @Test func numbersAroundMarkers() {
        let ping = "3 packets transmitted, 2 packets received"
        #expect(GuestShell.numberBefore(" packets transmitted", in: ping) == 3)
        #expect(GuestShell.numberBefore(" packets received", in: ping) == 2)
        #expect(GuestShell.numberAfter("round ", in: "scribble ok, round 41\r\n") == 41)
        #expect(GuestShell.firstNumber(in: "ticks\r\n1234\r\n# ") == 1234)
        #expect(GuestShell.numberBefore(" bad", in: "no digits bad") == nil)
    }
}

@Suite struct StrictRequirementsTests {
    @Test func keysComeFromTheEnvironment() {
        let environment = [StrictRequirements.environmentKey: "kvm, netns,,tap"]
        #expect(StrictRequirements.keys(environment: environment) == ["kvm", "netns", "tap"])
        #expect(StrictRequirements.isStrict("kvm", environment: environment))
        #expect(!StrictRequirements.isStrict("vhost-net", environment: environment))
        #expect(StrictRequirements.isStrict("vhost-net", environment: [StrictRequirements.environmentKey: "all"]))
        #expect(StrictRequirements.keys(environment: [:]).isEmpty)
    }

    @Test func errorNamesTheVariableTheKeyAndTheReason() {
        let error = RequirementNotMet(key: "kvm", reason: "/dev/kvm: No such file or directory")
        #expect("\(error)" == "TESTKIT_REQUIRE lists 'kvm', but: /dev/kvm: No such file or directory")
    }
}
