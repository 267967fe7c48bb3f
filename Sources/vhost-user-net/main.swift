import Glibc
import VMMCore

/// `vhost-user-net --socket PATH (--tap NAME [--queues N] | --tap-fd N [--tap-fd M ...])`:
/// a vhost-user-net backend on a (multi-queue) TAP. Listens on PATH and serves one
/// front-end at a time; the TAP and the frames waiting in it outlive each front-end.

let usage = "usage: vhost-user-net --socket PATH (--tap NAME [--queues N] | --tap-fd N [--tap-fd M ...])"

func say(_ message: String) {
    let line = Array("vhost-user-net: \(message)\n".utf8)
    _ = line.withUnsafeBytes { write(STDERR_FILENO, $0.baseAddress, $0.count) }
}

func failAndExit(_ message: String) -> Never {
    say(message)
    exit(1)
}

var socketPath: String?
var tapName: String?
var queues: Int?
var tapFDs: [Int32] = []
var arguments = Array(CommandLine.arguments.dropFirst())[...]
while let option = arguments.popFirst() {
    if option == "--help" || option == "-h" {
        print(usage)
        exit(0)
    }
    guard let value = arguments.popFirst() else { failAndExit("\(option) needs a value\n\(usage)") }
    switch option {
    case "--socket": socketPath = value
    case "--tap": tapName = value
    case "--queues":
        guard let n = Int(value), (1...256).contains(n) else { failAndExit("--queues \(value) must be 1..256") }
        queues = n
    case "--tap-fd":
        guard let fd = Int32(value), fd >= 0 else { failAndExit("--tap-fd \(value) is not an fd number") }
        tapFDs.append(fd)
    default:
        failAndExit("unknown option '\(option)'\n\(usage)")
    }
}
guard let socketPath else { failAndExit("--socket is required\n\(usage)") }
guard (tapName == nil) != tapFDs.isEmpty else { failAndExit("give either --tap or --tap-fd\n\(usage)") }
if !tapFDs.isEmpty, let queues, queues != tapFDs.count {
    failAndExit("--queues \(queues) but \(tapFDs.count) --tap-fd")
}

let tap: TapBackend
do {
    if let tapName {
        tap = try TapBackend(id: "vhost-user-net", ifname: tapName, queues: queues ?? 1, vnetHeader: nil)
    } else {
        let fds = try tapFDs.map { try FileDescriptor.duplicating(inherited: $0, label: "--tap-fd \($0)") }
        for fd in tapFDs { close(fd) }
        tap = try TapBackend(id: "vhost-user-net", adopting: fds, vnetHeader: nil)
    }
} catch {
    failAndExit("\(error)")
}

let backend: VhostUserNetBackend
let listener: FileDescriptor
do {
    backend = try VhostUserNetBackend(queuePairs: tap.queueCount, tapFDs: tap.queueFDs, tapVnetHeader: tap.vnetHeader,
                                      log: { say($0) })
    try backend.start()
    listener = FileDescriptor(adopting: try UnixSocket.listen(path: socketPath), label: "listening socket \(socketPath)")
} catch {
    failAndExit("\(error)")
}
say("listening on \(socketPath) (TAP \(tap.ifname), \(tap.queueCount) queue pair\(tap.queueCount == 1 ? "" : "s"))")

// This (main) thread accepts; each front-end is served on a thread of its own, one at a
// time: the rings have one owner. A front-end that connects while another is served
// waits up to `handoverGrace` for it to leave (a VMM that quits and one that starts at
// once), then is refused: closed unanswered, so its first request sees the end at once
// (our front-end reports it, and retries with reconnect=). The datapath runs on the
// backend's own thread throughout.
let handoverGrace: Int = 500
let serving = ConditionLock(false)
var frontEnd: OSThread?
var frontEnds = 0
while true {
    guard let fd = listener.withRaw({ UnixSocket.accept($0) }) else { failAndExit("accept on \(socketPath): \(String(cString: strerror(errno)))") }
    let connection = VhostUserConnection(socket: FileDescriptor(adopting: fd, label: "front-end connection"))
    let claimed = serving.wait(until: { !$0 }, timeoutMilliseconds: handoverGrace) { busy -> Bool in
        busy = true
        return true
    }
    guard claimed == true else {
        say("refusing a front-end: another one owns the rings (one front-end at a time); it may connect again once that one is gone")
        connection.socket.close()
        continue
    }
    frontEnd?.join()
    frontEnds += 1
    let number = frontEnds
    say("front-end connected (#\(number))")
    do {
        frontEnd = try OSThread(name: "vu-net frontend") {
            backend.serve(connection)
            let stats = backend.statistics
            say("front-end gone (#\(number); frames so far: \(stats.rx) to the guest, \(stats.tx) from it); waiting for the next")
            serving.update { $0 = false }
        }
    } catch {
        say("cannot serve the front-end: \(error)")
        connection.socket.close()
        serving.update { $0 = false }
    }
}
