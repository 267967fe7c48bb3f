import ArgumentParser
import Foundation
import TestKit
import Testing

func microseconds(_ d: Duration) -> Double { Double(d.components.seconds) * 1e6 + Double(d.components.attoseconds) / 1e12 }

/// Host -> guest ping over a TAP in a fresh network namespace: RTT percentiles, then
/// the highest request rate that loses nothing over a fixed window, for the bundled
/// VMM and for QEMU q35 with the same guest image, per datapath: userspace virtio-net
/// on the TAP, and vhost-user with the bundled `vhost-user-net` backend on the TAP (the
/// same backend behind both VMMs).
struct PingBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "ping", abstract: "Host to guest ICMP RTT and loss-free packet rate, bundled vmm vs QEMU q35.")

    @Option(help: "Pings for the RTT measurement.")
    var rttCount = 500

    @Option(help: "Interval between RTT pings, in milliseconds.")
    var rttIntervalMs = 5

    @Option(help: "Seconds each packet rate is held.")
    var seconds = 5

    @Option(help: "Packet rates to try, ascending (packets per second).")
    var rates = "250,500,750,1000,1250,1500,1750,2000,2500,3000,4000"

    @Option(help: "TAP queues and virtio-net queue pairs.")
    var queues = 1

    @Option(help: "QEMU binary to compare with; 'none' skips it.")
    var qemu = "qemu-system-x86_64"

    @Option(help: "Extra arguments for the bundled vmm, space-separated (e.g. '-accel kvm,x-halt-poll-ns=10000000').")
    var vmmArguments = ""

    @Option(help: "RTT rounds per VMM, alternating between them (a fresh VM each); the median round counts.")
    var rounds = 3

    @Option(help: "Datapaths, comma-separated: userspace, vhost-user, vhost-kernel (needs /dev/vhost-net).")
    var datapaths = "userspace,vhost-user"

    /// One VMM on one datapath.
    struct Contender {
        var name: String
        var binary: VMMBinary
        var datapath: Datapath
        var isQEMU: Bool
    }

    struct Result {
        var name: String
        var rtts: [RTTStatistics] = []
        var rttLoss = 0
        var bestRate: Int?
        var rateLog: [String] = []

        func median(_ key: (RTTStatistics) -> Duration) -> Double? {
            Summary(rtts.map { microseconds(key($0)) })?.median
        }
    }

    func run() async throws {
        let vmm = try VMMBinary.bundled()
        let extra = vmmArguments.split(separator: " ").map(String.init)
        let qemuPath = qemu == "none" ? nil : VMMBinary.findExecutable(qemu)
        if qemu != "none", qemuPath == nil { print("note: \(qemu) not found, QEMU skipped") }
        var contenders: [Contender] = []
        for name in datapaths.split(separator: ",").map({ $0.trimmingCharacters(in: .whitespaces) }) {
            guard let datapath = Datapath(rawValue: name) else { throw ValidationError("unknown datapath '\(name)' (userspace, vhost-user, vhost-kernel)") }
            if let reason = datapath.unavailableReason {
                print("note: \(name) skipped: \(reason)")
                continue
            }
            let suffix = datapath == .userspace ? "" : " " + name
            contenders.append(Contender(name: "vmm" + suffix, binary: VMMBinary(path: vmm.path, defaultArguments: vmm.defaultArguments + extra),
                                        datapath: datapath, isQEMU: false))
            if let qemuPath {
                contenders.append(Contender(name: "qemu q35" + suffix, binary: VMMBinary(path: qemuPath, defaultArguments: [
                    "-machine", "q35", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none"]), datapath: datapath, isQEMU: true))
            }
        }
        let rateList = rates.split(separator: ",").compactMap { Int($0) }
        var results = contenders.map { Result(name: $0.name) }
        // Rounds alternate between the VMMs so that drift on the machine hits both alike.
        for _ in 0..<rounds {
            for (index, contender) in contenders.enumerated() {
                try await session(contender, rates: [], into: &results[index])
            }
        }
        for (index, contender) in contenders.enumerated() {
            try await session(contender, rates: rateList, into: &results[index])
        }
        print("ping: host -> guest over a TAP in a network namespace, queues=\(queues); RTT: \(rounds) rounds of \(rttCount) pings every \(rttIntervalMs) ms, median round; rates held \(seconds) s")
        print(pad("", 22) + pad("p50 us", 9) + pad("p99 us", 9) + pad("rtt loss", 10) + "max rate with 0 loss (pps)")
        for r in results {
            let p50 = r.median(\.p50).map { format($0, decimals: 0) } ?? "-"
            let p99 = r.median(\.p99).map { format($0, decimals: 0) } ?? "-"
            print(pad(r.name, 22) + pad(p50, 9) + pad(p99, 9) + pad(String(r.rttLoss), 10) + (r.bestRate.map(String.init) ?? "none"))
            print("  \(r.name): p50 per round " + r.rtts.map { format(microseconds($0.p50), decimals: 0) }.joined(separator: ", ") + " us")
            for line in r.rateLog { print("  \(r.name): \(line)") }
        }
        // Each vmm beside the QEMU on the same datapath, which follows it in `contenders`.
        for (index, contender) in contenders.enumerated() where !contender.isQEMU && index + 1 < contenders.count && contenders[index + 1].isQEMU {
            let (ours, theirs) = (results[index], results[index + 1])
            if let a = ours.median(\.p50), let b = theirs.median(\.p50) {
                print("ratio \(ours.name)/\(theirs.name) RTT p50: \(format(a / b, decimals: 3))")
            }
            if let a = ours.bestRate, let b = theirs.bestRate {
                print("ratio \(ours.name)/\(theirs.name) loss-free rate: \(format(Double(a) / Double(b), decimals: 3))")
            }
        }
    }

    /// One fresh VM: an RTT round when `rates` is empty, else the loss-free rate search.
    func session(_ contender: Contender, rates: [Int], into result: inout Result) async throws {
        let network = GuestNetwork(queues: queues, datapath: contender.datapath)
        try await NetworkNamespace.with(prefix: "bench") { ns in
            // Multi-queue only with several queues: QEMU opens a single queue without
            // IFF_MULTI_QUEUE, which a multi-queue TAP refuses.
            _ = try await ns.createTap(network.tap, queues: queues, multiQueue: queues > 1)
            try await ns.withRoute { route in
                try route.setMAC(network.hostMAC, of: network.tap)
                try route.addAddress(network.hostCIDR, to: network.tap)
                try route.setLink(network.tap, up: true)
            }
            result = try await withArtifacts(testName: "bench-ping-\(contender.name)") { [result] artifacts in
                var result = result
                let socket = try await network.startBackend(in: ns, artifacts: artifacts)
                var arguments = network.arguments(vhostUserSocket: socket)
                if contender.isQEMU {
                    // QEMU's default would be in-kernel vhost where /dev/vhost-net exists.
                    if contender.datapath == .userspace { arguments[1] += ",vhost=off" }
                    // vhost-user needs RAM the backend can map.
                    if contender.datapath == .vhostUser {
                        arguments += ["-object", "memory-backend-memfd,id=ram0,size=128M,share=on", "-machine", "memory-backend=ram0"]
                    }
                }
                var options = MachineOptions(binary: contender.binary, kernel: BundledGuest.image, memory: "128M", arguments: arguments,
                                             startupTimeout: .seconds(60))
                options.namespace = ns
                // The artifact scope shuts the machine (then the backend) down however this body ends.
                let vm = try await Machine.launch(options, in: artifacts)
                let console = try vm.console
                try await console.waitForPrompt(timeout: .seconds(120))
                try await console.run("ip addr add 192.168.100.2/24 dev eth0", timeout: .seconds(60))
                try await console.run("ip link set eth0 up", timeout: .seconds(60))
                let warm = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(20), count: 20)
                try warm.start()
                _ = await warm.finish(timeout: .seconds(10))

                if rates.isEmpty {
                    let rttPinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(rttIntervalMs), count: rttCount)
                    try rttPinger.start()
                    let rttReport = await rttPinger.finish(timeout: .seconds(Double(rttCount * rttIntervalMs) / 1000 + 10))
                    if let rtt = rttReport.rtt { result.rtts.append(rtt) }
                    result.rttLoss += rttReport.lost
                }
                for rate in rates {
                    let interval = Duration.nanoseconds(1_000_000_000 / rate)
                    let pinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: interval, count: rate * seconds)
                    try pinger.start()
                    let report = await pinger.finish(timeout: .seconds(seconds + 10))
                    result.rateLog.append("\(rate) pps: sent \(report.sent), lost \(report.lost)")
                    if report.lost == 0 && report.sent > 0 { result.bestRate = rate } else { break }
                }
                _ = await vm.shutdown()
                return result
            }
        }
    }
}
