import Synchronization

/// Why a virtqueue cannot be used; the device then needs a reset (virtio 1.x NEEDS_RESET).
public struct VirtqueueError: Error, CustomStringConvertible, Sendable, Equatable {
    public let description: String
}

/// A split virtqueue (virtio 1.x, 2.7) living in guest memory. Every index, address and
/// length the guest supplies is checked before use: a hostile or buggy guest gets an
/// error, never an out-of-bounds access or an endless loop.
public struct Virtqueue: Sendable {
    public static let descriptorNext: UInt16 = 1
    public static let descriptorWrite: UInt16 = 2
    public static let descriptorIndirect: UInt16 = 4

    /// One guest buffer of a chain.
    public struct Segment: Sendable, Equatable {
        public var address: UInt64
        public var length: UInt32
    }

    /// A descriptor chain taken from the available ring: the device reads `readable`
    /// (driver to device) and fills `writable` (device to driver).
    public struct Chain: Sendable, Equatable {
        public var head: UInt16
        public var readable: [Segment] = []
        public var writable: [Segment] = []
        public var writableLength: Int { writable.reduce(0) { $0 + Int($1.length) } }
        public var readableLength: Int { readable.reduce(0) { $0 + Int($1.length) } }
    }

    public let maxSize: UInt16
    public var size: UInt16
    public var ready = false
    public var descriptorTable: UInt64 = 0
    public var driverArea: UInt64 = 0
    public var deviceArea: UInt64 = 0
    /// The next available-ring entry the device will take.
    public var lastAvailable: UInt16 = 0
    /// The next used-ring index the device will publish.
    public var usedIndex: UInt16 = 0

    public init(maxSize: UInt16) {
        self.maxSize = maxSize
        size = maxSize
    }

    public mutating func reset() {
        self = Virtqueue(maxSize: maxSize)
    }

    /// Everything the device side knows about the queue, as saved: untrusted until
    /// `init(validating:)` (the rings themselves are in guest RAM).
    public struct State: Sendable, Equatable {
        public var size: UInt16
        public var ready: Bool
        public var descriptorTable: UInt64
        public var driverArea: UInt64
        public var deviceArea: UInt64
        public var lastAvailable: UInt16
        public var usedIndex: UInt16

        public init(size: UInt16, ready: Bool, descriptorTable: UInt64, driverArea: UInt64, deviceArea: UInt64,
                    lastAvailable: UInt16, usedIndex: UInt16) {
            (self.size, self.ready, self.descriptorTable, self.driverArea, self.deviceArea) = (size, ready, descriptorTable, driverArea, deviceArea)
            (self.lastAvailable, self.usedIndex) = (lastAvailable, usedIndex)
        }

        public func encode(into w: inout StreamWriter) {
            w.u16(size)
            w.bool(ready)
            w.u64(descriptorTable)
            w.u64(driverArea)
            w.u64(deviceArea)
            w.u16(lastAvailable)
            w.u16(usedIndex)
        }

        public init(decoding r: inout StreamReader) throws {
            size = try r.u16("queue size")
            ready = try r.bool("queue ready")
            descriptorTable = try r.u64("descriptor table")
            driverArea = try r.u64("driver area")
            deviceArea = try r.u64("device area")
            lastAvailable = try r.u16("last available index")
            usedIndex = try r.u16("used index")
        }
    }

    public var state: State {
        State(size: size, ready: ready, descriptorTable: descriptorTable, driverArea: driverArea, deviceArea: deviceArea,
              lastAvailable: lastAvailable, usedIndex: usedIndex)
    }

    /// A saved queue becomes a live one only through here (rust-vmm's `QueueState` →
    /// `Queue`): the size fits this device, and an enabled queue's rings lie in `memory`.
    public init(validating saved: State, maxSize: UInt16, memory: some GuestRAM) throws {
        guard saved.size <= maxSize else { throw StreamError("queue size \(saved.size) exceeds this device's maximum \(maxSize)") }
        self.init(maxSize: maxSize)
        size = saved.size
        ready = saved.ready
        descriptorTable = saved.descriptorTable
        driverArea = saved.driverArea
        deviceArea = saved.deviceArea
        lastAvailable = saved.lastAvailable
        usedIndex = saved.usedIndex
        if ready { try validateLayout(in: memory) }
    }

    /// Whether the driver has made buffers available that the device has not taken.
    public func hasAvailable(in memory: some GuestRAM) throws -> Bool {
        try availableIndex(memory) != lastAvailable
    }

    /// avail.idx, read with acquire ordering: the ring entries and descriptors it covers
    /// are read after it (virtio 1.x 2.7.13; the driver's release before its idx store
    /// pairs with this). x86 keeps loads in order, but the compiler need not.
    func availableIndex(_ memory: some GuestRAM) throws -> UInt16 {
        let index: UInt16
        do {
            index = try memory.loadLE(UInt16.self, at: guestAddress(driverArea, plus: 2))
        } catch {
            throw VirtqueueError(description: "available ring at \(hex(driverArea)) is outside guest RAM")
        }
        atomicMemoryFence(ordering: .acquiring)
        return index
    }

