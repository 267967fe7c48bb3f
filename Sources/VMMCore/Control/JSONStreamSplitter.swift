/// Cuts a QMP byte stream into messages. QMP does not need newlines between messages
/// (the `qemu.qmp` client sends none), so, like QEMU's JSON streamer, a message ends
/// where its outermost object or array closes. A bare scalar at top level ends at the
/// next whitespace; it still gets its error reply. An overlong message is dropped (one
/// `tooLong`) while its structure is still followed, so the stream resumes right after
/// its outermost object closes, as clients that send no newlines need; a newline also
/// ends it, for input whose brackets never balance.
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
    /// The current message went past `maxMessageLength`: follow its structure, keep none of it.
    private var discarding = false
    /// The current message has a byte (kept or discarded).
    private var started = false

    public init() {}

    public mutating func feed(_ bytes: some Sequence<UInt8>) -> [Output] {
        var outputs: [Output] = []
        for byte in bytes {
            if discarding && byte == UInt8(ascii: "\n") {
                finish(into: &outputs)
                continue
            }
            if inString {
                keep(byte)
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
                        if started { finish(into: &outputs) }
                        continue
                    }
                    keep(byte)
                case UInt8(ascii: "\""):
                    inString = true
                    keep(byte)
                case UInt8(ascii: "{"), UInt8(ascii: "["):
                    depth += 1
                    keep(byte)
                case UInt8(ascii: "}"), UInt8(ascii: "]"):
                    depth -= 1
                    keep(byte)
                    if depth <= 0 { finish(into: &outputs) }
                default:
                    keep(byte)
                }
            }
            if buffer.count > Self.maxMessageLength {
                buffer = []
                discarding = true
                outputs.append(.tooLong)
            }
        }
        return outputs
    }

    private mutating func keep(_ byte: UInt8) {
        started = true
        if !discarding { buffer.append(byte) }
    }

    /// The current message ended: hand it out, unless it was overlong (already reported).
    private mutating func finish(into outputs: inout [Output]) {
        let message = take()
        if !discarding { outputs.append(.message(message)) }
        discarding = false
    }

    private mutating func take() -> [UInt8] {
        defer {
            buffer = []
            started = false
            depth = 0
            inString = false
            escaped = false
        }
        return buffer
    }
}
