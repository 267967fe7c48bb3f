import ArgumentParser
import Foundation
import TestKit
import Testing

func microseconds(_ d: Duration) -> Double { Double(d.components.seconds) * 1e6 + Double(d.components.attoseconds) / 1e12 }

/// Host -> guest ping over a TAP in a fresh network namespace: RTT percentiles, then
/// the highest request rate that loses nothing over a fixed window, for the bundled
/// VMM and for QEMU q35 with the same guest image.
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
        var contenders: [(String, VMMBinary, [String])] = [("vmm", VMMBinary(path: vmm.path, defaultArguments: vmm.defaultArguments + extra), [])]
        if qemu != "none", let path = VMMBinary.findExecutable(qemu) {
            contenders.append(("qemu q35", VMMBinary(path: path, defaultArguments: [
                "-machine", "q35", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none"]), ["vhost=off"]))
        }
        let rateList = rates.split(separator: ",").compactMap { Int($0) }
        var results = contenders.map { Result(name: $0.0) }
        // Rounds alternate between the VMMs so that drift on the machine hits both alike.
        for _ in 0..<rounds {
            for (index, (name, binary, extraNetdev)) in contenders.enumerated() {
                try await session(name: name, binary: binary, extraNetdev: extraNetdev, rates: [], into: &results[index])
            }
        }
        for (index, (name, binary, extraNetdev)) in contenders.enumerated() {
            try await session(name: name, binary: binary, extraNetdev: extraNetdev, rates: rateList, into: &results[index])
        }
        print("ping: host -> guest over a TAP in a network namespace, queues=\(queues); RTT: \(rounds) rounds of \(rttCount) pings every \(rttIntervalMs) ms, median round; rates held \(seconds) s")
        print(pad("", 10) + pad("p50 us", 9) + pad("p99 us", 9) + pad("rtt loss", 10) + "max rate with 0 loss (pps)")
        for r in results {
            let p50 = r.median(\.p50).map { format($0, decimals: 0) } ?? "-"
            let p99 = r.median(\.p99).map { format($0, decimals: 0) } ?? "-"
            print(pad(r.name, 10) + pad(p50, 9) + pad(p99, 9) + pad(String(r.rttLoss), 10) + (r.bestRate.map(String.init) ?? "none"))
            print("  \(r.name): p50 per round " + r.rtts.map { format(microseconds($0.p50), decimals: 0) }.joined(separator: ", ") + " us")
            for line in r.rateLog { print("  \(r.name): \(line)") }
        }
        if results.count == 2, let a = results[0].median(\.p50), let b = results[1].median(\.p50) {
            print("ratio vmm/qemu RTT p50: \(format(a / b, decimals: 3))")
        }
        if results.count == 2, let a = results[0].bestRate, let b = results[1].bestRate {
            print("ratio vmm/qemu loss-free rate: \(format(Double(a) / Double(b), decimals: 3))")
        }
    }

    /// One fresh VM: an RTT round when `rates` is empty, else the loss-free rate search.
    func session(name: String, binary: VMMBinary, extraNetdev: [String], rates: [Int], into result: inout Result) async throws {
        try await NetworkNamespace.with(prefix: "bench") { ns in
            _ = try await ns.createTap("tap0", queues: queues, multiQueue: queues > 1)
            try await ns.withRoute { route in
                try route.addAddress("192.168.100.1/24", to: "tap0")
                try route.setLink("tap0", up: true)
            }
            let netdev = (["tap", "id=n0", "ifname=tap0", "queues=\(queues)", "script=no", "downscript=no"] + extraNetdev).joined(separator: ",")
            var options = MachineOptions(
                binary: binary, kernel: BundledGuest.image, memory: "128M",
                arguments: ["-netdev", netdev, "-device", "virtio-net-pci,netdev=n0,mq=\(queues > 1 ? "on" : "off")"],
                startupTimeout: .seconds(60))
            options.namespace = ns
            result = try await withArtifacts(testName: "bench-ping-\(name)") { [result] artifacts in
                var result = result
                // The artifact scope shuts the machine down however this body ends.
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
