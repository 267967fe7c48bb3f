import Foundation
import QMPWire
import TestKit
import Testing

/// A raw unix-socket peer that reads only when told to: the "slow or hostile" client of
/// issue 8 §6, which QMPClient and Console (always reading) cannot play.
final class RawPeer {
    private(set) var fd: Int32

    init(path: String) throws {
        fd = try UnixSocket.connect(path: path)
        let flags = fcntl(fd, F_GETFL)
        _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
    }

    func close() {
        if fd >= 0 { Glibc.close(fd) }
        fd = -1
    }

    deinit { close() }

    /// Sends everything, waiting for room; fails after `timeout`.
    func send(_ text: String, timeout: Duration = .seconds(10)) throws {
        let bytes = Array(text.utf8)
        var offset = 0
        let deadline = ContinuousClock.now + timeout
        while offset < bytes.count {
            let n = bytes[offset...].withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n > 0 {
                offset += n
                continue
            }
            guard n < 0, errno == EAGAIN || errno == EINTR else { throw FixtureError("send: errno \(errno)") }
            guard ContinuousClock.now < deadline else { throw FixtureError("send: no room for \(bytes.count - offset) bytes within \(timeout)") }
            var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
            _ = poll(&p, 1, 50)
        }
    }

    /// Reads until `done` says the text so far is enough, the peer closes (returns what
    /// came, and `closed` true), or the deadline passes (throws).
    func read(until done: (String) -> Bool, timeout: Duration) throws -> (text: String, closed: Bool) {
        var received: [UInt8] = []
        let deadline = ContinuousClock.now + timeout
        var chunk = [UInt8](repeating: 0, count: 65536)
        while true {
            let n = chunk.withUnsafeMutableBytes { Glibc.recv(fd, $0.baseAddress, $0.count, 0) }
            if n > 0 {
                received += chunk[0..<n]
                if done(String(decoding: received, as: UTF8.self)) { return (String(decoding: received, as: UTF8.self), false) }
                continue
            }
            if n == 0 || (n < 0 && errno == ECONNRESET) { return (String(decoding: received, as: UTF8.self), true) }
            guard errno == EAGAIN || errno == EINTR else { throw FixtureError("recv: errno \(errno)") }
            guard ContinuousClock.now < deadline else {
                throw FixtureError("read: not done within \(timeout); got \(received.count) bytes, ending \(String(decoding: received.suffix(200), as: UTF8.self).debugDescription)")
            }
            var p = pollfd(fd: fd, events: Int16(POLLIN), revents: 0)
            _ = poll(&p, 1, 50)
        }
    }
}

func count(_ needle: String, in text: String) -> Int { text.components(separatedBy: needle).count - 1 }

func waitForFile(_ path: String, timeout: Duration = .seconds(20)) async throws {
    let deadline = ContinuousClock.now + timeout
    while !FileManager.default.fileExists(atPath: path) {
        guard ContinuousClock.now < deadline else { throw FixtureError("\(path) did not appear within \(timeout)") }
        try await Task.sleep(for: .milliseconds(20))
    }
}

func stderrText(_ vm: TestKit.Machine) -> String {
    (try? String(contentsOfFile: (vm.directory as NSString).appendingPathComponent("stderr.log"), encoding: .utf8)) ?? ""
}

