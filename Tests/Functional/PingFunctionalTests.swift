import QMPWire
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// The seed's network setup without migration: tap0 with 192.168.100.1/24 in a fresh
    /// namespace, the guest at 192.168.100.2/24, pings both ways over multi-queue virtio-net.
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct PingFunctionalTests {
        static let hostAddress = "192.168.100.1"
        static let guestAddress = "192.168.100.2"

        @Test(arguments: [1, 4])
        func guestAndHostPingEachOtherWithoutLoss(queues: Int) async throws {
            try await NetworkedGuest.with(GuestNetwork(queues: queues)) { guest in
                let (ns, vm) = (guest.namespace, guest.machine)
                try await vm.console.run("ping -c 1 -W 2 \(Self.hostAddress)", expect: "1 packets received",
                                         failure: "0 packets received", timeout: .seconds(20))
                let single = try Pinger(namespace: ns, destination: Self.guestAddress, interval: .milliseconds(100), count: 1)
                try single.start()
                #expect(await single.finish(timeout: .seconds(5)).received == 1)
                // 500 per second: well inside what the guest sustains (docs/benchmarks.md) even while
                // other tests load both cores; the benchmark measures the limit.
                let burst = try Pinger(namespace: ns, destination: Self.guestAddress, interval: .milliseconds(2), count: 1000)
                try burst.start()
                let report = await burst.finish(timeout: .seconds(30))
                #expect(report.sent == 1000)
                #expect(report.lost == 0, "\(report)")
                let stats = try await vm.console.run("stats", expect: "total:")
                #expect(stats.contains("rx0:"))
            }
        }

        @Test func severalFlowsUseMoreThanOneReceiveQueue() async throws {
            try await NetworkedGuest.with(GuestNetwork(queues: 4)) { guest in
                let (ns, vm) = (guest.namespace, guest.machine)
                // The TAP steers by a hash of the addresses: pings from eight source addresses
                // are eight flows, like the seed's `ping -I`.
                let sources = (11...18).map { "192.168.100.\($0)" }
                try await ns.withRoute { route in for source in sources { try route.addAddress("\(source)/24", to: "tap0") } }
                let pingers = try sources.map { source in
                    try Pinger(namespace: ns, destination: Self.guestAddress, interval: .milliseconds(5), count: 40, source: source)
                }
                for pinger in pingers { try pinger.start() }
                for pinger in pingers {
                    let report = await pinger.finish(timeout: .seconds(30))
                    #expect(report.lost == 0, "\(report)")
                }
                let stats = try await vm.console.run("stats", expect: "total:")
                let busyQueues = stats.split(whereSeparator: \.isNewline).filter { line in
                    guard line.hasPrefix("rx"), let count = line.split(separator: " ").dropFirst().first.flatMap({ Int($0) }) else { return false }
                    return count > 0
                }
                #expect(busyQueues.count > 1, "only one RX queue carried traffic:\n\(stats)")
                let nic = try await NetworkDeviceFunctionalTests.nicInfo(vm.qmp)
                #expect(nic["x-virtio-net"]?["queue-pairs"] == 4, "the guest should have enabled every pair")
            }
        }
    }
}
