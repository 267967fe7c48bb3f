import ArgumentParser
import Foundation
import TestKit
import Testing

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

    struct Result {
        var name: String
        var rtt: RTTStatistics?
        var rttLoss: Int
        var bestRate: Int?
        var rateLog: [String]
    }

    func run() async throws {
        let vmm = try VMMBinary.bundled()
        var contenders: [(String, VMMBinary, [String])] = [("vmm", vmm, [])]
        if qemu != "none", let path = VMMBinary.findExecutable(qemu) {
            contenders.append(("qemu q35", VMMBinary(path: path, defaultArguments: [
                "-machine", "q35", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none"]), ["vhost=off"]))
        }
        let rateList = rates.split(separator: ",").compactMap { Int($0) }
        var results: [Result] = []
        for (name, binary, extraNetdev) in contenders {
            results.append(try await measure(name: name, binary: binary, extraNetdev: extraNetdev, rates: rateList))
        }
        print("ping: host -> guest over a TAP in a network namespace, queues=\(queues); RTT from \(rttCount) pings every \(rttIntervalMs) ms; rates held \(seconds) s")
        print(pad("", 10) + pad("p50 us", 9) + pad("p99 us", 9) + pad("rtt loss", 10) + "max rate with 0 loss (pps)")
        for r in results {
            let p50 = r.rtt.map { format(Double($0.p50.components.attoseconds) / 1e12 + Double($0.p50.components.seconds) * 1e6, decimals: 0) } ?? "-"
            let p99 = r.rtt.map { format(Double($0.p99.components.attoseconds) / 1e12 + Double($0.p99.components.seconds) * 1e6, decimals: 0) } ?? "-"
            print(pad(r.name, 10) + pad(p50, 9) + pad(p99, 9) + pad(String(r.rttLoss), 10) + (r.bestRate.map(String.init) ?? "none"))
            for line in r.rateLog { print("  \(r.name): \(line)") }
        }
        if results.count == 2, let a = results[0].rtt, let b = results[1].rtt {
            print("ratio vmm/qemu RTT p50: \(format(seconds(a.p50) / seconds(b.p50), decimals: 3))")
        }
        if results.count == 2, let a = results[0].bestRate, let b = results[1].bestRate {
            print("ratio vmm/qemu loss-free rate: \(format(Double(a) / Double(b), decimals: 3))")
        }
    }

    func seconds(_ d: Duration) -> Double { Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18 }

    func measure(name: String, binary: VMMBinary, extraNetdev: [String], rates: [Int]) async throws -> Result {
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
            return try await withArtifacts(testName: "bench-ping-\(name)") { artifacts in
                // The artifact scope shuts the machine down however this body ends.
                let vm = try await Machine.launch(options, in: artifacts)
                let console = try vm.console
                try await console.waitForPrompt(timeout: .seconds(120))
                try await console.run("ip addr add 192.168.100.2/24 dev eth0", timeout: .seconds(60))
                try await console.run("ip link set eth0 up", timeout: .seconds(60))
                let warm = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(20), count: 20)
                try warm.start()
                _ = await warm.finish(timeout: .seconds(10))

                let rttPinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: .milliseconds(rttIntervalMs), count: rttCount)
                try rttPinger.start()
                let rttReport = await rttPinger.finish(timeout: .seconds(Double(rttCount * rttIntervalMs) / 1000 + 10))
                var best: Int?
                var log: [String] = []
                for rate in rates {
                    let interval = Duration.nanoseconds(1_000_000_000 / rate)
                    let pinger = try Pinger(namespace: ns, destination: "192.168.100.2", interval: interval, count: rate * seconds)
                    try pinger.start()
                    let report = await pinger.finish(timeout: .seconds(seconds + 10))
                    log.append("\(rate) pps: sent \(report.sent), lost \(report.lost)")
                    if report.lost == 0 && report.sent > 0 { best = rate } else { break }
                }
                _ = await vm.shutdown()
                return Result(name: name, rtt: rttReport.rtt, rttLoss: rttReport.lost, bestRate: best, rateLog: log)
            }
        }
    }
}
