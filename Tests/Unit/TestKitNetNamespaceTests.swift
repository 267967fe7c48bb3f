import CLinux
import Foundation
import Synchronization
import Testing
@testable import TestKit

extension TestKitTests {
    /// Namespaces, TAPs and the pinger against the real kernel; skipped without root.
    @Suite(.requiresNetworkNamespaces) struct NetNamespaceTests {
        /// Our namespaces in /run/netns: `<prefix>-<our pid>-<n>`.
        static func ours(_ prefix: String) -> [String] {
            let entries = (try? FileManager.default.contentsOfDirectory(atPath: NetworkNamespace.runDirectory)) ?? []
            return entries.filter { $0.hasPrefix("\(prefix)-\(getpid())-") }
        }

        static func mounted(_ path: String) -> Bool {
            let mountinfo = (try? String(contentsOfFile: "/proc/self/mountinfo", encoding: .utf8)) ?? ""
            return mountinfo.split(separator: "\n").contains { $0.split(separator: " ").dropFirst(4).first.map(String.init) == path }
        }

        /// Interface names in /proc/thread-self/net/dev: the namespace of the calling thread
        /// (sysfs would show the namespace it was mounted in instead).
        static func devices() -> [String] {
            let text = (try? String(contentsOfFile: "/proc/thread-self/net/dev", encoding: .utf8)) ?? ""
            return text.split(separator: "\n").dropFirst(2).compactMap { line in
                line.split(separator: ":").first.map { $0.trimmingCharacters(in: .whitespaces) }
            }
        }

        /// The namespace a thread of this process that never entered another one is in.
        static func hostLinks() async throws -> [String] {
            try await BlockingThread.run(name: "tk-test-host") {
                let route = try RouteSocket()
                defer { route.close() }
                return try route.links().map(\.name)
            }
        }

        @Test func namespaceIsPinnedInRunNetnsAndRemoved() async throws {
            let seen = Mutex<(String, UInt64)>(("", 0))
            try await NetworkNamespace.with(prefix: "tknet-pin") { ns in
                seen.withLock { $0 = (ns.path, ns.inode) }
                #expect(ns.name.hasPrefix("tknet-pin-\(getpid())-"))
                #expect(Self.ours("tknet-pin") == [ns.name])
                #expect(Self.mounted(ns.path))
                // A thread inside sees the namespace's inode, and only lo, which is up.
                let (inode, links, devices) = try await ns.run {
                    let link = try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self/ns/net")
                    let route = try RouteSocket()
                    defer { route.close() }
                    return (link, try route.links(), Self.devices())
                }
                #expect(inode == "net:[\(ns.inode)]")
                #expect(links.map(\.name) == ["lo"])
                #expect(links.first?.isUp == true)
                #expect(devices == ["lo"])
                // `ip netns` sees it too: it is the same kind of mount that `ip netns add` makes.
                #expect(try Self.shell("ip netns list").contains(ns.name))
                #expect(try Self.shell("ip netns exec \(ns.name) ip -o link show lo").contains("UP"))
                // The test's own threads stay in the host namespace.
                #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/thread-self/ns/net") != inode)
            }
            let (path, _) = seen.withLock { $0 }
            #expect(!FileManager.default.fileExists(atPath: path))
            #expect(!Self.mounted(path))
            #expect(Self.ours("tknet-pin").isEmpty)
        }

        /// A kept directory of a scope inside a namespace holds the namespace's links and
        /// addresses and the kernel's messages since the scope began.
        @Test func keptArtifactsHoldTheNamespaceAndDmesg() async throws {
            let base = try temporaryDirectory()
            defer { try? FileManager.default.removeItem(atPath: base) }
            try await NetworkNamespace.with { ns in
                let artifacts = try ArtifactDirectory(testName: "evidence", base: base)
                artifacts.keep("for the test")
                #expect(await artifacts.finish(bodyError: nil, environment: [:]) == artifacts.path)
                let netns = try String(contentsOfFile: artifacts.file("netns.txt"), encoding: .utf8)
                #expect(netns.contains("$ ip -n \(ns.name) -d link") && netns.contains("lo:"), "\(netns)")
                let dmesg = try String(contentsOfFile: artifacts.file("dmesg.txt"), encoding: .utf8)
                #expect(dmesg.hasPrefix("$ dmesg --time-format iso --since "), "\(dmesg)")
            }
        }

