import CLinux
import Foundation
import Glibc
import Logging
import QMPWire
import Synchronization
import Testing
import TestKit
@testable import VMMCore

/// Keeps every log message, so a test can check what a user would read on stderr.
struct CapturingLogHandler: LogHandler {
    let messages: Mutex<[String]>.Box
    var metadata: Logger.Metadata = [:]
    var logLevel: Logger.Level = .trace
    subscript(metadataKey key: String) -> Logger.Metadata.Value? {
        get { metadata[key] }
        set { metadata[key] = newValue }
    }
    func log(event: LogEvent) {
        messages.value.withLock { $0.append("\(event.level) \(event.message)") }
    }
}

extension Mutex where Value: Sendable {
    final class Box: Sendable {
        let value: Mutex<Value>
        init(_ initial: sending Value) { value = Mutex(initial) }
    }
}

/// The QMP server in-process, with a small output bound so that the bound is reachable.
/// It runs TestKit's QMP client (tk- threads, sockets), so it must not overlap the
/// TestKit leak checks, which count those.
@Suite(.usesProcessResources) struct QMPServerTests {
    final class ServerBox: @unchecked Sendable { var server: QMPServer? }

    /// Reads until EOF (or 5 s of silence); returns the bytes and whether EOF came.
    static func readToEnd(_ fd: Int32) -> (bytes: [UInt8], eof: Bool) {
        var received: [UInt8] = []
        var chunk = [UInt8](repeating: 0, count: 65536)
        var timeout = timeval(tv_sec: 5, tv_usec: 0)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, socklen_t(MemoryLayout<timeval>.size))
        while true {
            let n = recv(fd, &chunk, chunk.count, 0)
            if n <= 0 { return (received, n == 0) }
            received += chunk[0..<n]
        }
    }

    @Test func aClientThatClosesItsSideStillGetsEveryReply() async throws {
        let dir = NSTemporaryDirectory() + "qmpserver-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/qmp.sock"
        let loop = try EventLoop()
        let dispatcher = QMPDispatcher()
        dispatcher.register("qmp_capabilities") { _ in [:] }
        dispatcher.register("big") { _ in .string(String(repeating: "x", count: 4096)) }
        let server = QMPServer(loop: loop, dispatcher: dispatcher, greeting: QMPMessage.greeting(major: 0, minor: 1, micro: 0, package: "t"),
                               logger: Logger(label: "test"))
        try server.open([.unixServer(path: path, wait: false)])
        let thread = try OSThread(name: "test-loop") { _ = loop.run() }
        defer {
            loop.post { loop.stop(exitStatus: 0) }
            thread.join()
            server.close()
        }
        // Like `socat`: all commands, then EOF, then read. As many replies as the socket
        // holds plus a few, so that some wait in the server's buffer (under the 64 KiB at
        // which it stops reading) when it reads the EOF.
        let replySize = (#"{"return": ""}"# + QMPMessage.lineTerminator).utf8.count + 4096
        let commandCount = Self.socketCapacity(messageSize: replySize) + 8
        let client = try VMMCore.UnixSocket.connect(path: path)
        defer { close(client) }
        let commands = Array((#"{"execute": "qmp_capabilities"}"# + String(repeating: #"{"execute": "big"}"#, count: commandCount)).utf8)
        #expect(commands.count < 4096, "one read takes them all")
        #expect(send(client, commands, commands.count, 0) == commands.count)
        shutdown(client, Int32(SHUT_WR))
        try await Task.sleep(for: .milliseconds(300))
        let (bytes, eof) = Self.readToEnd(client)
        #expect(eof)
        let text = String(decoding: bytes, as: UTF8.self)
        #expect(text.components(separatedBy: "\"return\"").count - 1 == commandCount + 1)
    }

    /// How many `messageSize` sends a unix stream socket takes before it would block.
    static func socketCapacity(messageSize: Int) -> Int {
        var pair: [Int32] = [-1, -1]
        guard socketpair(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0, &pair) == 0 else { return 0 }
        defer { pair.forEach { close($0) } }
        let message = [UInt8](repeating: 0x20, count: messageSize)
        var count = 0
        while send(pair[0], message, message.count, Int32(MSG_DONTWAIT)) == message.count { count += 1 }
        return count
    }

    @Test func aClientThatLeavesTooMuchUnreadIsDisconnectedAndOthersStillServed() async throws {
        let dir = NSTemporaryDirectory() + "qmpserver-\(getpid())-\(UInt32.random(in: 0...UInt32.max))"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let path = dir + "/qmp.sock"
        let logs = Mutex<[String]>.Box([])
        let logger = Logger(label: "test") { _ in CapturingLogHandler(messages: logs) }
        let loop = try EventLoop()
        let dispatcher = QMPDispatcher()
        let box = ServerBox()
        dispatcher.register("qmp_capabilities") { _ in [:] }
        // 100 events per call: a burst like many state changes at once.
        dispatcher.register("burst") { _ in
            for _ in 0..<100 { box.server?.emit("BURST") }
            return [:]
        }
        let limit = 16 << 10
        let server = QMPServer(loop: loop, dispatcher: dispatcher, greeting: QMPMessage.greeting(major: 0, minor: 1, micro: 0, package: "t"),
                               logger: logger, outputLimit: limit)
        box.server = server
        try server.open([.unixServer(path: path, wait: false)])
        let thread = try OSThread(name: "test-loop") { _ = loop.run() }
        defer {
            loop.post { loop.stop(exitStatus: 0) }
            thread.join()
            server.close()
        }

        let silent = try VMMCore.UnixSocket.connect(path: path)
        defer { close(silent) }
        let negotiate = Array(#"{"execute": "qmp_capabilities"}"#.utf8)
        #expect(send(silent, negotiate, negotiate.count, 0) == negotiate.count)

        let busy = try await QMPClient.connect(path: path, timeout: .seconds(5))
        defer { busy.close() }
        // Far more events than the socket plus 16 KiB hold for the silent client.
        for _ in 0..<30 { try await busy.execute("burst", timeout: .seconds(5)) }
        #expect(busy.events.count == 3000)

        // The silent client finds, once it reads, the end of its connection after what fit.
        let (bytes, eof) = Self.readToEnd(silent)
        #expect(eof, "the VMM should have closed the connection after \(bytes.count) bytes")
        let received = bytes.count
        #expect(received > limit)
        #expect(logs.value.withLock { $0 }.contains { $0.contains("qmp: disconnecting QMP client on \(path)") && $0.contains("the limit is \(limit)") })
        try await busy.execute("burst", timeout: .seconds(5))
    }
}
