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

    /// Dotted quad of an address held in host byte order.
    static func write(ipv4 address: UInt32) {
        var shift: UInt32 = 24
        while true {
            write(decimal: UInt64(address >> shift & 0xff))
            if shift == 0 {
                return
            }
            write(UInt8(ascii: "."))
            shift -= 8
        }
    }

    /// `aa:bb:cc:dd:ee:ff` from six bytes in wire order (lowest byte first).
    static func write(mac: UInt64) {
        var index: UInt64 = 0
        while true {
            write(hexByte: UInt8(truncatingIfNeeded: mac >> (index * 8)))
            index += 1
            if index == 6 {
                return
            }
            write(UInt8(ascii: ":"))
        }
    }

    static func write(hexByte byte: UInt8) {
        let digits: StaticString = "0123456789abcdef"
        digits.withUTF8Buffer { hex in
            write(hex[Int(byte >> 4)])
            write(hex[Int(byte & 0xf)])
        }
    }

    /// Microseconds as milliseconds with three decimals, e.g. `0.412`.
    static func write(milliseconds microseconds: UInt64) {
        write(decimal: microseconds / 1000)
        write(UInt8(ascii: "."))
        let fraction = microseconds % 1000
        write(UInt8(truncatingIfNeeded: fraction / 100) &+ UInt8(ascii: "0"))
        write(UInt8(truncatingIfNeeded: fraction / 10 % 10) &+ UInt8(ascii: "0"))
        write(UInt8(truncatingIfNeeded: fraction % 10) &+ UInt8(ascii: "0"))
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
