/// `0x…` formatting for addresses and register values in messages (no Foundation here).
@inline(__always)
func hex<T: BinaryInteger>(_ value: T) -> String { "0x" + String(value, radix: 16) }
