import QMPWire
import Testing
@testable import VMMCore

@Suite struct QMPDispatcherTests {
    func makeDispatcher() -> QMPDispatcher {
        let d = QMPDispatcher()
        d.register("qmp_capabilities", arguments: ["enable": .array]) { _ in [:] }
        d.register("echo", arguments: ["text": .string, "count": .integer], required: ["text"]) { args in
            ["text": args["text"]!]
        }
        d.register("fail") { _ in throw QMPCommandError("it failed") }
        d.register("typed", arguments: ["flag": .boolean, "queues": .uint32, "size": .size]) { _ in [:] }
        return d
    }

    @Test func commandsBeforeNegotiationAreRefused() {
        let d = makeDispatcher()
        var negotiated = false
        let reply = d.handle(line: #"{"execute": "echo", "arguments": {"text": "x"}}"#, negotiated: &negotiated)
        #expect(reply["error"]?["class"] == "CommandNotFound")
        #expect(reply["error"]?["desc"] == "Expecting capabilities negotiation with 'qmp_capabilities'")
        #expect(!negotiated)
    }

    @Test func negotiationThenCommandEchoesID() {
        let d = makeDispatcher()
        var negotiated = false
        #expect(d.handle(line: #"{"execute": "qmp_capabilities"}"#, negotiated: &negotiated) == ["return": [:]])
        #expect(negotiated)
        let reply = d.handle(line: #"{"execute": "echo", "arguments": {"text": "hi"}, "id": {"n": 1}}"#, negotiated: &negotiated)
        #expect(reply == ["return": ["text": "hi"], "id": ["n": 1]])
        let again = d.handle(line: #"{"execute": "qmp_capabilities"}"#, negotiated: &negotiated)
        #expect(again["error"]?["class"] == "CommandNotFound")
    }

    @Test(arguments: [
        (#"{"execute": "echo""#, "JSON parse error"),
        (#"[1, 2]"#, "QMP input must be a JSON object"),
        (#"{"arguments": {}}"#, "QMP input lacks member 'execute'"),
        (#"{"execute": 5}"#, "QMP input member 'execute' must be a string"),
        (#"{"execute": "echo", "arguments": 1}"#, "QMP input member 'arguments' must be an object"),
        (#"{"execute": "echo", "bogus": 1}"#, "QMP input member 'bogus' is unexpected"),
        (#"{"execute": "echo", "arguments": {}}"#, "Parameter 'text' is missing"),
        (#"{"execute": "echo", "arguments": {"text": 1}}"#, "Invalid parameter type for 'text', expected: string"),
        (#"{"execute": "echo", "arguments": {"text": "a", "extra": 1}}"#, "Parameter 'extra' is unexpected"),
        (#"{"execute": "fail"}"#, "it failed"),
        (#"{"execute": "echo", "execute": "fail"}"#, "JSON parse error, duplicate key 'execute'"),
        (#"{"execute": "echo", "arguments": {"text": "a", "count": "1"}}"#, "Invalid parameter type for 'count', expected: integer"),
        (#"{"execute": "typed", "arguments": {"flag": 1}}"#, "Invalid parameter type for 'flag', expected: boolean"),
        (#"{"execute": "typed", "arguments": {"queues": "2"}}"#, "Parameter 'queues' expects uint64"),
        (#"{"execute": "typed", "arguments": {"queues": 4294967296}}"#, "Parameter 'queues' expects uint32_t"),
        (#"{"execute": "typed", "arguments": {"queues": -1}}"#, "Parameter 'queues' expects uint32_t"),
        (#"{"execute": "typed", "arguments": {"size": -1}}"#, "Parameter 'size' expects uint64"),
    ])
    func malformedMessagesGetGenericErrors(line: String, expected: String) {
        let d = makeDispatcher()
        var negotiated = true
        let reply = d.handle(line: line, negotiated: &negotiated)
        #expect(reply["error"]?["class"] == "GenericError")
        #expect(reply["error"]?["desc"]?.stringValue?.hasPrefix(expected) == true, "\(reply.serialized)")
    }

    @Test func unknownCommandIsCommandNotFound() {
        let d = makeDispatcher()
        var negotiated = true
        let reply = d.handle(line: #"{"execute": "nope", "id": 3}"#, negotiated: &negotiated)
        #expect(reply == ["error": ["class": "CommandNotFound", "desc": "The command nope has not been found"], "id": 3])
    }

    @Test func greetingHasQEMUShape() {
        let greeting = QMPMessage.greeting(major: 0, minor: 1, micro: 0, package: "p")
        #expect(greeting["QMP"]?["capabilities"] == [])
        #expect(greeting["QMP"]?["version"]?["qemu"]?["minor"] == 1)
    }
}

@Suite struct JSONStreamSplitterTests {
    func messages(_ chunks: [String]) -> [String] {
        var splitter = JSONStreamSplitter()
        return chunks.flatMap { splitter.feed(Array($0.utf8)) }.map {
            if case .message(let bytes) = $0 { return String(decoding: bytes, as: UTF8.self) }
            return "<too long>"
        }
    }

    @Test func splitsMessagesWithoutNewlines() {
        #expect(messages([#"{"execute":"a"}{"execute":"b"}"#]) == [#"{"execute":"a"}"#, #"{"execute":"b"}"#])
    }

    @Test func joinsMessagesSplitAcrossReads() {
        #expect(messages([#"{"execute": "qmp_"#, #"capabilities", "arguments": {"x": [1, {"y": 2}]}}"#, "\n"])
                == [#"{"execute": "qmp_capabilities", "arguments": {"x": [1, {"y": 2}]}}"#])
    }

    @Test func bracesInsideStringsDoNotCount() {
        #expect(messages([#"{"id": "}{\"", "execute": "x"}"#]) == [#"{"id": "}{\"", "execute": "x"}"#])
    }

    @Test func topLevelScalarsAndStrayClosersBecomeMessages() {
        #expect(messages(["\"str\"\n", "42 ", "}"]) == ["\"str\"", "42", "}"])
    }

    /// Clients like qemu.qmp send no newlines: the next message starts right where the
    /// overlong one closed, and a string holding a bracket does not confuse the count.
    @Test func overlongMessageIsDroppedAndTheNextOneFollowsAtOnce() {
        var splitter = JSONStreamSplitter()
        let huge = #"{"execute": "x", "arguments": {"s": "]}\"}", "a": ["# + String(repeating: "1,", count: JSONStreamSplitter.maxMessageLength)
        #expect(splitter.feed(Array(huge.utf8)) == [.tooLong])
        #expect(splitter.feed(Array(#"1]}}{"execute": "y"}"#.utf8)) == [.message(Array(#"{"execute": "y"}"#.utf8))])
    }

    @Test func overlongMessageThatNeverClosesEndsAtANewline() {
        var splitter = JSONStreamSplitter()
        let huge = "[" + String(repeating: "[1,", count: JSONStreamSplitter.maxMessageLength / 2)
        #expect(splitter.feed(Array(huge.utf8)) == [.tooLong])
        #expect(splitter.feed(Array("1,1]} still the same line\n{}".utf8)) == [.message(Array("{}".utf8))])
    }
}