        @Test func deletedEvenWhenTheBodyThrows() async throws {
            struct Deliberate: Error {}
            let path = Mutex("")
            await #expect(throws: Deliberate.self) {
                try await NetworkNamespace.with(prefix: "tknet-throw") { ns in
                    path.withLock { $0 = ns.path }
                    _ = try await ns.createTap("tap0")
                    throw Deliberate()
                }
            }
            #expect(!FileManager.default.fileExists(atPath: path.withLock { $0 }))
            #expect(Self.ours("tknet-throw").isEmpty)
        }

        @Test func runAfterDeleteFails() async throws {
            let ns = try await NetworkNamespace.create()
            // Named after the test, for `ip netns list` while debugging.
            #expect(ns.name.hasPrefix("tk-runAfterDeleteFails-\(getpid())-"))
            try ns.delete()
            try ns.delete()  // idempotent
            #expect(ns.isDeleted)
            await #expect(throws: NamespaceError.self) { try await ns.run { 1 } }
            #expect(throws: NamespaceError.self) { try ns.commandPrefix() }
        }

        @Test func droppedNamespaceIsDeleted() async throws {
            var path = ""
            do {
                let ns = try await NetworkNamespace.create(prefix: "tknet-drop")
                path = ns.path
                #expect(FileManager.default.fileExists(atPath: path))
            }
            #expect(!FileManager.default.fileExists(atPath: path))
        }

        @Test func multiQueueTapWithMACAddressAndLinkUp() async throws {
            try await NetworkNamespace.with(prefix: "tknet-tap") { ns in
                #expect(try await ns.createTap("tap0", queues: 4, vnetHeader: true) == "tap0")
                let state = try await ns.withRoute { route in
                    try route.setMAC("52:54:00:12:34:56", of: "tap0")
                    try route.addAddress("192.168.200.1/24", to: "tap0")
                    try route.setLink("tap0", up: true)
                    return (try route.link("tap0"), try route.addresses(of: "tap0"), try route.tunInfo("tap0"), try route.index(of: "tap0"))
                }
                let (link, addresses, tun, index) = state
                #expect(link.name == "tap0")
                #expect(link.mac == "52:54:00:12:34:56")
                #expect(link.isUp)
                #expect(link.kind == "tun")
                #expect(link.index == index)
                #expect(addresses == ["192.168.200.1/24"])
                #expect(tun == TunInfo(isTap: true, vnetHeader: true, persistent: true, multiQueue: true, queues: 0, disabledQueues: 0))

                // What a VMM with 4 queue pairs does: attach 4 queues, seen by the kernel.
                let (attached, flags) = try await ns.run {
                    let queues = try TapDevice.openQueues(name: "tap0", count: 4, vnetHeader: true)
                    defer { queues.close() }
                    let info = try RouteSocket().tunInfo("tap0")
                    return (info.queues, cl_tap_get_flags(queues.descriptors[3], nil))
                }
                #expect(attached == 4)
                #expect(flags & CL_IFF_MULTI_QUEUE != 0)
                // Closed queues detach once the last copy of each fd is gone. A process that
                // another test spawns at the same moment holds copies until its exec (they are
                // close-on-exec), so the count may lag behind the close briefly.
                var remaining = try await ns.withRoute { try $0.tunInfo("tap0").queues }
                for _ in 0..<100 where remaining != 0 {
                    try await Task.sleep(for: .milliseconds(10))
                    remaining = try await ns.withRoute { try $0.tunInfo("tap0").queues }
                }
                #expect(remaining == 0)

                // Created in the namespace, not next to the test.
                #expect(try await ns.run { Self.devices() }.sorted() == ["lo", "tap0"])
                #expect(try await !Self.hostLinks().contains("tap0"))
                #expect(try Self.shell("ip netns exec \(ns.name) ip -o addr show dev tap0").contains("inet 192.168.200.1/24"))

                try await ns.withRoute { route in
                    try route.removeAddress("192.168.200.1/24", from: "tap0")
                    try route.setLink("tap0", up: false)
                }
                #expect(try await ns.withRoute { try $0.addresses(of: "tap0") } == [])
                #expect(try await ns.withRoute { try $0.link("tap0").isUp } == false)
                try await ns.run { try TapDevice.delete(name: "tap0") }
                #expect(try await ns.run { Self.devices() } == ["lo"])
            }
        }

