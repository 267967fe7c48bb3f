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

    /// Only spaces separate words: the line reader drops tabs with the other
    /// control bytes.
    static func isBlank(_ byte: UInt8) -> Bool {
        byte == UInt8(ascii: " ")
    }
}
