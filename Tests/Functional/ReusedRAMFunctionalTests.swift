import Foundation
import TestKit
import Testing

extension SerializedNetworkSuites {
    /// Guest RAM in a file that is not zero when the VMM starts: left by an earlier
    /// guest (running a test twice reuses its `/dev/shm` file) or full of random bytes.
    /// The loader must zero the image's bss and the guest must assume nothing else is
    /// zero; a second boot on a reused file used to come up with a dead NIC
    /// (`0 packets received`).
    @Suite(.requiresKVM, .requiresGuestImage, .requiresVMM, .requiresNetworkNamespaces)
    struct ReusedRAMFunctionalTests {
        static let hostAddress = "192.168.100.1"
        static let guestAddress = "192.168.100.2"
        static let ramSize = 64 << 20

        enum Previous: String, CaseIterable, Sendable {
            /// A first guest booted, networked and quit on the file.
            case earlierGuest
            /// The file was filled with random bytes.
            case randomBytes
        }

        @Test(arguments: Previous.allCases)
        func networkWorksOnANonZeroRAMFile(previous: Previous) async throws {
            let ramPath = "/dev/shm/vmm-reused-ram-\(getpid())-\(previous.rawValue)"
            unlink(ramPath)
            defer { unlink(ramPath) }
            if previous == .randomBytes {
                let random = try #require(FileHandle(forReadingAtPath: "/dev/urandom"))
                let bytes = random.readData(ofLength: Self.ramSize)
                try random.close()
                #expect(FileManager.default.createFile(atPath: ramPath, contents: bytes))
            }
            try await NetworkNamespace.with { ns in
                _ = try await ns.createTap("tap0", queues: 1, multiQueue: true)
                try await ns.withRoute { route in
                    try route.addAddress("\(Self.hostAddress)/24", to: "tap0")
                    try route.setLink("tap0", up: true)
                }
                let boots = previous == .earlierGuest ? 2 : 1
                for boot in 1...boots {
                    try await Self.bootAndPing(ns: ns, ramPath: ramPath, boot: boot)
                }
            }
        }

        static func bootAndPing(ns: NetworkNamespace, ramPath: String, boot: Int) async throws {
            var options = MachineOptions.bundledGuest(arguments: NetworkDeviceFunctionalTests.nicArguments(queues: 1) + [
                "-object", "memory-backend-file,id=ram0,size=64M,mem-path=\(ramPath),share=on",
                "-machine", "memory-backend=ram0",
            ])
            options.namespace = ns
            try await Machine.with(options) { vm in
                try await vm.console.waitForPrompt(timeout: .seconds(20))
                try await vm.console.run("ip addr add \(guestAddress)/24 dev eth0", failure: "no such device", timeout: .seconds(30))
                try await vm.console.run("ip link set eth0 up", timeout: .seconds(10))
                // The host first: its ARP request also teaches the guest the host's MAC, so the
                // guest's 1 s wait below covers one round trip, not two, on a loaded host.
                let pinger = try Pinger(namespace: ns, destination: guestAddress, interval: .milliseconds(100), count: 1)
                try pinger.start()
                #expect(await pinger.finish(timeout: .seconds(5)).received == 1, "boot \(boot): the host's ping went unanswered")
                try await vm.console.run("ping -c 1 -W 1 \(hostAddress)", expect: "1 packets received",
                                         failure: "0 packets received", timeout: .seconds(20))
                try await vm.qmp.execute("quit")
                _ = try await vm.wait(timeout: .seconds(10))
            }
        }
    }
}