        @Test func errorsNameDeviceValueAndReason() async throws {
            try await NetworkNamespace.with(prefix: "tknet-err") { ns in
                try await ns.createTap("tap1")
                let errors: [String] = try await ns.run {
                    let route = try RouteSocket()
                    defer { route.close() }
                    try route.addAddress("10.1.2.3/8", to: "tap1")
                    var errors: [String] = []
                    do { try route.addAddress("10.1.2.3/8", to: "tap1") } catch { errors.append("\(error)") }
                    do { try route.setMAC("52:54:00:zz:00:01", of: "tap1") } catch { errors.append("\(error)") }
                    do { try route.setLink("nosuch0", up: true) } catch { errors.append("\(error)") }
                    do { try route.addAddress("300.1.1.1/24", to: "tap1") } catch { errors.append("\(error)") }
                    do { try TapDevice.create(name: "tap1") } catch { errors.append("\(error)") }
                    do { _ = try TapDevice.openQueues(name: "tap1", count: 2) } catch { errors.append("\(error)") }
                    do { _ = try route.tunInfo("lo") } catch { errors.append("\(error)") }
                    return errors
                }
                #expect(errors.count == 7)
                #expect(errors[0] == "add address 10.1.2.3/8 to tap1: Object exists (libnl error 6)")
                #expect(errors[1].hasPrefix("set MAC 52:54:00:zz:00:01 on tap1 (expected xx:xx:xx:xx:xx:xx): "))
                #expect(errors[2].hasPrefix("set link nosuch0 up: "), "\(errors[2])")
                #expect(errors[2].contains("No such device") || errors[2].contains("Object not found"), "\(errors[2])")
                #expect(errors[3].hasPrefix("add address 300.1.1.1/24 to tap1 (expected A.B.C.D/N): Invalid input"))
                #expect(errors[4] == "create TAP tap1: File exists")
                // A single-queue TAP refuses multi-queue attachment.
                #expect(errors[5] == "TUNSETIFF tap1 (IFF_TAP|IFF_NO_PI|IFF_MULTI_QUEUE) queue 1 of 2: Invalid argument")
                #expect(errors[6].hasPrefix("read TUN info of lo (not a TUN/TAP device)"))
            }
        }

        @Test func pingerOnLoopback200At1ms() async throws {
            try await NetworkNamespace.with(prefix: "tknet-ping") { ns in
                let pinger = try Pinger(namespace: ns, destination: "127.0.0.1", interval: .milliseconds(1), count: 200, payloadSize: 56)
                #expect(pinger.usesRawSocket)
                try pinger.start()
                try await pinger.waitForReplies(1, timeout: .seconds(5))
                let report = await pinger.finish(timeout: .seconds(10))
                #expect(report.sent == 200, "\(report)")
                #expect(report.received == 200, "\(report)")
                #expect(report.lost == 0, "\(report)")
                #expect(report.lostSequences.isEmpty)
                #expect(report.duplicates == 0)
                #expect(report.sendErrors == 0)
                let rtt = try #require(report.rtt)
                #expect(rtt.min > .zero && rtt.max < .milliseconds(100), "\(report)")
                // Absolute deadlines: the 200th request leaves 199 ms after the first, give or take scheduling.
                let span = Duration.nanoseconds(report.samples[199].sent - report.samples[0].sent)
                #expect(span >= .milliseconds(199) && span < .milliseconds(260), "\(span)")
                let gap = try #require(report.longestGap)
                #expect(gap.duration < .milliseconds(100), "\(report)")
                // The wall-clock anchor: replies happened just now.
                let now = Double(ClockAnchor.now().wallClock) / 1e9
                #expect(abs(gap.end.wallClock.timeInterval - now) < 10)
                // Finishing again gives the same report.
                #expect(await pinger.finish(timeout: .seconds(1)).samples == report.samples)
            }
        }

        @Test func pingerStopsOnRequestAndCountsUnansweredRequestsAsLost() async throws {
            try await NetworkNamespace.with(prefix: "tknet-stop") { ns in
                // Until stopped: every request sent before stop() is still answered.
                let pinger = try Pinger(namespace: ns, destination: "127.0.0.1", interval: .milliseconds(2))
                try pinger.start()
                try await pinger.waitForReplies(10, timeout: .seconds(5))
                pinger.stop()
                let report = await pinger.finish(timeout: .seconds(5))
                #expect(report.sent >= 10)
                #expect(report.lost == 0, "\(report)")

                // Nobody answers on the TAP's subnet: all lost, no gap, reply timeout respected.
                try await ns.createTap("tap0")
                try await ns.withRoute { route in
                    try route.addAddress("192.168.201.1/24", to: "tap0")
                    try route.setLink("tap0", up: true)
                }
                let silent = try Pinger(
                    namespace: ns, destination: "192.168.201.2", interval: .milliseconds(5), count: 10, replyTimeout: .milliseconds(200))
                try silent.start()
                let started = ContinuousClock.now
                let lost = await silent.finish(timeout: .seconds(5))
                #expect(ContinuousClock.now - started < .seconds(2))
                #expect(lost.sent == 10)
                #expect(lost.received == 0)
                #expect(lost.lostSequences == Array(0..<10))
                #expect(lost.longestGap == nil)
                #expect(lost.description.contains("10 sent, 0 received, 10 lost (100.00%)"), "\(lost)")

                // finish's timeout stops an endless run.
                let endless = try Pinger(namespace: ns, destination: "127.0.0.1", interval: .milliseconds(5))
                try endless.start()
                let partial = await endless.finish(timeout: .milliseconds(100))
                #expect(partial.sent > 0 && partial.lost == 0, "\(partial)")
                await #expect(throws: PingerError.self) { try await endless.waitForReplies(1_000_000, timeout: .seconds(1)) }
            }
        }

