/// Guest physical memory as a virtqueue sees it: bytes by guest address, inside one
/// region or an error, and a record of what the device wrote (for a dirty log). The VMM's
/// `GuestMemory` and a vhost-user backend's `VhostUserMemoryTable` (the front-end's
/// regions mapped from their fds) both are one, so both run the same bounds-checked `Virtqueue`.
public protocol GuestRAM: AnyObject, Sendable {
    /// The host bytes behind `[address, address + count)`, which must lie inside one region.
    func slice(at address: UInt64, count: Int) throws -> UnsafeMutableRawBufferPointer
    /// Records a device write into guest RAM by its host bytes.
    func markDirty(_ bytes: UnsafeMutableRawBufferPointer)
}

extension GuestRAM {
    func storeLE<T: FixedWidthInteger>(_ value: T, at address: UInt64) throws {
        let target = try slice(at: address, count: MemoryLayout<T>.size)
        target.storeBytes(of: value.littleEndian, as: T.self)
        markDirty(target)
    }

    func loadLE<T: FixedWidthInteger>(_ type: T.Type, at address: UInt64) throws -> T {
        T(littleEndian: try slice(at: address, count: MemoryLayout<T>.size).loadUnaligned(as: T.self))
    }
}

extension GuestMemory: GuestRAM {}
