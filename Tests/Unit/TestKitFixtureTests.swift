import Foundation
import Glibc
@testable import TestKit
import Testing

@Suite struct GuestShellParsingTests {
    @Test func statsParsesEveryQueueAndTheTotals() throws {
        let output = """
            stats\r
            rx0: 12 packets tx0: 3 packets\r
            rx1: 7 packets tx1: 0 packets\r
            total: rx 19 packets tx 3 packets, 1 bad, 2 send drops
            """
        let stats = try #require(GuestStats(parsing: output))
        #expect(stats.queues == [.init(received: 12, sent: 3), .init(received: 7, sent: 0)])
        #expect(stats.received == 19 && stats.sent == 3)
        #expect(stats.bad == 1 && stats.sendDrops == 2)
    }

    @Test func statsWithoutTheTotalLineIsRefused() {
        #expect(GuestStats(parsing: "rx0: 1 packets tx0: 1 packets\n") == nil)
        #expect(GuestStats(parsing: "ip: can't find device 'eth0'\n") == nil)
    }

    @Test func numbersAroundMarkers() {
        let ping = "3 packets transmitted, 2 packets received"
        #expect(GuestShell.numberBefore(" packets transmitted", in: ping) == 3)
        #expect(GuestShell.numberBefore(" packets received", in: ping) == 2)
        #expect(GuestShell.numberAfter("round ", in: "scribble ok, round 41\r\n") == 41)
        #expect(GuestShell.firstNumber(in: "ticks\r\n1234\r\n# ") == 1234)
        #expect(GuestShell.numberBefore(" bad", in: "no digits bad") == nil)
    }
}

@Suite struct StrictRequirementsTests {
    @Test func keysComeFromTheEnvironment() {
        let environment = [StrictRequirements.environmentKey: "kvm, netns,,tap"]
        #expect(StrictRequirements.keys(environment: environment) == ["kvm", "netns", "tap"])
        #expect(StrictRequirements.isStrict("kvm", environment: environment))
        #expect(!StrictRequirements.isStrict("vhost-net", environment: environment))
        #expect(StrictRequirements.isStrict("vhost-net", environment: [StrictRequirements.environmentKey: "all"]))
        #expect(StrictRequirements.keys(environment: [:]).isEmpty)
    }

    @Test func errorNamesTheVariableTheKeyAndTheReason() {
        let error = RequirementNotMet(key: "kvm", reason: "/dev/kvm: No such file or directory")
        #expect("\(error)" == "TESTKIT_REQUIRE lists 'kvm', but: /dev/kvm: No such file or directory")
    }
}

@Suite(.countsProcessResources) struct InheritedFDTests {
    /// Passed fds arrive as 3, 4, ... in order, even when a source number is one of the
    /// targets; nothing else above 2 is inherited; the caller's fds stay open.
    @Test func childSeesPassedFDsInOrderAndNothingElse() async throws {
        var pipes: [[Int32]] = []
        for _ in 0..<3 {
            var p: [Int32] = [-1, -1]
            #expect(pipe(&p) == 0)
            pipes.append(p)
        }
        defer { pipes.joined().forEach { close($0) } }
        let passing = [pipes[2][1], pipes[0][1]]
        let directory = try temporaryDirectory()
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let output = directory + "/out"
        let fd = open(output, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        defer { close(fd) }
        let script = "for f in /proc/self/fd/*; do echo \"${f##*/} $(readlink $f)\"; done"
        let child = try ChildProcess.spawn(path: "/bin/sh", arguments: ["sh", "-c", script], environment: [:],
                                           stdout: fd, stderr: fd, passing: passing)
        defer { child.close() }
        #expect(try await child.wait(timeout: .seconds(10)) == .exited(0))
        let lines = try String(contentsOfFile: output, encoding: .utf8).split(separator: "\n")
        let byNumber = Dictionary(lines.compactMap { line -> (Int, String)? in
            let parts = line.split(separator: " ", maxSplits: 1)
            guard parts.count == 2, let n = Int(parts[0]) else { return nil }
            return (n, String(parts[1]))
        }, uniquingKeysWith: { a, _ in a })
        func pipeName(_ fd: Int32) -> String? { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)") }
        #expect(byNumber[3] == pipeName(pipes[2][1]), "\(byNumber)")
        #expect(byNumber[4] == pipeName(pipes[0][1]), "\(byNumber)")
        // 0-2, the two passed fds, and the directory fd the shell's glob reads.
        #expect(byNumber.keys.filter { $0 > 4 }.count <= 1, "\(byNumber)")
        #expect(passing.allSatisfy { fcntl($0, F_GETFD) >= 0 })
    }
}

@Suite struct DatapathArgumentTests {
    @Test func eachDatapathSpellsItsNetdevAsQEMUDoes() {
        var network = GuestNetwork(queues: 2)
        #expect(network.arguments()[0...1] == ["-netdev", "tap,id=n0,ifname=tap0,queues=2,script=no,downscript=no"])
        network.datapath = .vhostKernel
        #expect(network.arguments()[1] == "tap,id=n0,ifname=tap0,queues=2,script=no,downscript=no,vhost=on")
        #expect(network.incomingArguments[1] == "tap,id=n0,incoming-fds=on,queues=2,script=no,downscript=no,vhost=on")
        network.datapath = .vhostUser
        #expect(Array(network.arguments(vhostUserSocket: "/run/b.sock")[0...3]) == [
            "-chardev", "socket,id=chr-n0,path=/run/b.sock", "-netdev", "vhost-user,id=n0,chardev=chr-n0,queues=2"])
        #expect(network.incomingArguments[1] == "vhost-user,id=n0,queues=2,incoming-fds=on")
        #expect(network.arguments().last == network.deviceArguments.last)
    }

    @Test func onlyKernelVhostDependsOnTheHost() {
        #expect(Datapath.userspace.unavailableReason == nil)
        #expect(Datapath.vhostUser.unavailableReason == nil)
        #expect(Datapath.vhostKernel.unavailableReason == HostRequirement.vhostNetUnavailable())
    }
}