        @Test func pingersIgnoreEachOthersReplies() async throws {
            try await NetworkNamespace.with(prefix: "tknet-two") { ns in
                let a = try Pinger(namespace: ns, destination: "127.0.0.1", interval: .milliseconds(1), count: 100)
                let b = try Pinger(namespace: ns, destination: "127.0.0.1", interval: .milliseconds(1), count: 100)
                #expect(a.identifier != b.identifier)
                try a.start()
                try b.start()
                async let ra = a.finish(timeout: .seconds(10))
                async let rb = b.finish(timeout: .seconds(10))
                let (reportA, reportB) = await (ra, rb)
                // Each raw socket sees both pingers' replies; neither counts the other's.
                #expect(reportA.received == 100 && reportA.duplicates == 0, "\(reportA)")
                #expect(reportB.received == 100 && reportB.duplicates == 0, "\(reportB)")
            }
        }

        @Test func unprivilegedDatagramSocket() async throws {
            try await NetworkNamespace.with(prefix: "tknet-dgram") { ns in
                // Each namespace has its own ping_group_range, closed ("1 0") by default.
                #expect(throws: PingerError.self) {
                    _ = try Pinger(
                        namespace: ns, destination: "127.0.0.1", interval: .milliseconds(1), count: 1, payloadSize: 56,
                        replyTimeout: .seconds(1), datagramOnly: true)
                }
                try await ns.run {
                    try "0 2147483647\n".write(toFile: "/proc/sys/net/ipv4/ping_group_range", atomically: false, encoding: .utf8)
                }
                let pinger = try Pinger(
                    namespace: ns, destination: "127.0.0.1", interval: .milliseconds(1), count: 50, payloadSize: 8,
                    replyTimeout: .seconds(1), datagramOnly: true)
                #expect(!pinger.usesRawSocket)
                try pinger.start()
                let report = await pinger.finish(timeout: .seconds(10))
                #expect(report.received == 50 && report.lost == 0, "\(report)")
            }
        }

        @Test func twoNamespacesInParallel() async throws {
            let results = try await withThrowingTaskGroup(of: (String, UInt64, PingReport, [String]).self) { group in
                for _ in 0..<2 {
                    group.addTask {
                        try await NetworkNamespace.with(prefix: "tknet-par") { ns in
                            // The same TAP name and address in both: they cannot see each other.
                            try await ns.createTap("tap0", queues: 2)
                            let addresses = try await ns.withRoute { route in
                                try route.addAddress("192.168.200.1/24", to: "tap0")
                                try route.setLink("tap0", up: true)
                                return try route.addresses(of: "tap0")
                            }
                            let pinger = try Pinger(namespace: ns, destination: "192.168.200.1", interval: .milliseconds(1), count: 100)
                            try pinger.start()
                            return (ns.name, ns.inode, await pinger.finish(timeout: .seconds(10)), addresses)
                        }
                    }
                }
                return try await group.reduce(into: []) { $0.append($1) }
            }
            #expect(results.count == 2)
            #expect(Set(results.map(\.0)).count == 2)
            #expect(Set(results.map(\.1)).count == 2)
            for (_, _, report, addresses) in results {
                #expect(addresses == ["192.168.200.1/24"])
                #expect(report.received == 100 && report.lost == 0, "\(report)")
            }
            #expect(Self.ours("tknet-par").isEmpty)
        }

        // MARK: Processes inside

        @Test func spawnedCommandKeepsItsPidInsideTheNamespace() async throws {
            try await NetworkNamespace.with(prefix: "tknet-spawn") { ns in
                let output = try temporaryDirectory() + "/out"
                defer { try? FileManager.default.removeItem(atPath: (output as NSString).deletingLastPathComponent) }
                let fd = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
                #expect(fd >= 0)
                defer { close(fd) }
                let argv = try ns.commandPrefix() + ["/bin/sh", "-c", "echo $$; readlink /proc/self/ns/net"]
                #expect(argv.prefix(2) == ["/usr/bin/nsenter", "--net=\(ns.path)"] || argv[1] == "--net=\(ns.path)")
                let child = try ChildProcess.spawn(path: argv[0], arguments: argv, environment: [:], stdout: fd, stderr: fd)
                #expect(try await child.wait(timeout: .seconds(10)) == .exited(0))
                let lines = try String(contentsOfFile: output, encoding: .utf8).split(separator: "\n").map(String.init)
                // nsenter exec'd the shell: the pid TestKit signals is the command's own.
                #expect(lines == ["\(child.pid)", "net:[\(ns.inode)]"])
                child.close()
            }
        }

        @Test(.requiresBinary(MachineTests.qemu)) func machineRunsInsideTheNamespace() async throws {
            try await NetworkNamespace.with(prefix: "tknet-vm") { ns in
                var binary = try VMMBinary.named(MachineTests.qemu)
                binary.defaultArguments = ["-machine", "microvm", "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none"]
                try await ns.createTap("tap0", queues: 2)
                let options = MachineOptions(
                    binary: binary, memory: "64M", startPaused: true,
                    arguments: ["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no,queues=2,vhost=off"],
                    namespace: ns)
                try await Machine.with(options) { vm in
                    #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(vm.pid)/ns/net") == "net:[\(ns.inode)]")
                    #expect(try FileManager.default.destinationOfSymbolicLink(atPath: "/proc/\(vm.pid)/exe") == binary.path)
                    let cmdline = try String(contentsOfFile: vm.directory + "/cmdline.txt", encoding: .utf8)
                    #expect(cmdline.hasPrefix("/usr/bin/nsenter --net=\(ns.path) -- \(binary.path) "))
                    #expect(vm.commandLine.first == binary.path)
                    #expect(try await vm.qmp.execute("query-status", timeout: .seconds(10))["status"] == "prelaunch")
                    // QEMU opened both queues of the TAP in the namespace.
                    #expect(try await ns.withRoute { try $0.tunInfo("tap0").queues } == 2)
                }
            }
        }

        // MARK: Leaks

        @Test(.countsProcessResources) func fullCycleLeavesNoNamespaceTapFdOrThread() async throws {
            let threadsBefore = await ProcessResources.settledTestKitThreads(expecting: 0)
            let fdsBefore = ProcessResources.descriptors()
            var inode: UInt64 = 0
            try await NetworkNamespace.with(prefix: "tknet-leak") { ns in
                inode = ns.inode
                try await ns.createTap("tap0", queues: 4)
                try await ns.withRoute { route in
                    try route.setMAC("52:54:00:00:00:01", of: "tap0")
                    try route.addAddress("192.168.200.1/24", to: "tap0")
                    try route.setLink("tap0", up: true)
                }
                let pinger = try Pinger(namespace: ns, destination: "192.168.200.1", interval: .milliseconds(1), count: 50)
                try pinger.start()
                #expect(await pinger.finish(timeout: .seconds(10)).lost == 0)
            }
            #expect(Self.ours("tknet-leak").isEmpty)
            #expect(try await !Self.hostLinks().contains("tap0"))
            // Nothing of this process refers to the namespace any more, so the kernel frees
            // it and the TAP in it: no thread inside, no fd on it (sockets show as socket:[...]).
            let tasks = try FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")
            let inside = tasks.filter {
                (try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/task/\($0)/ns/net")) == "net:[\(inode)]"
            }
            #expect(inside.isEmpty)
            #expect(await ProcessResources.settledTestKitThreads(expecting: threadsBefore) == threadsBefore)
            // Other suites may open fds meanwhile; compare what is new, not just the count.
            var added: [String] = []
            for _ in 0..<20 {
                var remaining = fdsBefore
                added = ProcessResources.descriptors().filter { fd in
                    if let i = remaining.firstIndex(of: fd) {
                        remaining.remove(at: i)
                        return false
                    }
                    return true
                }
                if added.isEmpty { break }
                try await Task.sleep(for: .milliseconds(50))
            }
            #expect(added.isEmpty, "fds opened and not closed: \(added)")
        }

        @Test func traitReasonIsNilHere() {
            #expect(HostRequirement.networkNamespacesUnavailable() == nil)
        }

        // MARK: Helpers

        static func shell(_ command: String) throws -> String {
            let process = Process()
            process.executableURL = URL(fileURLWithPath: "/bin/sh")
            process.arguments = ["-c", command]
            let pipe = Pipe()
            process.standardOutput = pipe
            try process.run()
            let data = pipe.fileHandleForReading.readDataToEndOfFile()
            process.waitUntilExit()
            return String(decoding: data, as: UTF8.self)
        }
    }
}
