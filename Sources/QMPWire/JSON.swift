/// A JSON value as QMP uses it. Objects keep their key order so that replies and
/// events read the way QEMU prints them, and so that logs are stable.
public enum JSON: Sendable, Equatable {
    case null
    case bool(Bool)
    case int(Int64)
    case double(Double)
    case string(String)
    case array([JSON])
    case object(JSONObject)

    public subscript(key: String) -> JSON? {
        if case .object(let object) = self { return object[key] }
        return nil
    }

    public var stringValue: String? {
        if case .string(let s) = self { return s }
        return nil
    }

    public var boolValue: Bool? {
        if case .bool(let b) = self { return b }
        return nil
    }

    public var intValue: Int64? {
        switch self {
        case .int(let i): return i
        case .double(let d): return Int64(exactly: d)
        default: return nil
        }
    }

    public var objectValue: JSONObject? {
        if case .object(let o) = self { return o }
        return nil
    }

    public var arrayValue: [JSON]? {
        if case .array(let a) = self { return a }
        return nil
    }

    /// The QMP name of this value's type, for error messages ("Invalid parameter type ... expected 'int'").
    public var typeName: String {
        switch self {
        case .null: return "null"
        case .bool: return "boolean"
        case .int, .double: return "number"
        case .string: return "string"
        case .array: return "array"
        case .object: return "object"
        }
    }

    /// True when every key of `pattern` is present here with an equal value; nested
    /// objects match recursively. This is what QEMU's `events_wait` match does.
    public func matches(_ pattern: JSON) -> Bool {
        switch (self, pattern) {
        case (.object(let mine), .object(let wanted)):
            for (key, value) in wanted.pairs {
                guard let actual = mine[key], actual.matches(value) else { return false }
            }
            return true
        case (.int, .double), (.double, .int), (.double, .double):
            return self.doubleValue == pattern.doubleValue
        default:
            return self == pattern
        }
    }

    var doubleValue: Double? {
        switch self {
        case .int(let i): return Double(i)
        case .double(let d): return d
        default: return nil
        }
    }
}

/// An ordered JSON object. An index by key beside the ordered pairs keeps inserts and
/// lookups O(1), so a client's 1 MB object with 100k keys parses in O(n), not O(n²).
public struct JSONObject: Sendable, Equatable, ExpressibleByDictionaryLiteral {
    public private(set) var pairs: [(String, JSON)]
    private var index: [String: Int]

    public init() {
        pairs = []
        index = [:]
    }
    public init(_ pairs: [(String, JSON)]) {
        self.init()
        for (k, v) in pairs { self[k] = v }
    }
    public init(dictionaryLiteral elements: (String, JSON)...) { self.init(elements) }

    public var keys: [String] { pairs.map { $0.0 } }
    public var count: Int { pairs.count }
    public var isEmpty: Bool { pairs.isEmpty }

    /// Adds a key that must not be present yet; false (and no change) when it is.
    public mutating func insertNew(_ key: String, _ value: JSON) -> Bool {
        guard index[key] == nil else { return false }
        index[key] = pairs.count
        pairs.append((key, value))
        return true
    }

    public subscript(key: String) -> JSON? {
        get { index[key].map { pairs[$0].1 } }
        set {
            if let position = index[key] {
                if let newValue {
                    pairs[position].1 = newValue
                } else {
                    pairs.remove(at: position)
                    index[key] = nil
                    for i in position..<pairs.count { index[pairs[i].0] = i }
                }
            } else if let newValue {
                _ = insertNew(key, newValue)
            }
        }
    }

    public static func == (lhs: JSONObject, rhs: JSONObject) -> Bool {
        guard lhs.pairs.count == rhs.pairs.count else { return false }
        return lhs.pairs.allSatisfy { rhs[$0.0] == $0.1 }
    }
}

extension JSON: ExpressibleByNilLiteral, ExpressibleByBooleanLiteral, ExpressibleByIntegerLiteral,
    ExpressibleByFloatLiteral, ExpressibleByStringLiteral, ExpressibleByArrayLiteral,
    ExpressibleByDictionaryLiteral
{
    public init(nilLiteral: ()) { self = .null }
    public init(booleanLiteral value: Bool) { self = .bool(value) }
    public init(integerLiteral value: Int64) { self = .int(value) }
    public init(floatLiteral value: Double) { self = .double(value) }
    public init(stringLiteral value: String) { self = .string(value) }
    public init(arrayLiteral elements: JSON...) { self = .array(elements) }
    public init(dictionaryLiteral elements: (String, JSON)...) { self = .object(JSONObject(elements)) }
}
