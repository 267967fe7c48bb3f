import TestKit
import Testing

extension SerializedNetworkSuites {
    /// One body, every datapath (TestKit's `Datapath`): the guest reaches the host, the
    /// host's pings all come back, query-pci names the datapath that really runs, and with
    /// vhost no TX notify reached the VMM (ioeventfd kicks went to the backend or the
    /// kernel's vhost workers).
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct DatapathFunctionalTests {
        @Test(arguments: Datapath.allCases)
        func pingsFlowBothWays(_ datapath: Datapath) async throws {
            try await NetworkedGuest.with(GuestNetwork(queues: 2, datapath: datapath)) { guest in
                let fromGuest = try await guest.machine.guest.ping(guest.network.hostAddress, count: 3, waitSeconds: 2)
                #expect(fromGuest.received == 3, "guest -> host over \(datapath): \(fromGuest)")
                let pinger = try guest.pinger(interval: .milliseconds(20), count: 50)
                try pinger.start()
                let report = await pinger.finish(timeout: .seconds(30))
                #expect(report.received == 50, "host -> guest over \(datapath): \(report)")
                try await TapMigrationFunctionalTests.expectDatapath(datapath, on: guest.machine, nic: guest.network.deviceID)
            }
        }
    }
}
