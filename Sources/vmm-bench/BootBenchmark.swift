import ArgumentParser
import Foundation
import Glibc
import TestKit

/// Time from spawning the VMM process to the guest's prompt on its serial console
/// (`-serial stdio` into a pipe, the same for both VMMs), over many runs.
struct BootBenchmark: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "boot", abstract: "Process start to guest prompt, bundled vmm vs QEMU microvm.")

    @Option(help: "Runs per VMM (at least 20 for the recorded numbers).")
    var runs = 20

    @Option(help: "Guest RAM, passed as -m.")
    var memory = "128M"

    @Option(help: "Guest image (default: the bundled guest).")
    var kernel: String?

    @Option(help: "QEMU binary to compare with; 'none' skips it.")
    var qemu = "qemu-system-x86_64"

    @Option(help: "Seconds to wait for the prompt before a run counts as failed.")
    var timeout = 10.0

    func run() async throws {
        let image = kernel ?? BundledGuest.image
        let vmm = try VMMBinary.bundled()
        var contenders: [(name: String, command: [String])] = [
            ("vmm", [vmm.path, "-nodefaults", "-m", memory, "-kernel", image, "-serial", "stdio"])
        ]
        if qemu != "none" {
            if let path = VMMBinary.findExecutable(qemu) {
                contenders.append(("qemu microvm", [path, "-machine", "microvm", "-accel", "kvm", "-nodefaults", "-no-user-config",
                                                    "-display", "none", "-m", memory, "-kernel", image, "-serial", "stdio"]))
            } else {
                print("note: \(qemu) not found, measuring the bundled vmm only")
            }
        }
        print("boot: process start -> \"# \" on the serial console, \(runs) runs each, -m \(memory), \(image)")
        var medians: [String: Double] = [:]
        print(pad("", 14) + pad("min ms", 10) + pad("median ms", 11) + "max ms")
        // Interleave the contenders so that drift on the machine affects both alike.
        var samples: [String: [Double]] = [:]
        for _ in 0..<runs {
            for contender in contenders {
                samples[contender.name, default: []].append(try measureBoot(contender.command, timeout: timeout))
            }
        }
        for contender in contenders {
            guard let s = Summary(samples[contender.name] ?? []) else { continue }
            medians[contender.name] = s.median
            print(pad(contender.name, 14) + pad(format(s.min), 10) + pad(format(s.median), 11) + format(s.max))
        }
        if let ours = medians["vmm"], let theirs = medians["qemu microvm"] {
            print("ratio vmm/qemu (median): \(format(ours / theirs, decimals: 3))")
        }
    }
}

struct BenchmarkError: Error, CustomStringConvertible {
    let description: String
}

/// Spawns `command` with stdout on a pipe and returns milliseconds until "# " appears.
/// The process is killed and reaped afterwards; that part is not timed.
func measureBoot(_ command: [String], timeout: Double) throws -> Double {
    var pipeFDs: [Int32] = [0, 0]
    guard pipe(&pipeFDs) == 0 else { throw BenchmarkError(description: "pipe: \(errno)") }
    // Close-on-exec on both ends; dup2 onto stdout clears it for the child's copy.
    for fd in pipeFDs { _ = fcntl(fd, F_SETFD, FD_CLOEXEC) }
    defer { close(pipeFDs[0]) }
    var actions = posix_spawn_file_actions_t()
    posix_spawn_file_actions_init(&actions)
    defer { posix_spawn_file_actions_destroy(&actions) }
    posix_spawn_file_actions_addopen(&actions, 0, "/dev/null", O_RDONLY, 0)
    posix_spawn_file_actions_adddup2(&actions, pipeFDs[1], 1)
    posix_spawn_file_actions_addopen(&actions, 2, "/dev/null", O_WRONLY, 0)
    let argv = command.map { strdup($0) } + [nil]
    defer { argv.forEach { free($0) } }
    var pid: pid_t = 0
    let start = ContinuousClock.now
    let rc = posix_spawn(&pid, command[0], &actions, nil, argv, environ)
    close(pipeFDs[1])
    guard rc == 0 else { throw BenchmarkError(description: "posix_spawn \(command[0]): \(rc)") }
    defer {
        kill(pid, SIGKILL)
        var status: Int32 = 0
        waitpid(pid, &status, 0)
    }
    var seen: [UInt8] = []
    var buffer = [UInt8](repeating: 0, count: 4096)
    let prompt = Array("# ".utf8)
    while true {
        let elapsed = ContinuousClock.now - start
        let left = timeout - Double(elapsed.components.seconds) - Double(elapsed.components.attoseconds) / 1e18
        guard left > 0 else { throw BenchmarkError(description: "\(command[0]): no prompt within \(timeout) s; output: \(String(decoding: seen, as: UTF8.self))") }
        var pfd = pollfd(fd: pipeFDs[0], events: Int16(POLLIN), revents: 0)
        guard poll(&pfd, 1, Int32(left * 1000) + 1) > 0 else { continue }
        let n = read(pipeFDs[0], &buffer, buffer.count)
        if n <= 0 { throw BenchmarkError(description: "\(command[0]) exited before the prompt; output: \(String(decoding: seen, as: UTF8.self))") }
        seen += buffer[0..<n]
        if seen.count >= prompt.count, (0...(seen.count - prompt.count)).contains(where: { Array(seen[$0..<$0 + prompt.count]) == prompt }) {
            let elapsed = ContinuousClock.now - start
            return Double(elapsed.components.seconds) * 1000 + Double(elapsed.components.attoseconds) / 1e15
        }
    }
}