    /// Takes the next available chain, or nil when the ring is empty.
    public mutating func popAvailable(from memory: some GuestRAM) throws -> Chain? {
        guard ready else { return nil }
        let available = try availableIndex(memory)
        let pending = available &- lastAvailable
        guard pending != 0 else { return nil }
        guard pending <= size else {
            throw VirtqueueError(description: "available index \(available) is \(pending) entries ahead of \(lastAvailable), more than the queue size \(size)")
        }
        let slot = UInt64(lastAvailable % size)
        let head: UInt16
        do {
            head = try memory.loadLE(UInt16.self, at: guestAddress(driverArea, plus: 4 + 2 * slot))
        } catch {
            throw VirtqueueError(description: "available ring entry \(slot) is outside guest RAM")
        }
        let chain = try walkChain(head: head, memory: memory)
        lastAvailable &+= 1
        return chain
    }

    func walkChain(head: UInt16, memory: some GuestRAM) throws -> Chain {
        var chain = Chain(head: head)
        var table = descriptorTable
        var tableSize = size
        var index = head
        var visited = 0
        var inIndirect = false
        while true {
            guard index < tableSize else {
                throw VirtqueueError(description: "descriptor index \(index) out of range (table size \(tableSize))")
            }
            visited += 1
            guard visited <= Int(tableSize) else {
                throw VirtqueueError(description: "descriptor chain from head \(head) loops or is longer than \(tableSize)")
            }
            let address: UInt64, length: UInt32, flags: UInt16, next: UInt16
            do {
                let entry = try guestAddress(table, plus: 16 * UInt64(index))
                address = try memory.loadLE(UInt64.self, at: entry)
                length = try memory.loadLE(UInt32.self, at: entry + 8)
                flags = try memory.loadLE(UInt16.self, at: entry + 12)
                next = try memory.loadLE(UInt16.self, at: entry + 14)
            } catch {
                throw VirtqueueError(description: "descriptor \(index) of the table at \(hex(table)) is outside guest RAM")
            }
            if flags & Self.descriptorIndirect != 0 {
                guard !inIndirect else { throw VirtqueueError(description: "nested indirect descriptor table at \(hex(address))") }
                guard length % 16 == 0, length > 0, length / 16 <= 0xFFFF else {
                    throw VirtqueueError(description: "indirect table length \(length) is not a positive multiple of 16")
                }
                inIndirect = true
                table = address
                tableSize = UInt16(length / 16)
                index = 0
                visited = 0
                continue
            }
            do {
                _ = try memory.slice(at: address, count: Int(length))
            } catch {
                throw VirtqueueError(description: "descriptor \(index) buffer \(hex(address))+\(length) is outside guest RAM")
            }
            let segment = Segment(address: address, length: length)
            if flags & Self.descriptorWrite != 0 {
                chain.writable.append(segment)
            } else {
                guard chain.writable.isEmpty else {
                    throw VirtqueueError(description: "descriptor \(index) is device-readable after a device-writable one")
                }
                chain.readable.append(segment)
            }
            guard flags & Self.descriptorNext != 0 else { return chain }
            index = next
        }
    }

    /// Returns a chain to the driver with `length` bytes written into its writable part.
    public mutating func pushUsed(head: UInt16, length: UInt32, to memory: some GuestRAM) throws {
        let slot = UInt64(usedIndex % size)
        do {
            try memory.storeLE(UInt32(head), at: guestAddress(deviceArea, plus: 4 + 8 * slot))
            try memory.storeLE(length, at: guestAddress(deviceArea, plus: 8 + 8 * slot))
            usedIndex &+= 1
            // Release: the entry (and the buffer bytes written before this call) must be
            // visible before the index that hands them over (virtio 1.x 2.7.8). x86 keeps
            // stores in order, but the compiler need not.
            atomicMemoryFence(ordering: .releasing)
            try memory.storeLE(usedIndex, at: guestAddress(deviceArea, plus: 2))
        } catch {
            throw VirtqueueError(description: "used ring at \(hex(deviceArea)) is outside guest RAM")
        }
    }

    /// Checks the rings' placement when the driver enables the queue.
    public func validateLayout(in memory: some GuestRAM) throws {
        guard size > 0, size <= maxSize, size & (size - 1) == 0 else {
            throw VirtqueueError(description: "queue size \(size) must be a power of two no larger than \(maxSize)")
        }
        let areas: [(String, UInt64, Int, UInt64)] = [
            ("descriptor table", descriptorTable, 16 * Int(size), 16),
            ("available ring", driverArea, 6 + 2 * Int(size), 2),
            ("used ring", deviceArea, 6 + 8 * Int(size), 4),
        ]
        for (name, address, length, alignment) in areas {
            guard address % alignment == 0 else { throw VirtqueueError(description: "\(name) at \(hex(address)) is not \(alignment)-byte aligned") }
            do {
                _ = try memory.slice(at: address, count: length)
            } catch {
                throw VirtqueueError(description: "\(name) at \(hex(address))+\(length) is outside guest RAM")
            }
        }
        // The device writes the used ring. Over the available ring, each returned chain
        // would publish another available entry and the device would never run out of work.
        let usedRing = deviceArea..<deviceArea + UInt64(areas[2].2)
        for (name, address, length, _) in areas[..<2] where usedRing.overlaps(address..<address + UInt64(length)) {
            throw VirtqueueError(description: "used ring at \(hex(deviceArea))+\(areas[2].2) overlaps the \(name) at \(hex(address))+\(length)")
        }
    }
}

/// `base + offset` for a base the guest chose: past 2^64 is outside guest RAM like any
/// other bad address (an error for the caller to report), not an arithmetic trap.
private func guestAddress(_ base: UInt64, plus offset: UInt64) throws -> UInt64 {
    let (address, overflow) = base.addingReportingOverflow(offset)
    guard !overflow else { throw GuestMemoryError(description: "guest address \(hex(base)) + \(offset) is past 2^64") }
    return address
}
