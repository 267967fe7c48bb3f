/// A device reachable through x86 port I/O. Offsets are relative to the device's base port.
public protocol PortIODevice: AnyObject, Sendable {
    func portRead(offset: UInt16, size: Int) -> UInt32
    func portWrite(offset: UInt16, size: Int, value: UInt32)
}

/// Routes port I/O exits to devices. Ports nobody claims read as all ones and ignore
/// writes, like an empty ISA bus, so a probing guest never stops the VMM.
public final class IOBus: Sendable {
    public struct Mapping: Sendable {
        public let base: UInt16
        public let count: UInt16
        public let device: any PortIODevice
    }

    public let mappings: [Mapping]

    public init(_ mappings: [Mapping]) throws {
        let sorted = mappings.sorted { $0.base < $1.base }
        for (a, b) in zip(sorted, sorted.dropFirst()) where UInt32(a.base) + UInt32(a.count) > UInt32(b.base) {
            throw IOBusError(description: "port ranges 0x\(String(a.base, radix: 16))+\(a.count) and 0x\(String(b.base, radix: 16))+\(b.count) overlap")
        }
        self.mappings = sorted
    }

    func mapping(for port: UInt16) -> Mapping? {
        mappings.first { port >= $0.base && UInt32(port) < UInt32($0.base) + UInt32($0.count) }
    }

    /// Handles one port I/O exit; `data` holds `size * count` bytes (string I/O repeats).
    public func handle(port: UInt16, isWrite: Bool, size: Int, count: Int, data: UnsafeMutableRawPointer) {
        let target = mapping(for: port)
        for i in 0..<count {
            let item = data + i * size
            if isWrite {
                var value: UInt32 = 0
                for b in 0..<size { value |= UInt32(item.load(fromByteOffset: b, as: UInt8.self)) << (8 * b) }
                target?.device.portWrite(offset: port &- target!.base, size: size, value: value)
            } else {
                let value = target?.device.portRead(offset: port &- target!.base, size: size) ?? 0xFFFF_FFFF
                for b in 0..<size { item.storeBytes(of: UInt8(truncatingIfNeeded: value >> (8 * b)), toByteOffset: b, as: UInt8.self) }
            }
        }
    }
}

public struct IOBusError: Error, CustomStringConvertible, Sendable {
    public let description: String
}
