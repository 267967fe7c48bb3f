/// Cuts a QMP byte stream into messages. QMP does not need newlines between messages
/// (the `qemu.qmp` client sends none), so, like QEMU's JSON streamer, a message ends
/// where its outermost object or array closes. A bare scalar at top level ends at the
/// next whitespace; it still gets its error reply. After an overlong message the
/// rest of its line is skipped, so the stream resynchronizes at the next newline.
public struct JSONStreamSplitter {
    public static let maxMessageLength = 1 << 20

    public enum Output: Equatable {
        case message([UInt8])
        /// The current message grew past `maxMessageLength` and was dropped.
        case tooLong
    }

    private var buffer: [UInt8] = []
    private var depth = 0
    private var inString = false
    private var escaped = false
    private var skippingToNewline = false

    public init() {}

    public mutating func feed(_ bytes: some Sequence<UInt8>) -> [Output] {
        var outputs: [Output] = []
        for byte in bytes {
            if skippingToNewline {
                if byte == UInt8(ascii: "\n") { skippingToNewline = false }
                continue
            }
            if inString {
                buffer.append(byte)
                if escaped {
                    escaped = false
                } else if byte == UInt8(ascii: "\\") {
                    escaped = true
                } else if byte == UInt8(ascii: "\"") {
                    inString = false
                }
            } else {
                switch byte {
                case UInt8(ascii: " "), UInt8(ascii: "\t"), UInt8(ascii: "\r"), UInt8(ascii: "\n"):
                    if depth == 0 {
                        if !buffer.isEmpty { outputs.append(.message(take())) }
                        continue
                    }
                    buffer.append(byte)
                case UInt8(ascii: "\""):
                    inString = true
                    buffer.append(byte)
                case UInt8(ascii: "{"), UInt8(ascii: "["):
                    depth += 1
                    buffer.append(byte)
                case UInt8(ascii: "}"), UInt8(ascii: "]"):
                    depth -= 1
                    buffer.append(byte)
                    if depth <= 0 { outputs.append(.message(take())) }
                default:
                    buffer.append(byte)
                }
            }
            if buffer.count > Self.maxMessageLength {
                _ = take()
                skippingToNewline = true
                outputs.append(.tooLong)
            }
        }
        return outputs
    }

    private mutating func take() -> [UInt8] {
        defer {
            buffer = []
            depth = 0
            inString = false
            escaped = false
        }
        return buffer
    }
}
