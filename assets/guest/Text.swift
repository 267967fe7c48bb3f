/// A borrowed run of bytes, typically part of the current input line.
/// Valid until the next line is read; never copied, never allocated.
struct Text {
    let base: UnsafePointer<UInt8>
    let count: Int

    var isEmpty: Bool { count == 0 }

    subscript(index: Int) -> UInt8 {
        base[index]
    }

    /// The text after its first `n` bytes.
    func dropFirst(_ n: Int) -> Text {
        Text(base: base + n, count: count - n)
    }

    func prefix(_ n: Int) -> Text {
        Text(base: base, count: n)
    }

    /// The text without leading spaces.
    func trimmingLeadingBlanks() -> Text {
        var index = 0
        while index < count, Text.isBlank(base[index]) {
            index += 1
        }
        return dropFirst(index)
    }

    /// Splits at the first space: the word before it and the space-trimmed rest.
    func splitFirstWord() -> (word: Text, rest: Text) {
        var index = 0
        while index < count, !Text.isBlank(base[index]) {
            index += 1
        }
        return (prefix(index), dropFirst(index).trimmingLeadingBlanks())
    }

    func equals(_ literal: StaticString) -> Bool {
        literal.withUTF8Buffer { bytes in
            guard bytes.count == count else { return false }
            var index = 0
            while index < count {
                if bytes[index] != base[index] { return false }
                index += 1
            }
            return true
        }
    }

    /// The decimal number spelled by the whole text; nil for anything
    /// else, including an empty text or a value above `limit`.
    func decimalValue(limit: UInt64 = UInt64(UInt32.max)) -> UInt64? {
        guard !isEmpty else { return nil }
        var value: UInt64 = 0
        var index = 0
        while index < count {
            let digit = base[index] &- UInt8(ascii: "0")
            guard digit < 10 else { return nil }
            value = value * 10 + UInt64(digit)
            guard value <= limit else { return nil }
            index += 1
        }
        return value
    }

    /// `A.B.C.D` or `A.B.C.D/N`: the address in host byte order and the
    /// prefix length (32 when not given), or nil.
    func ipv4Prefix() -> (address: UInt32, prefixLength: UInt32)? {
        var address: UInt32 = 0
        var rest = self
        var octets = 0
        while octets < 4 {
            var length = 0
            while length < rest.count, rest[length] != UInt8(ascii: "."), rest[length] != UInt8(ascii: "/") {
                length += 1
            }
            guard let octet = rest.prefix(length).decimalValue(limit: 255) else { return nil }
            address = address << 8 | UInt32(octet)
            octets += 1
            let separator: UInt8 = octets < 4 ? UInt8(ascii: ".") : UInt8(ascii: "/")
            if length == rest.count {
                rest = rest.dropFirst(length)
                break
            }
            guard rest[length] == separator else { return nil }
            rest = rest.dropFirst(length + 1)
        }
        guard octets == 4 else { return nil }
        if rest.isEmpty && self[count - 1] != UInt8(ascii: "/") {
            return (address, 32)
        }
        guard let prefixLength = rest.decimalValue(limit: 32) else { return nil }
        return (address, UInt32(prefixLength))
    }

    /// Only spaces separate words: the line reader drops tabs with the other
    /// control bytes.
    static func isBlank(_ byte: UInt8) -> Bool {
        byte == UInt8(ascii: " ")
    }
}
