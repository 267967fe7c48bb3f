import Foundation
import QMPWire
import Synchronization
@testable import TestKit

/// The peer end of a socketpair, standing in for a VMM: everything it receives goes to
/// `onLine`/`onBytes`, which run on its reader thread.
final class FakePeer: Sendable {
    /// Lets the reader's callback reach the peer; holds it until `close`.
    private final class Box: Sendable { let peer = Mutex<FakePeer?>(nil) }
    private let box = Box()
    private let stream: SocketStream

    init(fd: Int32, onBytes: @escaping @Sendable (FakePeer, [UInt8]) -> Void) throws {
        let box = self.box
        stream = try SocketStream(
            takingOwnershipOf: fd, threadName: "fake-peer",
            onData: { bytes in box.peer.withLock { $0 }.map { onBytes($0, bytes) } }, onEnd: { _ in })
        box.peer.withLock { $0 = self }
    }

    convenience init(fd: Int32, onLine: @escaping @Sendable (FakePeer, String) -> Void) throws {
        let splitter = Mutex(LineSplitter())
        try self.init(fd: fd, onBytes: { peer, bytes in
            for line in splitter.withLock({ $0.append(bytes) }) { onLine(peer, line) }
        })
    }

    func write(_ text: String) { try? stream.write(Array(text.utf8)) }
    func send(_ json: JSON) { write(json.serialized + "\r\n") }

    func close() {
        stream.close()
        box.peer.withLock { $0 = nil }
    }
}

/// A QMP server with a few canned commands.
enum FakeQMP {
    static let greeting = QMPMessage.greeting(major: 7, minor: 2, micro: 0, package: "fake")

    /// Returns the client end (for QMPClient) and the server. `extra` may answer a
    /// command itself (return true) before the defaults do.
    /// The commands the server received, in order.
    final class Received: Sendable {
        private let messages = Mutex<[JSON]>([])
        func append(_ message: JSON) { messages.withLock { $0.append(message) } }
        var first: JSON? { messages.withLock { $0.first } }
        var last: JSON? { messages.withLock { $0.last } }
    }

    static func start(
        extra: @escaping @Sendable (FakePeer, String, JSON?) -> Bool = { _, _, _ in false }
    ) throws -> (client: Int32, server: FakePeer, received: Received) {
        let (client, serverFD) = try UnixSocket.pair()
        let log = Received()
        let server = try FakePeer(fd: serverFD, onLine: { peer, line in
            guard let message = try? JSON.parse(line) else {
                peer.send(QMPMessage.error(.genericError, "JSON parse error", id: nil))
                return
            }
            guard let command = message["execute"]?.stringValue else {
                peer.send(QMPMessage.error(.genericError, "QMP input must be a JSON object", id: nil))
                return
            }
            log.append(message)
            let id = message["id"]
            if extra(peer, command, id) { return }
            switch command {
            case "qmp_capabilities": peer.send(QMPMessage.reply([:], id: id))
            case "query-status": peer.send(QMPMessage.reply(["status": "running", "running": true], id: id))
            case "silent": break
            case "hangup": peer.close()
            default: peer.send(QMPMessage.error(.commandNotFound, "The command \(command) has not been found", id: id))
            }
        })
        server.send(greeting)
        return (client, server, log)
    }

    static func event(_ name: String, _ data: JSON? = nil) -> JSON {
        QMPMessage.event(name, data: data, timestamp: QMPTimestamp(seconds: 1_700_000_000, microseconds: 42))
    }
}

/// A guest shell on the other end of a console: echoes what is typed, and on Enter runs
/// `echo WORDS` (prints WORDS after `outputDelay`, then the prompt) or `fail`.
enum FakeGuest {
    static func start(outputDelay: Duration = .milliseconds(50)) throws -> (client: Int32, guest: FakePeer) {
        let (client, guestFD) = try UnixSocket.pair()
        let line = Mutex("")
        let guest = try FakePeer(fd: guestFD, onBytes: { peer, bytes in
            for byte in bytes {
                if byte == UInt8(ascii: "\r") {
                    peer.write("\r\n")
                    let command = line.withLock { current in defer { current = "" }; return current }
                    Task {
                        try? await Task.sleep(for: outputDelay)
                        if command.hasPrefix("echo ") {
                            peer.write(String(command.dropFirst(5)) + "\r\n# ")
                        } else if command == "fail" {
                            peer.write("PANIC: it broke\r\n# ")
                        } else {
                            peer.write("\(command): not found\r\n# ")
                        }
                    }
                } else {
                    peer.write(String(decoding: [byte], as: UTF8.self))
                    line.withLock { $0.append(Character(Unicode.Scalar(byte))) }
                }
            }
        })
        return (client, guest)
    }
}

/// What a process holds, for leak checks: the targets of /proc/self/fd links, and the
/// number of TestKit threads (named tk-*).
enum ProcessResources {
    /// Open fds except the timerfds libdispatch creates lazily, per clock, the first time
    /// a timeout (Task.sleep) uses that clock, and keeps for the life of the process.
    static func descriptors() -> [String] {
        let entries = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/fd")) ?? []
        return entries.compactMap { try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\($0)") }
            .filter { $0 != "anon_inode:[timerfd]" }
    }

    /// The fd count once it is back to `expected`, or after 3 s. Functional suites in the
    /// same process open and close fds all the time; a leak stays, their churn passes.
    static func settledDescriptorCount(expecting expected: Int) async -> Int {
        var count = descriptors().count
        for _ in 0..<60 where count != expected {
            try? await Task.sleep(for: .milliseconds(50))
            count = descriptors().count
        }
        return count
    }

    static func socketInode(_ fd: Int32) -> String? {
        try? FileManager.default.destinationOfSymbolicLink(atPath: "/proc/self/fd/\(fd)")
    }

    static func testKitThreads() -> Int {
        let tasks = (try? FileManager.default.contentsOfDirectory(atPath: "/proc/self/task")) ?? []
        return tasks.filter { task in
            let comm = (try? String(contentsOfFile: "/proc/self/task/\(task)/comm", encoding: .utf8)) ?? ""
            return comm.hasPrefix("tk-")
        }.count
    }

    /// Threads end just after they are joined or detached; give them a moment before counting.
    static func settledTestKitThreads(expecting expected: Int) async -> Int {
        for _ in 0..<50 {
            let count = testKitThreads()
            if count == expected { return count }
            try? await Task.sleep(for: .milliseconds(20))
        }
        return testKitThreads()
    }
}

func temporaryDirectory() throws -> String {
    let path = FileManager.default.temporaryDirectory.appendingPathComponent("testkit-unit-\(UUID().uuidString.prefix(8))").path
    try FileManager.default.createDirectory(atPath: path, withIntermediateDirectories: true)
    return path
}
