/// The shapes of QMP messages (greeting, return, error, event) as QEMU writes them,
/// so that the VMM's server and TestKit's client agree on one definition.
public enum QMPErrorClass: String, Sendable, Equatable {
    case genericError = "GenericError"
    case commandNotFound = "CommandNotFound"
    case deviceNotFound = "DeviceNotFound"
    case deviceNotActive = "DeviceNotActive"
    case kvmMissingCap = "KVMMissingCap"
}

/// Wall-clock time of an event, split like QEMU's `timestamp` member.
public struct QMPTimestamp: Sendable, Equatable {
    public var seconds: Int64
    public var microseconds: Int64

    public init(seconds: Int64, microseconds: Int64) {
        self.seconds = seconds
        self.microseconds = microseconds
    }

    public var json: JSON { ["seconds": .int(seconds), "microseconds": .int(microseconds)] }

    public init?(_ json: JSON?) {
        guard let s = json?["seconds"]?.intValue, let us = json?["microseconds"]?.intValue else { return nil }
        self.init(seconds: s, microseconds: us)
    }

    /// Seconds since the epoch as a floating-point number, for computing gaps between events.
    public var timeInterval: Double { Double(seconds) + Double(microseconds) / 1_000_000 }
}

public enum QMPMessage {
    /// Every QMP line ends with CRLF, as QEMU writes it.
    public static let lineTerminator = "\r\n"

    public static func greeting(major: Int64, minor: Int64, micro: Int64, package: String) -> JSON {
        [
            "QMP": [
                "version": [
                    "qemu": ["micro": .int(micro), "minor": .int(minor), "major": .int(major)],
                    "package": .string(package),
                ],
                "capabilities": [],
            ]
        ]
    }

    public static func reply(_ value: JSON, id: JSON?) -> JSON {
        var object: JSONObject = ["return": value]
        if let id { object["id"] = id }
        return .object(object)
    }

    public static func error(_ errorClass: QMPErrorClass, _ description: String, id: JSON?) -> JSON {
        var object: JSONObject = ["error": ["class": .string(errorClass.rawValue), "desc": .string(description)]]
        if let id { object["id"] = id }
        return .object(object)
    }

    public static func event(_ name: String, data: JSON?, timestamp: QMPTimestamp) -> JSON {
        var object: JSONObject = ["timestamp": timestamp.json, "event": .string(name)]
        if let data { object["data"] = data }
        return .object(object)
    }
}
