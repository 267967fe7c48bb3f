import ArgumentParser
import Foundation
import QMPWire
import TestKit
import Testing

/// Live migration of a running guest with a host -> guest pinger running across it: the
/// bundled vmm's local mode (RAM memfd and TAP fds handed over the unix socket), its
/// cpr-transfer (live update: the RAM memfd and the `cpr=on` TAP's fds on the cpr channel,
/// the target started with the migration), its normal mode (RAM copied, a new TAP) and
/// QEMU q35's normal mode, a fresh source and target each round. Downtime and total time as each VMM reports them; loss, longest reply gap and the
/// freeze window as the pinger and the benchmark see them.
struct MigrationBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "migrate",
        abstract: "Live migration downtime, total time and ping loss: vmm local, vmm cpr-transfer, vmm normal, QEMU q35 normal.")

    @Option(help: "Rounds per case, alternating between the cases (a fresh source and target each); the median counts.")
    var rounds = 5

    @Option(help: "Guest RAM sizes, comma-separated.")
    var sizes = "128M,1G"

    @Option(help: "Cases, comma-separated: vmm-local, vmm-cpr, vmm-normal, qemu, qemu-cpr.")
    var cases = "vmm-local,vmm-cpr,vmm-normal,qemu"

    @Option(help: "QEMU binary to compare with; 'none' skips it.")
    var qemu = "qemu-system-x86_64"

    @Option(help: "QEMU with cpr-transfer (10.0 or later, installed by ci/install-qemu-cpr) for the qemu-cpr case.")
    var qemuCpr = "/opt/qemu-cpr/bin/qemu-system-x86_64"

    @Option(help: "max-bandwidth in bytes/s for normal-mode sources, vmm and QEMU alike (the default, 128 MiB/s in QEMU 7.2, would throttle).")
    var maxBandwidth: Int64 = 10_000_000_000

    @Option(help: "Interval between pings, in milliseconds.")
    var pingIntervalMs = 1

    static let hostAddress = "192.168.100.1"
    static let guestAddress = "192.168.100.2"
    static let hostMAC = "e6:1d:44:b5:03:5d"
    static let guestMAC = "52:54:00:12:34:56"

    enum Mode: String {
        case local = "vmm local"
        case cpr = "vmm cpr"
        case normal = "vmm normal"
        case qemu = "qemu q35"
        /// QEMU 10's cpr-transfer (ci/install-qemu-cpr), the live-update peer: QEMU 7.2 has none.
        case qemuCPR = "qemu10 cpr"

        var isQEMU: Bool { self == .qemu || self == .qemuCPR }
        /// The target serves the guest on the source's TAP (no second TAP, no address move).
        var keepsTap: Bool { self == .local || self == .cpr || self == .qemuCPR }
    }

    struct Round {
        var downtimeMicroseconds: Double
        /// The source's STOP to the target's RESUME, from the two VMMs' event timestamps
        /// (microseconds, both the host's wall clock): the guest's whole pause, the target's
        /// start and a TAP switch included, at the same resolution for both VMMs.
        var pausedMilliseconds: Double
        var totalMilliseconds: Double
        var lost: Int
        var longestGapMilliseconds: Double
        var freezeMilliseconds: Double
        var transferredBytes: Int64
        /// Replies to requests sent after the target's `cont`: the guest works on the target.
        var repliesAfter: Int
        /// Each lost request's sequence number and send time relative to the freeze window's start.
        var lossDetail: [String]
        /// Local mode: frames each vmm put into the guest's RX queue beside the frames the guest
        /// took from it (its `stats`), which tells a frame lost in the handover from one the
        /// guest dropped or never got.
        var counters: String?
    }

    struct Case {
        var mode: Mode
        var size: String
        var binary: VMMBinary
        var rounds: [Round] = []
        var failures: [String] = []
        /// downtime-limit and max-bandwidth as the source reported them after set-up.
        var settings: String?

        var name: String { "\(mode.rawValue) \(size)" }

        func summary(_ key: (Round) -> Double) -> Summary? { Summary(rounds.map(key)) }
    }

    func run() async throws {
        let vmm = try VMMBinary.bundled()
        let wanted = Set(cases.split(separator: ",").map { $0.trimmingCharacters(in: .whitespaces) })
        let sizeList = sizes.split(separator: ",").map(String.init)
        var modes: [(Mode, VMMBinary)] = []
        if wanted.contains("vmm-local") { modes.append((.local, vmm)) }
        if wanted.contains("vmm-cpr") { modes.append((.cpr, vmm)) }
        if wanted.contains("vmm-normal") { modes.append((.normal, vmm)) }
        if wanted.contains("qemu") {
            if qemu == "none" {
                print("note: QEMU skipped (--qemu none)")
            } else if let path = VMMBinary.findExecutable(qemu) {
                modes.append((.qemu, VMMBinary(path: path, defaultArguments: [
                    "-machine", "q35", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none"])))
            } else {
                print("note: \(qemu) not found, QEMU skipped")
            }
        }
        if wanted.contains("qemu-cpr") {
            if let path = VMMBinary.findExecutable(qemuCpr) {
                modes.append((.qemuCPR, VMMBinary(path: path, defaultArguments: [
                    "-machine", "q35", "-accel", "kvm", "-nodefaults", "-no-user-config", "-display", "none"])))
            } else {
                print("note: \(qemuCpr) not found (ci/install-qemu-cpr installs it), qemu-cpr skipped")
            }
        }
        var all: [Case] = []
        for size in sizeList {
            for (mode, binary) in modes { all.append(Case(mode: mode, size: size, binary: binary)) }
        }
        // Rounds alternate between the cases so that drift on the machine hits all alike.
        for round in 1...max(1, rounds) {
            for index in all.indices {
                do {
                    let result = try await migrateOnce(&all[index])
                    all[index].rounds.append(result)
                    progress("\(all[index].name) round \(round): " + describe(result, mode: all[index].mode))
                } catch {
                    all[index].failures.append("round \(round): \(error)")
                    progress("\(all[index].name) round \(round) FAILED: \(error)")
                }
            }
        }
        report(all)
    }

    /// A median of an even count can end in .5; the recorded values are whole numbers.
    func whole(_ value: Double) -> String { value.rounded() == value ? String(Int64(value)) : format(value, decimals: 1) }

    func progress(_ line: String) {
        FileHandle.standardError.write(Data((line + "\n").utf8))
    }

    func describe(_ r: Round, mode: Mode) -> String {
        "downtime \(whole(r.downtimeMicroseconds)) us\(mode.isQEMU ? " (1 ms resolution)" : ""), "
            + "paused \(format(r.pausedMilliseconds, decimals: 2)) ms, total \(whole(r.totalMilliseconds)) ms, lost \(r.lost), "
            + "longest gap \(format(r.longestGapMilliseconds, decimals: 1)) ms, freeze \(format(r.freezeMilliseconds, decimals: 1)) ms, "
            + "RAM sent \(format(Double(r.transferredBytes) / 1_048_576, decimals: 1)) MiB, replies after cont \(r.repliesAfter)"
            + (r.lossDetail.isEmpty ? "" : "; lost: " + r.lossDetail.prefix(6).joined(separator: ", ")
                + (r.lossDetail.count > 6 ? ", ... \(r.lossDetail.count - 6) more" : ""))
            + (r.counters.map { "; \($0)" } ?? "")
    }

    func report(_ all: [Case]) {
        print("migrate: live migration with host -> guest pings every \(pingIntervalMs) ms across it, \(rounds) rounds per case "
              + "(a fresh source and target each, cases alternating); median (min-max)")
        for binary in Set(all.map(\.binary.path)).sorted() { print("binary: \(binary)") }
        print("guest: \(BundledGuest.image)")
        for c in all where c.settings != nil && (c.mode == .qemu || c.mode == .normal) {
            print("\(c.name) source: \(c.settings!)")
        }
        if all.contains(where: { $0.mode == .qemuCPR }) {
            print("QEMU 10 has no cpr=on for TAP: its target attaches its own queues to the same multi-queue TAP (queues=2, mq=on),")
            print("so frames the kernel steers to the stopped source's queues during the switch are lost.")
        }
        if all.contains(where: { $0.mode.isQEMU }) {
            print("QEMU reports downtime in whole ms; its column is that value times 1000 (1 ms resolution).")
        }
        print("")
        func cell(_ s: Summary?, decimals: Int) -> String {
            guard let s else { return "-" }
            let text = { (value: Double) in decimals == 0 ? whole(value) : format(value, decimals: decimals) }
            return "\(text(s.median)) (\(text(s.min))-\(text(s.max)))"
        }
        let widths = [16, 20, 20, 16, 10, 18, 18]
        func row(_ cells: [String]) -> String {
            "| " + zip(cells, widths).map { pad($0, $1) }.joined(separator: " | ") + " |"
        }
        print(row(["case", "downtime us", "paused ms", "total ms", "lost", "longest gap ms", "freeze ms"]))
        print("|" + widths.map { String(repeating: "-", count: $0 + 2) }.joined(separator: "|") + "|")
        for c in all {
            print(row([c.name, cell(c.summary(\Round.downtimeMicroseconds), decimals: 0), cell(c.summary(\Round.pausedMilliseconds), decimals: 2),
                       cell(c.summary(\Round.totalMilliseconds), decimals: 0),
                       cell(c.summary { Double($0.lost) }, decimals: 0), cell(c.summary(\Round.longestGapMilliseconds), decimals: 1),
                       cell(c.summary(\Round.freezeMilliseconds), decimals: 1)]))
        }
        print("")
        for c in all {
            for (index, r) in c.rounds.enumerated() { print("  \(c.name) round \(index + 1): " + describe(r, mode: c.mode)) }
            for failure in c.failures { print("  \(c.name) FAILED \(failure)") }
        }
        print("")
        print("goal: vmm local downtime median < 1 ms with 0 lost packets")
        for c in all where c.mode == .local {
            guard let downtime = c.summary(\Round.downtimeMicroseconds) else {
                print("  \(c.size): no completed round: not met")
                continue
            }
            let lost = c.rounds.map(\.lost).reduce(0, +)
            let met = downtime.median < 1000 && lost == 0 && c.failures.isEmpty
            print("  \(c.size): median \(whole(downtime.median)) us, \(lost) lost over \(c.rounds.count) rounds"
                  + (c.failures.isEmpty ? "" : ", \(c.failures.count) failed rounds") + ": \(met ? "met" : "NOT met")")
        }
        print("goal: vmm cpr downtime median < 1 ms with 0 lost packets; total time independent of RAM size (1G within 1.2x of 128M)")
        for c in all where c.mode == .cpr {
            guard let downtime = c.summary(\Round.downtimeMicroseconds) else {
                print("  \(c.size): no completed round: not met")
                continue
            }
            let lost = c.rounds.map(\.lost).reduce(0, +)
            let met = downtime.median < 1000 && lost == 0 && c.failures.isEmpty
            print("  \(c.size): median \(whole(downtime.median)) us, \(lost) lost over \(c.rounds.count) rounds"
                  + (c.failures.isEmpty ? "" : ", \(c.failures.count) failed rounds") + ": \(met ? "met" : "NOT met")")
        }
        let cprTotals = all.filter { $0.mode == .cpr }.compactMap { c in c.summary(\Round.totalMilliseconds).map { (c.size, $0.median) } }
        if let small = cprTotals.first(where: { $0.0.uppercased() == "128M" }), let large = cprTotals.first(where: { $0.0.uppercased() == "1G" }) {
            let ratio = large.1 / max(small.1, 1)
            print("  total time 1G vs 128M: \(whole(large.1)) ms vs \(whole(small.1)) ms, ratio \(format(ratio, decimals: 3)): \(ratio <= 1.2 ? "met" : "NOT met")")
        }
        var sizes: [String] = []
        for c in all where !sizes.contains(c.size) { sizes.append(c.size) }
        for size in sizes {
            guard let ours = all.first(where: { $0.mode == .normal && $0.size == size }),
                  let theirs = all.first(where: { $0.mode == .qemu && $0.size == size }),
                  let a = ours.summary(\Round.totalMilliseconds), let b = theirs.summary(\Round.totalMilliseconds) else { continue }
            let ratio = a.median / b.median
            let isGoal = size.uppercased() == "1G"
            print((isGoal ? "goal: vmm normal \(size) total time < QEMU's: " : "vmm normal \(size) total time vs QEMU's: ")
                  + "\(whole(a.median)) ms vs \(whole(b.median)) ms, ratio vmm/qemu \(format(ratio, decimals: 3))"
                  + (isGoal ? (ratio < 1 ? ": met" : ": NOT met") : ""))
            if let da = ours.summary(\Round.downtimeMicroseconds), let db = theirs.summary(\Round.downtimeMicroseconds), db.median > 0 {
                print("  downtime \(size): \(whole(da.median)) us vs \(whole(db.median)) us, "
                      + "ratio vmm/qemu \(format(da.median / db.median, decimals: 3))")
            }
        }
    }

    /// One fresh source and target in a fresh namespace: set the guest's address up, ping
    /// it, migrate, resume the target, ping on for a while.
    func migrateOnce(_ c: inout Case) async throws -> Round {
        let mode = c.mode
        var template = Array("/tmp/vmm-bench-XXXXXX".utf8CString)
        guard mkdtemp(&template) != nil else { throw BenchmarkError(description: "mkdtemp: \(errno)") }
        let socketDirectory = String(decoding: template.prefix { $0 != 0 }.map { UInt8(bitPattern: $0) }, as: UTF8.self)
        defer { try? FileManager.default.removeItem(atPath: socketDirectory) }
        let uri = "unix:\(socketDirectory)/migration.sock"
        let needsSettings = c.settings == nil && mode != .local && mode != .cpr && mode != .qemuCPR
        let (round, settings) = try await NetworkNamespace.with(prefix: "bench-migrate") { ns in
            // QEMU opens a one-queue TAP without IFF_MULTI_QUEUE, which a multi-queue TAP refuses.
            // QEMU 10's cpr target re-opens tap0 beside the source: that needs two multi-queue opens.
            let multiQueue = mode != .qemu
            _ = try await ns.createTap("tap0", queues: mode == .qemuCPR ? 2 : 1, multiQueue: multiQueue)
            if !mode.keepsTap { _ = try await ns.createTap("tap1", queues: 1, multiQueue: multiQueue) }
            try await ns.withRoute { route in
                try route.setMAC(Self.hostMAC, of: "tap0")
                try route.addAddress("\(Self.hostAddress)/24", to: "tap0")
                try route.setLink("tap0", up: true)
            }
            return try await withArtifacts(testName: "bench-migrate-\(c.mode.rawValue)-\(c.size)") { [c] artifacts in
                // The artifact scope shuts both machines down however this body ends.
                let source = try await Machine.launch(machineOptions(c, target: false, namespace: ns), in: artifacts)
                let console = try source.console
                try await console.waitForPrompt(timeout: .seconds(120))
                try await console.run("ip addr add \(Self.guestAddress)/24 dev eth0", failure: "no such device", timeout: .seconds(60))
                try await console.run("ip link set eth0 up", timeout: .seconds(60))
                try await prepare(source.qmp, mode: mode, source: true)
                var settings: String?
                if needsSettings {
                    let p = try await source.qmp.execute("query-migrate-parameters")
                    settings = "downtime-limit \(p["downtime-limit"]?.intValue.map(String.init) ?? "?") ms, "
                        + "max-bandwidth \(p["max-bandwidth"]?.intValue.map(String.init) ?? "?") bytes/s"
                }

                let pinger = try Pinger(namespace: ns, destination: Self.guestAddress, interval: .milliseconds(pingIntervalMs))
                try pinger.start()
                try await pinger.waitForReplies(50, timeout: .seconds(30))

                var freeze: FreezeWindow
                let target: Machine
                if mode == .cpr || mode == .qemuCPR {
                    // The target starts with the migration: its monitor opens once the cpr state arrived.
                    // QEMU's cpr channel must be a unix path it binds itself.
                    freeze = FreezeWindow.begin()
                    target = try await MigrationPair.cprTransfer(
                        from: source, launching: machineOptions(c, target: true, namespace: ns), in: artifacts,
                        targetBindsCPRChannel: mode == .qemuCPR, timeout: .seconds(300)).target
                } else {
                    target = try await Machine.launch(machineOptions(c, target: true, namespace: ns), in: artifacts)
                    try await prepare(target.qmp, mode: mode, source: false)
                    try await target.qmp.execute("migrate-incoming", arguments: ["uri": .string(uri)])
                    freeze = FreezeWindow.begin()
                    try await source.qmp.execute("migrate", arguments: ["uri": .string(uri)])
                    try await MigrationWaiter.waitForFinish(source: source.qmp, target: target.qmp, timeout: .seconds(300))
                }
                // QEMU 10's source holds its queues of the shared TAP until it exits, and the kernel
                // steers each flow to one queue: quit it before the target runs, as a live update does.
                let early = mode == .qemuCPR
                    ? (info: try await source.qmp.execute("query-migrate"), stop: try source.qmp.events.last(where: { $0.name == "STOP" }))
                    : nil
                if early != nil { _ = await source.shutdown() }
                if !mode.keepsTap { try await ns.moveHostAddress("\(Self.hostAddress)/24", mac: Self.hostMAC, from: "tap0", to: "tap1") }
                try await target.qmp.execute("cont")
                freeze.close()
                try await Task.sleep(for: .milliseconds(300))
                pinger.stop()
                let report = await pinger.finish(timeout: .seconds(10))
                let info: JSON
                if let early { info = early.info } else { info = try await source.qmp.execute("query-migrate") }
                var counters: String?
                if mode == .local || mode == .cpr {
                    let (fromSource, fromTarget) = (try await Self.framesDelivered(source), try await Self.framesDelivered(target))
                    let stats = try await target.console.run("stats", expect: " send drops", timeout: .seconds(30))
                    let taken = stats.split(whereSeparator: \.isNewline).first { $0.contains("total:") }
                        .flatMap { $0.split(separator: " ").dropFirst(2).first }.flatMap { Int($0) }
                    counters = "RX frames: vmm source \(fromSource) + target \(fromTarget) = \(fromSource + fromTarget), "
                        + "guest took \(taken.map(String.init) ?? "?")"
                }
                guard let stop = try early?.stop ?? source.qmp.events.last(where: { $0.name == "STOP" }),
                      let resume = try target.qmp.events.last(where: { $0.name == "RESUME" }) else {
                    throw BenchmarkError(description: "no STOP on the source or no RESUME on the target")
                }
                _ = await source.shutdown()
                _ = await target.shutdown()

                let downtime: Double
                if mode.isQEMU {
                    guard let ms = info["downtime"]?.intValue else { throw BenchmarkError(description: "no downtime in \(info.serialized)") }
                    downtime = Double(ms) * 1000
                } else {
                    guard let us = info["x-downtime-us"]?.intValue else { throw BenchmarkError(description: "no x-downtime-us in \(info.serialized)") }
                    downtime = Double(us)
                }
                guard let total = info["total-time"]?.intValue else { throw BenchmarkError(description: "no total-time in \(info.serialized)") }
                // Pings lost before the guest first answered are its warm-up (seen: the first
                // ~750 of a round unanswered, a second before the migration began), not the
                // migration's: the migration starts only after 50 replies.
                let firstAnswered = report.samples.first { $0.received != nil }?.sent ?? .max
                let lost = report.samples.filter { $0.received == nil && $0.sent > firstAnswered }
                let round = Round(
                    downtimeMicroseconds: downtime,
                    pausedMilliseconds: Double((resume.timestamp.seconds - stop.timestamp.seconds) * 1_000_000
                        + resume.timestamp.microseconds - stop.timestamp.microseconds) / 1000,
                    totalMilliseconds: Double(total), lost: lost.count,
                    longestGapMilliseconds: report.longestGap.map { microseconds($0.duration) / 1000 } ?? 0,
                    freezeMilliseconds: microseconds(freeze.duration) / 1000,
                    transferredBytes: info["ram"]?["transferred"]?.intValue ?? 0,
                    repliesAfter: report.samples.filter { $0.sent > freeze.end.monotonic && $0.received != nil }.count,
                    lossDetail: lost.map { sample in
                        let at = Double(sample.sent - freeze.start.monotonic) / 1e6
                        return "seq \(sample.sequence) sent at \(at < 0 ? "" : "+")\(format(at, decimals: 1)) ms"
                            + (sample.sendError.map { " (send errno \($0))" } ?? "")
                    },
                    counters: counters)
                if (mode == .local || mode == .cpr) && !lost.isEmpty { artifacts.keep("\(mode.rawValue) migration lost \(lost.count) pings") }
                if round.repliesAfter == 0 {
                    let logs = [source, target].map { vm in "\(vm.name) stderr: " + vm.stderrTail(5).joined(separator: "\n  ") }
                    throw BenchmarkError(description: "no reply from the guest after the target's cont; query-migrate: \(info.serialized)\n"
                        + (counters.map { $0 + "\n" } ?? "") + logs.joined(separator: "\n") + "\n\(report)")
                }
                return (round, settings)
            }
        }
        if let settings { c.settings = settings }
        return round
    }

    /// Local: RAM in a memfd the target adopts, the target's netdev waiting for the source's
    /// TAP queues. Normal: plain -m RAM and a TAP per side. QEMU's target starts with -S:
    /// unlike the vmm it would run as soon as the stream is loaded, before the TAP switch.
    /// cpr: the same memfd RAM and `cpr=on` on both sides; the target's channels come from
    /// `MigrationPair.cprTransfer`.
    func machineOptions(_ c: Case, target: Bool, namespace: NetworkNamespace) -> MachineOptions {
        var arguments: [String] = []
        if c.mode == .local || c.mode == .cpr {
            arguments += ["-object", "memory-backend-memfd,id=ram0,size=\(c.size),share=on", "-machine", "memory-backend=ram0"]
        }
        let tap = c.mode == .local && target ? "incoming-fds=on" : "ifname=\(target && !c.mode.keepsTap ? "tap1" : "tap0")"
        var netdev = ["tap", "id=n0", tap, "queues=1", "script=no", "downscript=no"]
        if c.mode.isQEMU { netdev.append("vhost=off") }
        if c.mode == .cpr { netdev.append("cpr=on") }
        var device = "virtio-net-pci,netdev=n0,id=nic0,mac=\(Self.guestMAC)"
        if c.mode == .qemuCPR {
            // RAM and QEMU's own RAM blocks (ROMs) shared, so the target maps them; two queue pairs
            // on the multi-queue TAP both sides open (see tap0 in migrateOnce).
            arguments += ["-object", "memory-backend-memfd,id=ram0,size=\(c.size),share=on", "-machine", "memory-backend=ram0,aux-ram-share=on"]
            netdev[netdev.firstIndex(of: "queues=1")!] = "queues=2"
            device += ",mq=on"
        }
        arguments += ["-netdev", netdev.joined(separator: ","), "-device", device]
        if target && c.mode != .cpr && c.mode != .qemuCPR { arguments += ["-incoming", "defer"] }
        var options = MachineOptions(
            binary: c.binary, name: target ? "target" : "source", kernel: BundledGuest.image, memory: c.size,
            startPaused: target && c.mode.isQEMU, arguments: arguments, startupTimeout: .seconds(60))
        options.namespace = namespace
        return options
    }

    /// Both sides need `events` for MigrationWaiter (a cpr target has it from its command
    /// line; `MigrationPair.cprTransfer` sets the source's mode). Only normal-mode sources copy RAM, so
    /// only they get the bandwidth cap lifted; downtime-limit stays at the default 300 ms.
    func prepare(_ qmp: QMPClient, mode: Mode, source: Bool) async throws {
        var capabilities: [JSON] = [["capability": "events", "state": true]]
        if mode == .local { capabilities.append(["capability": "x-ignore-shared", "state": true]) }
        try await qmp.execute("migrate-set-capabilities", arguments: ["capabilities": .array(capabilities)])
        if mode == .local {
            try await qmp.execute("migrate-set-parameters", arguments: ["local": true])
        } else if source {
            try await qmp.execute("migrate-set-parameters", arguments: ["max-bandwidth": .int(maxBandwidth)])
        }
    }

    /// The NIC's received-frame count summed over its queues (query-pci's x-virtio-net).
    static func framesDelivered(_ vm: Machine) async throws -> Int {
        let buses = try await vm.qmp.execute("query-pci")
        let nic = buses.arrayValue?.first?["devices"]?.arrayValue?.first { $0["qdev_id"] == "nic0" }
        guard let counts = nic?["x-virtio-net"]?["rx-packets"]?.arrayValue else {
            throw BenchmarkError(description: "no x-virtio-net rx-packets for nic0 in query-pci: \(buses.serialized)")
        }
        return counts.compactMap(\.intValue).reduce(0) { $0 + Int($1) }
    }
}
