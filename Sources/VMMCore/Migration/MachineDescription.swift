/// What the source says it is running, sent first so that the target can refuse a
/// mismatch before it loads any state. Every disagreement is reported by device,
/// property and both values, so a configuration skew can never be misparsed as state
/// (the QEMU reviewers' `8 != 101 ... max_queue_pairs`).
public struct MachineDescription: Sendable, Equatable {
    public struct Device: Sendable, Equatable {
        public var id: String
        public var type: String
        /// Sorted by key when encoded; only properties that must agree go here.
        public var properties: [String: String]

        public init(id: String, type: String, properties: [String: String]) {
            self.id = id
            self.type = type
            self.properties = properties
        }
    }

    /// Machine-wide settings that must agree: RAM size, vCPUs, migration mode, ... and
    /// the `informational` ones, which describe the source and need not agree.
    public var properties: [String: String]
    /// `ram-file`: "device:inode" of the file behind the source's RAM, so that a target
    /// never empties the very file the source runs on before RAM is copied into it.
    public static let informational: Set<String> = ["ram-file"]
    public var devices: [Device]

    public init(properties: [String: String], devices: [Device]) {
        self.properties = properties
        self.devices = devices
    }

    public func encode() -> [UInt8] {
        var w = StreamWriter()
        Self.write(properties, to: &w)
        w.u16(UInt16(devices.count))
        for device in devices {
            w.string(device.id)
            w.string(device.type)
            Self.write(device.properties, to: &w)
        }
        return w.bytes
    }

    static func write(_ properties: [String: String], to w: inout StreamWriter) {
        w.u16(UInt16(properties.count))
        for key in properties.keys.sorted() {
            w.string(key)
            w.string(properties[key]!)
        }
    }

    public static func decode(_ bytes: [UInt8]) throws -> MachineDescription {
        var r = StreamReader(bytes, context: "configuration section")
        let properties = try readProperties(&r, owner: "machine")
        let count = Int(try r.u16("device count"))
        var devices: [Device] = []
        for _ in 0..<count {
            let id = try r.string("device id")
            let type = try r.string("device type")
            devices.append(Device(id: id, type: type, properties: try readProperties(&r, owner: "device '\(id)'")))
        }
        try r.finish()
        return MachineDescription(properties: properties, devices: devices)
    }

    static func readProperties(_ r: inout StreamReader, owner: String) throws -> [String: String] {
        let count = Int(try r.u16("\(owner) property count"))
        var properties: [String: String] = [:]
        for _ in 0..<count {
            let key = try r.string("\(owner) property name")
            guard properties[key] == nil else { throw StreamError("configuration section: \(owner) lists property '\(key)' twice") }
            properties[key] = try r.string("\(owner) property '\(key)'")
        }
        return properties
    }

    /// Every way the source (`self`) and the target disagree, one message each.
    public func mismatches(target: MachineDescription) -> [String] {
        var problems: [String] = []
        func compare(_ source: [String: String], _ target: [String: String], owner: String) {
            for key in Set(source.keys).union(target.keys).subtracting(Self.informational).sorted() where source[key] != target[key] {
                problems.append("\(owner): property '\(key)' is \(source[key] ?? "unset") on the source but \(target[key] ?? "unset") on the target")
            }
        }
        compare(properties, target.properties, owner: "machine")
        for device in devices {
            guard let other = target.devices.first(where: { $0.id == device.id }) else {
                problems.append("device '\(device.id)' (\(device.type)) exists on the source but not on the target")
                continue
            }
            guard other.type == device.type else {
                problems.append("device '\(device.id)' is \(device.type) on the source but \(other.type) on the target")
                continue
            }
            compare(device.properties, other.properties, owner: "device '\(device.id)' (\(device.type))")
        }
        for device in target.devices where !devices.contains(where: { $0.id == device.id }) {
            problems.append("device '\(device.id)' (\(device.type)) exists on the target but not on the source")
        }
        return problems
    }

    /// Throws one error listing every mismatch, or returns when the two agree.
    public func check(target: MachineDescription) throws {
        let problems = mismatches(target: target)
        guard problems.isEmpty else {
            throw StreamError("configuration mismatch: " + problems.joined(separator: "; "))
        }
    }
}