/// Issue 8 §6: no write to a client or console blocks the event loop or the vCPU, and
/// every wait watches for termination signals.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct SlowPeerFunctionalTests {
    @Test func aQMPClientThatNeverReadsStallsNobodyElse() async throws {
        let dir = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/qmp.sock"
        try await Machine.with(MachineOptions.bundledGuest(arguments: ["-qmp", "unix:\(path),server=on,wait=off"])) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            let hog = try RawPeer(path: path)
            // ~1 MB of replies, far more than the socket holds, and never read (yet).
            let commands = 1000
            try hog.send(#"{"execute": "qmp_capabilities"}"# + String(repeating: #"{"execute": "query-commands"}"#, count: commands))
            try await Task.sleep(for: .milliseconds(300))
            #expect(try await vm.qmp.execute("query-status", timeout: .seconds(5))["status"] == "running")
            try await vm.console.run("echo still-here", expect: "still-here", timeout: .seconds(20))
            // Nothing was lost: once it reads, the hog gets every reply.
            let (text, closed) = try hog.read(until: { count("\"return\"", in: $0) >= commands + 1 }, timeout: .seconds(60))
            #expect(!closed)
            #expect(count("\"return\"", in: text) == commands + 1)
            #expect(vm.kill(SIGTERM))
            #expect(try await vm.wait(timeout: .seconds(10)) == .exited(0))
        }
    }

    @Test func eventsToAClientThatNeverReadsStallNobodyElse() async throws {
        let dir = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/qmp.sock"
        try await Machine.with(MachineOptions.bundledGuest(arguments: ["-qmp", "unix:\(path),server=on,wait=off"])) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            let silent = try RawPeer(path: path)
            try silent.send(#"{"execute": "qmp_capabilities"}"#)
            _ = try silent.read(until: { $0.contains("\"return\"") }, timeout: .seconds(5))
            let pairs = 2000
            for _ in 0..<pairs {
                try await vm.qmp.execute("stop", timeout: .seconds(5))
                try await vm.qmp.execute("cont", timeout: .seconds(5))
            }
            try vm.qmp.clearEvents()
            #expect(try await vm.qmp.execute("query-status", timeout: .seconds(5))["status"] == "running")
            // 2000 pairs are ~300 KB of events: within the documented 4 MiB per client.
            let (text, closed) = try silent.read(until: { count("\"RESUME\"", in: $0) >= pairs }, timeout: .seconds(30))
            #expect(!closed)
            #expect(count("\"STOP\"", in: text) == pairs)
            #expect(count("\"RESUME\"", in: text) == pairs)
        }
    }

    @Test func aConsoleClientThatNeverReadsDoesNotBlockTheVCPU() async throws {
        let dir = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/console.sock"
        var options = MachineOptions.bundledGuest(arguments: ["-serial", "unix:\(path),server=on,wait=off"])
        options.connectConsole = false
        try await Machine.with(options) { vm in
            try await waitForFile(path)
            let silent = try RawPeer(path: path)
            // `help` prints ~800 bytes; 200 of them are far more than the socket holds.
            try silent.send(String(repeating: "help\r", count: 200))
            try await Task.sleep(for: .seconds(3))
            try await vm.qmp.execute("stop", timeout: .seconds(5))
            #expect(try await vm.qmp.execute("query-status", timeout: .seconds(5))["status"] == "paused")
            try await vm.qmp.execute("cont", timeout: .seconds(5))
            // The console still works for a client that reads.
            silent.close()
            let reader = try RawPeer(path: path)
            try await Task.sleep(for: .milliseconds(500))
            try reader.send("echo console-back\r")
            let (text, _) = try reader.read(until: { $0.contains("console-back\r\n") }, timeout: .seconds(60))
            #expect(text.contains("console-back\r\n"))
            #expect(vm.kill(SIGTERM))
            #expect(try await vm.wait(timeout: .seconds(10)) == .exited(0))
            let log = stderrText(vm)
            #expect(log.contains("serial: dropped"), "stderr: \(log)")
        }
    }

    @Test(arguments: ["-qmp", "-serial"])
    func sigtermWhileWaitingForTheFirstClientExitsCleanly(option: String) async throws {
        let dir = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/wait.sock"
        var options = MachineOptions.bundledGuest(arguments: [option, "unix:\(path),server=on,wait=on"], connectQMP: false)
        options.connectConsole = false
        try await Machine.with(options) { vm in
            try await waitForFile(path)
            #expect(vm.kill(SIGTERM))
            #expect(try await vm.wait(timeout: .seconds(10)) == .exited(0))
            #expect(!FileManager.default.fileExists(atPath: path))
        }
    }

    @Test func aDuplicateKeyIsAParseErrorAndRunsNothing() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            try vm.qmp.sendRaw(#"{"execute": "query-status", "execute": "stop"}"# + "\n")
            let reply = try await vm.qmp.readRawReply(timeout: .seconds(5))
            #expect(reply["error"]?["class"] == "GenericError")
            #expect(reply["error"]?["desc"] == "JSON parse error, duplicate key 'execute'")
            #expect(try await vm.qmp.execute("query-status")["status"] == "running")
        }
    }

    @Test func aMegabyteObjectWithManyKeysIsAnswered() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            var text = #"{"execute": "query-status", "arguments": {"#
            var n = 0
            while text.utf8.count < (1 << 20) - 64 {
                if n > 0 { text += "," }
                text += "\"\(String(n, radix: 36))\":0"
                n += 1
            }
            text += "}}\n"
            #expect(n > 100_000)
            try vm.qmp.sendRaw(text)
            let reply = try await vm.qmp.readRawReply(timeout: .seconds(20))
            #expect(reply["error"]?["desc"] == "Parameter '0' is unexpected")
            let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000) + "\n"
            try vm.qmp.sendRaw(deep)
            let nested = try await vm.qmp.readRawReply(timeout: .seconds(20))
            #expect(nested["error"]?["desc"]?.stringValue?.hasPrefix("JSON nesting depth limit exceeded") == true, "\(nested.serialized)")
            #expect(try await vm.qmp.execute("query-status")["status"] == "running")
        }
    }
}

