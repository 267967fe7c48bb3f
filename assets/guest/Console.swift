/// Text I/O on the serial console. Output is built from static strings and
/// bytes already in memory so no String or Array machinery is ever involved.
enum Console {
    @inline(__always)
    static func write(_ byte: UInt8) {
        Serial.write(byte)
    }

    static func write(_ text: StaticString) {
        text.withUTF8Buffer { bytes in
            for byte in bytes {
                Serial.write(byte)
            }
        }
    }

    static func write(_ text: Text) {
        var index = 0
        while index < text.count {
            Serial.write(text[index])
            index += 1
        }
    }

    static func newline() {
        write("\r\n")
    }

    static func writeLine(_ text: StaticString) {
        write(text)
        newline()
    }

    /// Most significant digit first by stepping a power of ten down, which
    /// needs no digit buffer.
    static func write(decimal value: UInt64) {
        var divisor: UInt64 = 1
        while value / divisor >= 10 {
            divisor &*= 10
        }
        var rest = value
        while divisor != 0 {
            write(UInt8(truncatingIfNeeded: rest / divisor) &+ UInt8(ascii: "0"))
            rest %= divisor
            divisor /= 10
        }
    }

    /// Blocks until a byte arrives, running one idle step per empty poll.
    static func readByte() -> UInt8 {
        while true {
            if let byte = Serial.read() {
                return byte
            }
            Machine.idle()
        }
    }
}
