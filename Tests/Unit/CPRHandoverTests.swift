import Glibc
import Logging
import Testing
@testable import VMMCore

/// The devices' side of cpr-transfer's setup notifiers: a `cpr=on` TAP's datapath stops
/// being polled for the handover (the loop and a halted vCPU both let go of its queues)
/// and is polled again when the handover is cancelled; anything else is left alone.
@Suite struct CPRHandoverTests {
    /// Two packet queues (socketpairs stand in for TAP queues) of a netdev with `cpr` as given.
    final class Queues: NetBackend, @unchecked Sendable {
        let id = "n0"
        let ifname = "tap0"
        let queueFDs: [FileDescriptor]
        let vnetHeader = true
        let cpr: Bool
        init(cpr: Bool) throws {
            self.cpr = cpr
            queueFDs = try (0..<2).map { _ in
                var pair: [Int32] = [-1, -1]
                guard socketpair(AF_UNIX, Int32(SOCK_DGRAM.rawValue), 0, &pair) == 0 else { throw SystemError("socketpair") }
                close(pair[1])
                return FileDescriptor(adopting: pair[0], label: "queue stand-in")
            }
        }
        func attachQueues(count: Int) {}
    }

    /// The halt wake sources each owner registered last.
    final class WakeSources: @unchecked Sendable {
        var byOwner: [String: Int] = [:]
    }

    static func nic(cpr: Bool) throws -> (VirtioNet, WakeSources) {
        let datapath = UserspaceTapDatapath(queues: try Queues(cpr: cpr), pairs: 2)
        let nic = VirtioNet(id: "net0", mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56], datapath: datapath, multiQueue: true,
                            logger: Logger(label: "test"))
        let sources = WakeSources()
        nic.host = DeviceHost(loop: try EventLoop(), wakeGuest: {}, setHaltWakeSources: { owner, list in sources.byOwner[owner] = list.count })
        try nic.resume()
        return (nic, sources)
    }

    @Test func cprTapStopsBeingPolledAndIsPolledAgainOnCancel() throws {
        let (nic, sources) = try Self.nic(cpr: true)
        #expect(sources.byOwner["netdev n0"] == 2)
        let context = HandoverContext(mode: .cprTransfer)
        #expect(try nic.prepareForHandover(context).isEmpty, "a TAP hands over its queues only, which the netdev names")
        #expect(sources.byOwner["netdev n0"] == 0)
        nic.cancelHandover(context)
        #expect(sources.byOwner["netdev n0"] == 2)
        // Cancelling twice, or resuming after it, registers the queues once.
        nic.cancelHandover(context)
        try nic.resume()
        #expect(sources.byOwner["netdev n0"] == 2)
    }

    @Test(arguments: [(false, HandoverContext.Mode.cprTransfer), (true, .local), (true, .normal)])
    func otherNetdevsAndModesAreLeftAlone(cpr: Bool, mode: HandoverContext.Mode) throws {
        let (nic, sources) = try Self.nic(cpr: cpr)
        _ = try nic.prepareForHandover(HandoverContext(mode: mode))
        #expect(sources.byOwner["netdev n0"] == 2)
    }
}
