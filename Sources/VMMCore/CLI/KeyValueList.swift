/// A QEMU option argument such as `tap,id=net0,queues=4` or `unix:/tmp/s,server=on`:
/// comma-separated `key=value` pairs, `,,` for a literal comma, and a first item without
/// `=` that names the implied key (the backend type, path, ...).
public struct KeyValueList: Sendable, Equatable {
    public private(set) var pairs: [(key: String, value: String)]
    /// Where the option came from, for error messages, e.g. `-object`.
    public let option: String

    public struct ParseError: Error, CustomStringConvertible, Sendable, Equatable {
        public let description: String
    }

    public static func == (lhs: KeyValueList, rhs: KeyValueList) -> Bool {
        lhs.option == rhs.option && lhs.pairs.elementsEqual(rhs.pairs) { $0 == $1 }
    }

    /// - Parameter impliedKey: key given to a first item that has no `=`. Later items without
    ///   `=` are booleans: `server` means `server=on`, `nowait` means `wait=off`.
    public init(_ text: String, option: String, impliedKey: String?) throws {
        self.option = option
        pairs = []
        for (index, item) in Self.split(text).enumerated() {
            if let eq = item.firstIndex(of: "=") {
                let key = String(item[..<eq])
                guard !key.isEmpty else { throw ParseError(description: "\(option) \(text): empty parameter name") }
                pairs.append((key, String(item[item.index(after: eq)...])))
            } else if index == 0, let impliedKey {
                pairs.append((impliedKey, item))
            } else if item.hasPrefix("no") && item.count > 2 {
                pairs.append((String(item.dropFirst(2)), "off"))
            } else if !item.isEmpty {
                pairs.append((item, "on"))
            }
        }
    }

    static func split(_ text: String) -> [String] {
        var items: [String] = []
        var current = ""
        var chars = text.makeIterator()
        var pending: Character? = nil
        while let c = pending ?? chars.next() {
            pending = nil
            if c == "," {
                if let next = chars.next() {
                    if next == "," {
                        current.append(",")
                        continue
                    }
                    pending = next
                }
                items.append(current)
                current = ""
            } else {
                current.append(c)
            }
        }
        items.append(current)
        return items
    }

    public subscript(key: String) -> String? { pairs.last { $0.key == key }?.value }

    /// The value of a parameter that must be present and non-empty.
    public func required(_ key: String, in text: String) throws -> String {
        guard let value = self[key], !value.isEmpty else { throw ParseError(description: "\(option) \(text): parameter '\(key)' is missing") }
        return value
    }

    /// Every key must be one of `allowed`; the error names the option and the stray key.
    public func checkKeys(_ allowed: Set<String>, context: String) throws {
        for (key, _) in pairs where !allowed.contains(key) {
            throw ParseError(description: "\(option) \(context): unknown parameter '\(key)'")
        }
    }

    public func bool(_ key: String, default value: Bool) throws -> Bool {
        guard let text = self[key] else { return value }
        switch text {
        case "on", "yes", "true", "y": return true
        case "off", "no", "false", "n": return false
        default: throw ParseError(description: "\(option): parameter '\(key)' expects 'on' or 'off', not '\(text)'")
        }
    }

    public func size(_ key: String, defaultUnit: UInt64 = 1) throws -> UInt64? {
        guard let text = self[key] else { return nil }
        guard let value = Self.parseSize(text, defaultUnit: defaultUnit) else {
            throw ParseError(description: "\(option): parameter '\(key)' expects a size like 512M or 1G, not '\(text)'")
        }
        return value
    }

    /// `128`, `128M`, `1G`, `4k`; a bare number is multiplied by `defaultUnit`.
    public static func parseSize(_ text: String, defaultUnit: UInt64) -> UInt64? {
        let units: [Character: UInt64] = ["b": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40]
        var digits = Substring(text)
        var unit = defaultUnit
        if let last = text.last, !last.isNumber {
            guard let u = units[Character(last.lowercased())] else { return nil }
            unit = u
            digits = digits.dropLast()
        }
        guard !digits.isEmpty, digits.allSatisfy(\.isASCII), let n = UInt64(digits) else { return nil }
        let (product, overflow) = n.multipliedReportingOverflow(by: unit)
        return overflow ? nil : product
    }
}