/// CPU time (user + system) the process has used, in clock ticks, from /proc/PID/stat.
func cpuTicks(of pid: pid_t) throws -> Int {
    let stat = try String(contentsOfFile: "/proc/\(pid)/stat", encoding: .utf8)
    // Fields after the parenthesized command name; utime and stime are fields 14 and 15.
    guard let close = stat.lastIndex(of: ")") else { throw FixtureError("odd /proc/\(pid)/stat: \(stat)") }
    let fields = stat[stat.index(after: close)...].split(separator: " ")
    guard fields.count > 13, let user = Int(fields[11]), let system = Int(fields[12]) else { throw FixtureError("odd /proc/\(pid)/stat: \(stat)") }
    return user + system
}

/// Issue 8 §7: start-up errors, running out of fds, and QMP argument checks as QEMU does them.
@Suite(.keepsArtifactsOnFailure, .timeLimit(.minutes(5)), .requiresKVM, .requiresGuestImage, .requiresVMM, .usesProcessResources)
struct StartupAndLimitsFunctionalTests {
    @Test(arguments: [
        (["-qmp", "unix:/nonexistent-dir/q.sock,server=on,wait=off"], "vmm: -qmp unix:/nonexistent-dir/q.sock: bind /nonexistent-dir/q.sock: No such file or directory"),
        (["-serial", "unix:/nonexistent-dir/s.sock,server=on,wait=off"], "vmm: -serial unix:/nonexistent-dir/s.sock: bind /nonexistent-dir/s.sock: No such file or directory"),
        (["-incoming", "unix:/nonexistent-dir/m.sock"], "vmm: -incoming unix:/nonexistent-dir/m.sock: bind /nonexistent-dir/m.sock: No such file or directory"),
        (["-incoming", "tcp:256.1.1.1:4444"], "vmm: -incoming tcp:256.1.1.1:4444: address resolution failed for 256.1.1.1:4444: "),
        (["-incoming", "tcp:no-such-host.invalid:4444"], "vmm: -incoming tcp:no-such-host.invalid:4444: address resolution failed for no-such-host.invalid:4444: "),
    ])
    func startUpErrorsAreOneLineAndStatusOne(arguments: [String], prefix: String) async throws {
        let vmm = try VMMBinary.resolve()
        let result = try await runProcess(vmm.path, ["-kernel", BundledGuest.image, "-m", "64M", "-nodefaults"] + arguments)
        #expect(result.status == 1)
        #expect(result.stderr.split(separator: "\n").count == 1, "\(result.stderr)")
        #expect(result.stderr.hasPrefix(prefix), "\(result.stderr)")
        // The resolver's own message, not a stale errno ("Inappropriate ioctl for device").
        #expect(!result.stderr.contains("ioctl"), "\(result.stderr)")
    }

    @Test func runningOutOfFDsBacksOffAndRecovers() async throws {
        let dir = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/qmp.sock"
        let vmm = try VMMBinary.resolve()
        let prlimit = try #require(VMMBinary.findExecutable("prlimit"), "prlimit (util-linux) sets the child's fd limit")
        var options = MachineOptions.bundledGuest(arguments: ["-qmp", "unix:\(path),server=on,wait=off"])
        options.binary = VMMBinary(path: prlimit, defaultArguments: ["--nofile=40:40", vmm.path] + vmm.defaultArguments)
        try await Machine.with(options) { vm in
            try await vm.console.waitForPrompt(timeout: .seconds(20))
            var clients: [RawPeer] = []
            defer { clients.forEach { $0.close() } }
            // Connect until one gets no greeting: the VMM is out of fds.
            var starved: RawPeer?
            for _ in 0..<60 {
                let client = try RawPeer(path: path)
                clients.append(client)
                if (try? client.read(until: { $0.contains("\r\n") }, timeout: .seconds(3))) == nil {
                    starved = client
                    break
                }
            }
            let waiting = try #require(starved, "60 clients were all served under nofile=40")
            // A VMM spinning on accept burns all the CPU it gets (measured: 15-25% of a core on a
            // loaded 2-core host, 100% on an idle one); an idle one backing off uses ~0.
            let before = try cpuTicks(of: vm.pid)
            try await Task.sleep(for: .seconds(1))
            let used = try cpuTicks(of: vm.pid) - before
            let ticksPerSecond = sysconf(Int32(_SC_CLK_TCK))
            #expect(used < ticksPerSecond / 20, "the VMM used \(used) of \(ticksPerSecond) ticks in 1 s while out of fds")
            #expect(try await vm.qmp.execute("query-status", timeout: .seconds(5))["status"] == "running")
            // Freeing fds lets the waiting client in.
            for client in clients.prefix(5) { client.close() }
            let (greeting, closed) = try waiting.read(until: { $0.contains("\r\n") }, timeout: .seconds(10))
            #expect(!closed)
            #expect(greeting.contains("\"QMP\""))
            let fresh = try RawPeer(path: path)
            defer { fresh.close() }
            #expect(try fresh.read(until: { $0.contains("\r\n") }, timeout: .seconds(10)).text.contains("\"QMP\""))
            #expect(stderrText(vm).contains("Too many open files"))
        }
    }

