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
        let deep = String(repeating: "[", count: 1025) + String(repeating: "]", count: 1025)
        #expect(throws: JSONParseError.self) { try JSON.parse(deep) }
    }

    @Test func parsesAMegabyteObjectWithOver100kKeysInOrder() throws {
        // Key insertion used to scan every earlier key: ~24 s for this object.
        let count = 120_000
        var text = "{"
        for i in 0..<count { text += (i > 0 ? "," : "") + "\"k\(i)\":\(i)" }
        text += "}"
        let object = try #require(try JSON.parse(text).objectValue)
        #expect(object.count == count)
        #expect(object.keys.first == "k0" && object.keys.last == "k\(count - 1)")
        #expect(object["k77777"] == 77777)
    }

    @Test func refusesDuplicateKeysNamingTheKey() {
        let error = #expect(throws: JSONParseError.self) { try JSON.parse(#"{"execute":"query-status","execute":"stop"}"#) }
        #expect(error?.message == "duplicate key 'execute'")
        #expect(throws: JSONParseError.self) { try JSON.parse(#"{"a": {"b": 1, "b": 2}}"#) }
    }

    @Test func nestingStopsAtQEMUsLimitWithoutRecursingFurther() throws {
        _ = try JSON.parse(String(repeating: "[", count: 1024) + String(repeating: "]", count: 1024))
        let deep = String(repeating: "[", count: 100_000) + String(repeating: "]", count: 100_000)
        #expect(throws: JSONParseError.self) { try JSON.parse(deep) }
        #expect(throws: JSONParseError.self) { try JSON.parse(String(repeating: "{\"a\":", count: 1025) + "1" + String(repeating: "}", count: 1025)) }
    }

    @Test func objectsKeepOrderWhenKeysAreReplacedAndRemoved() {
        var object: JSONObject = ["a": 1, "b": 2, "c": 3]
        object["b"] = 20
        object["a"] = nil
        object["d"] = 4
        #expect(object.keys == ["b", "c", "d"])
        #expect(object["b"] == 20 && object["a"] == nil && object["c"] == 3)
        #expect(object == ["d": 4, "c": 3, "b": 20])
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
