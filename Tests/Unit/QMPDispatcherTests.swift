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
