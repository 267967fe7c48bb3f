/// Fixed line storage in .bss: zeroed by the loader, so it costs no guest time.
nonisolated(unsafe) private var lineStorage = InlineArray<256, UInt8>(repeating: 0)

/// Reads one line from the console with echo and minimal editing.
struct LineReader {
    static let capacity = 256

    /// Set when the previous line ended in CR, so the LF of a CR LF pair
    /// is not taken as a second, empty line.
    private var swallowLineFeed = false

    private static let backspace: UInt8 = 0x08
    private static let delete: UInt8 = 0x7f
    private static let carriageReturn: UInt8 = 0x0d
    private static let lineFeed: UInt8 = 0x0a

    /// The storage is a global, so its address outlives the closure.
    private static var buffer: UnsafeMutablePointer<UInt8> {
        withUnsafeMutablePointer(to: &lineStorage) {
            UnsafeMutableRawPointer($0).assumingMemoryBound(to: UInt8.self)
        }
    }

    /// Returns the line without its terminator. Bytes past `capacity` are
    /// dropped (and not echoed), so the text shown is exactly the text kept.
    mutating func read() -> Text {
        let buffer = LineReader.buffer
        var count = 0
        while true {
            let byte = Console.readByte()
            if byte == LineReader.lineFeed && swallowLineFeed {
                swallowLineFeed = false
                continue
            }
            swallowLineFeed = false
            switch byte {
            case LineReader.carriageReturn:
                swallowLineFeed = true
                return Text(base: buffer, count: count)
            case LineReader.lineFeed:
                return Text(base: buffer, count: count)
            case LineReader.backspace, LineReader.delete:
                if count > 0 {
                    count -= 1
                    Console.write("\u{8} \u{8}")
                }
            case 0x00..<0x20:
                // Other control bytes (escape sequences, ^C, ...) have no meaning here.
                continue
            default:
                if count < LineReader.capacity {
                    buffer[count] = byte
                    count += 1
                    Console.write(byte)
                }
            }
        }
    }
}