    /// The same for a migration target's listener: a source that connects while the
    /// target is out of fds waits (no spinning accept) and is taken once fds free up.
    @Test func migrationListenerOutOfFDsBacksOffAndRecovers() async throws {
        let dir = try ArtifactDirectory.makeShortSocketDirectory()
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/qmp.sock"
        let migrationPath = dir + "/mig.sock"
        let vmm = try VMMBinary.resolve()
        let prlimit = try #require(VMMBinary.findExecutable("prlimit"), "prlimit (util-linux) sets the child's fd limit")
        var options = MachineOptions.bundledGuest(arguments: ["-qmp", "unix:\(path),server=on,wait=off", "-incoming", "defer"])
        options.binary = VMMBinary(path: prlimit, defaultArguments: ["--nofile=40:40", vmm.path] + vmm.defaultArguments)
        try await Machine.with(options) { vm in
            try await vm.qmp.execute("migrate-incoming", arguments: ["uri": .string("unix:\(migrationPath)"), "exit-on-error": false])
            var clients: [RawPeer] = []
            defer { clients.forEach { $0.close() } }
            // Use up the VMM's fds with QMP clients until one gets no greeting.
            for _ in 0..<60 {
                let client = try RawPeer(path: path)
                clients.append(client)
                if (try? client.read(until: { $0.contains("\r\n") }, timeout: .seconds(3))) == nil { break }
            }
            // The source connects now; the target cannot accept it yet.
            let source = try RawPeer(path: migrationPath)
            defer { source.close() }
            let before = try cpuTicks(of: vm.pid)
            try await Task.sleep(for: .seconds(1))
            let used = try cpuTicks(of: vm.pid) - before
            let ticksPerSecond = sysconf(Int32(_SC_CLK_TCK))
            #expect(used < ticksPerSecond / 20, "the VMM used \(used) of \(ticksPerSecond) ticks in 1 s while out of fds")
            #expect(stderrText(vm).contains("main migration listener: cannot accept a client"), "\(stderrText(vm))")
            // Freeing fds lets the source's connection in: the migration starts.
            for client in clients.prefix(5) { client.close() }
            var status = "none"
            for _ in 0..<100 where status == "none" {
                try await Task.sleep(for: .milliseconds(50))
                status = try await vm.qmp.execute("query-migrate")["status"]?.stringValue ?? "none"
            }
            #expect(status != "none", "the migration never started")
        }
    }

    @Test func getfdRefusesNamesStartingWithADigit() async throws {
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            var pair: [Int32] = [-1, -1]
            #expect(pipe(&pair) == 0)
            defer { pair.forEach { Glibc.close($0) } }
            for name in ["1abc", "9"] {
                do {
                    try await vm.qmp.execute("getfd", arguments: ["fdname": .string(name)], passing: [pair[0]])
                    Issue.record("getfd accepted the name '\(name)'")
                } catch QMPError.commandFailed(_, let desc, _) {
                    #expect(desc == "Parameter 'fdname' expects a name not starting with a digit", "\(name)")
                }
            }
            try await vm.qmp.execute("getfd", arguments: ["fdname": "a1"], passing: [pair[0]])
            try await vm.qmp.execute("closefd", arguments: ["fdname": "a1"])
        }
    }

    @Test func netdevAddChecksArgumentTypesAsQEMUDoes() async throws {
        let cases: [(JSONObject, String)] = [
            (["id": 1], "Invalid parameter type for 'id', expected: string"),
            (["id": "n1", "ifname": true], "Invalid parameter type for 'ifname', expected: string"),
            (["id": "n1", "queues": "2"], "Parameter 'queues' expects uint64"),
            (["id": "n1", "queues": true], "Parameter 'queues' expects uint64"),
            (["id": "n1", "queues": -1], "Parameter 'queues' expects uint32_t"),
            (["id": "n1", "vnet_hdr": 1], "Invalid parameter type for 'vnet_hdr', expected: boolean"),
            (["id": "n1", "vnet_hdr": "on"], "Invalid parameter type for 'vnet_hdr', expected: boolean"),
            (["id": "n1", "fd": 3], "Invalid parameter type for 'fd', expected: string"),
        ]
        try await Machine.with(MachineOptions.bundledGuest()) { vm in
            for (arguments, desc) in cases {
                var args = arguments
                args["type"] = "tap"
                let reply = try await vm.qmp.request("netdev_add", arguments: args)
                #expect(reply["error"]?["desc"]?.stringValue == desc, "\(args.pairs): \(reply.serialized)")
            }
        }
    }
}
