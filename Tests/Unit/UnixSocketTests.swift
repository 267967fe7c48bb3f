import Foundation
import Glibc
import Testing
@testable import VMMCore

@Suite struct UnixSocketTests {
    /// The socket is bound under a temporary name and renamed once it listens: the
    /// directory then holds exactly the requested name, and a connect succeeds at once.
    @Test func listeningSocketAppearsUnderItsNameOnlyAndAcceptsAtOnce() throws {
        let directory = FileManager.default.temporaryDirectory.appendingPathComponent("us-\(getpid())-\(UInt32.random(in: 0...UInt32.max))").path
        try FileManager.default.createDirectory(atPath: directory, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: directory) }
        let path = directory + "/q.sock"
        let listener = try UnixSocket.listen(path: path)
        defer { close(listener) }
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory) == ["q.sock"])
        let client = try UnixSocket.connect(path: path)
        close(client)
        // A stale socket file from an earlier run is replaced, not an error.
        let again = try UnixSocket.listen(path: path)
        close(again)
        #expect(try FileManager.default.contentsOfDirectory(atPath: directory) == ["q.sock"])
    }
}
