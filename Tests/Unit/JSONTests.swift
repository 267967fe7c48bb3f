import QMPWire
import Testing

@Suite struct JSONTests {
    @Test func parsesNestedValuesAndKeepsKeyOrder() throws {
        let value = try JSON.parse(#" {"execute": "query-status", "id": 7, "arguments": {"b": [1, 2.5, true, null], "a": "x"}} "#)
        #expect(value["execute"] == "query-status")
        #expect(value["id"]?.intValue == 7)
        #expect(value["arguments"]?.objectValue?.keys == ["b", "a"])
        #expect(value["arguments"]?["b"] == [1, 2.5, true, nil])
    }

    @Test func serializesInQEMUSpacing() {
        let reply = QMPMessage.reply(["status": "running", "running": true], id: "a1")
        #expect(reply.serialized == #"{"return": {"status": "running", "running": true}, "id": "a1"}"#)
    }

    @Test func roundTripsEscapesAndUnicode() throws {
        let text = "quote \" backslash \\ newline \n tab \t control \u{01} snowman \u{2603} emoji \u{1F600}"
        let encoded = JSON.string(text).serialized
        #expect(try JSON.parse(encoded) == .string(text))
        #expect(try JSON.parse(#""\ud83d\ude00""#) == "\u{1F600}")
    }

    @Test(arguments: ["", "{", "{\"a\" 1}", "[1,]", "tru", "\"unterminated", "{\"a\":1} x", "01x", "\"\u{01}\"", "-"])
    func rejectsMalformedInput(_ text: String) {
        #expect(throws: JSONParseError.self) { try JSON.parse(text) }
    }

    @Test func rejectsExcessiveNesting() {
        let deep = String(repeating: "[", count: 100) + String(repeating: "]", count: 100)
        #expect(throws: JSONParseError.self) { try JSON.parse(deep) }
    }

    @Test func partialMatchingLikeEventsWait() {
        let event: JSON = ["event": "MIGRATION", "data": ["status": "completed", "extra": 1]]
        #expect(event.matches(["data": ["status": "completed"]]))
        #expect(!event.matches(["data": ["status": "failed"]]))
        #expect(!event.matches(["data": ["missing": 1]]))
    }

    @Test func integersAndDoublesStayDistinct() throws {
        #expect(try JSON.parse("3") == .int(3))
        #expect(try JSON.parse("3.5") == .double(3.5))
        #expect(try JSON.parse("1e3").intValue == 1000)
        #expect(JSON.double(2).serialized == "2")
    }
}
