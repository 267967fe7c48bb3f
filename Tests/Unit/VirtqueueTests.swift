import Testing
@testable import VMMCore

/// A split ring laid out in real guest memory, written the way a driver would.
struct FakeDriverRing {
    let memory: GuestMemory
    var queue: Virtqueue
    var availableIndex: UInt16 = 0
    let size: UInt16

    init(size: UInt16 = 8) throws {
        memory = try GuestMemory(size: 2 << 20)
        self.size = size
        queue = Virtqueue(maxSize: 256)
        queue.size = size
        queue.descriptorTable = 0x1000
        queue.driverArea = 0x2000
        queue.deviceArea = 0x3000
        queue.ready = true
    }

    func setDescriptor(_ index: UInt16, address: UInt64, length: UInt32, flags: UInt16 = 0, next: UInt16 = 0, table: UInt64 = 0x1000) throws {
        let entry = table + 16 * UInt64(index)
        try memory.store(address, at: entry)
        try memory.store(length, at: entry + 8)
        try memory.store(flags, at: entry + 12)
        try memory.store(next, at: entry + 14)
    }

    mutating func makeAvailable(_ head: UInt16) throws {
        try memory.store(head, at: 0x2000 + 4 + 2 * UInt64(availableIndex % size))
        availableIndex &+= 1
        try memory.store(availableIndex, at: 0x2002)
    }
}

@Suite struct VirtqueueTests {
    @Test func popsAChainWithReadableThenWritableParts() throws {
        var ring = try FakeDriverRing()
        try ring.setDescriptor(0, address: 0x10000, length: 12, flags: Virtqueue.descriptorNext, next: 3)
        try ring.setDescriptor(3, address: 0x11000, length: 100, flags: Virtqueue.descriptorNext | Virtqueue.descriptorWrite, next: 5)
        try ring.setDescriptor(5, address: 0x12000, length: 200, flags: Virtqueue.descriptorWrite)
        try ring.makeAvailable(0)
        #expect(try ring.queue.hasAvailable(in: ring.memory))
        let chain = try #require(try ring.queue.popAvailable(from: ring.memory))
        #expect(chain.head == 0)
        #expect(chain.readable == [.init(address: 0x10000, length: 12)])
        #expect(chain.writableLength == 300)
        #expect(try ring.queue.popAvailable(from: ring.memory) == nil)
        try ring.queue.pushUsed(head: chain.head, length: 42, to: ring.memory)
        #expect(try ring.memory.load(UInt16.self, at: 0x3002) == 1)
        #expect(try ring.memory.load(UInt32.self, at: 0x3004) == 0)
        #expect(try ring.memory.load(UInt32.self, at: 0x3008) == 42)
    }

    @Test func indicesWrapAroundSixteenBits() throws {
        var ring = try FakeDriverRing(size: 4)
        ring.availableIndex = 0xFFFE
        ring.queue.lastAvailable = 0xFFFE
        ring.queue.usedIndex = 0xFFFE
        try ring.setDescriptor(1, address: 0x10000, length: 8)
        for _ in 0..<4 {
            try ring.makeAvailable(1)
            let chain = try #require(try ring.queue.popAvailable(from: ring.memory))
            try ring.queue.pushUsed(head: chain.head, length: 8, to: ring.memory)
        }
        #expect(ring.queue.lastAvailable == 2)
        #expect(try ring.memory.load(UInt16.self, at: 0x3002) == 2)
    }

    @Test func followsIndirectTables() throws {
        var ring = try FakeDriverRing()
        try ring.setDescriptor(0, address: 0x10000, length: 10, flags: Virtqueue.descriptorNext, next: 1, table: 0x8000)
        try ring.setDescriptor(1, address: 0x11000, length: 20, flags: Virtqueue.descriptorWrite, table: 0x8000)
        try ring.setDescriptor(2, address: 0x8000, length: 32, flags: Virtqueue.descriptorIndirect)
        try ring.makeAvailable(2)
        let chain = try #require(try ring.queue.popAvailable(from: ring.memory))
        #expect(chain.readableLength == 10 && chain.writableLength == 20)
    }

    @Test(arguments: [
        "loop", "index", "address", "order", "ahead", "indirectLength", "nestedIndirect", "wrapAddress",
    ])
    func rejectsMisbehavingDrivers(_ kind: String) throws {
        var ring = try FakeDriverRing()
        switch kind {
        case "loop":
            try ring.setDescriptor(0, address: 0x10000, length: 8, flags: Virtqueue.descriptorNext, next: 1)
            try ring.setDescriptor(1, address: 0x10000, length: 8, flags: Virtqueue.descriptorNext, next: 0)
            try ring.makeAvailable(0)
        case "index":
            try ring.makeAvailable(200)
        case "address":
            try ring.setDescriptor(0, address: 0x1F_FFF0, length: 64)
            try ring.makeAvailable(0)
        case "order":
            try ring.setDescriptor(0, address: 0x10000, length: 8, flags: Virtqueue.descriptorNext | Virtqueue.descriptorWrite, next: 1)
            try ring.setDescriptor(1, address: 0x11000, length: 8)
            try ring.makeAvailable(0)
        case "ahead":
            try ring.memory.store(UInt16(100), at: 0x2002)
        case "indirectLength":
            try ring.setDescriptor(0, address: 0x8000, length: 17, flags: Virtqueue.descriptorIndirect)
            try ring.makeAvailable(0)
        case "nestedIndirect":
            try ring.setDescriptor(0, address: 0x9000, length: 16, flags: Virtqueue.descriptorIndirect, table: 0x8000)
            try ring.setDescriptor(1, address: 0x8000, length: 16, flags: Virtqueue.descriptorIndirect)
            try ring.makeAvailable(1)
        default:  // wrapAddress
            try ring.setDescriptor(0, address: UInt64.max - 4, length: 64)
            try ring.makeAvailable(0)
        }
        #expect(throws: VirtqueueError.self) { try ring.queue.popAvailable(from: ring.memory) }
    }

    @Test func validatesRingLayout() throws {
        var ring = try FakeDriverRing()
        try ring.queue.validateLayout(in: ring.memory)
        ring.queue.size = 6
        #expect(throws: VirtqueueError.self) { try ring.queue.validateLayout(in: ring.memory) }
        ring.queue.size = 8
        ring.queue.deviceArea = 0x3002
        #expect(throws: VirtqueueError.self) { try ring.queue.validateLayout(in: ring.memory) }
        ring.queue.deviceArea = 0x1F_FFF0
        #expect(throws: VirtqueueError.self) { try ring.queue.validateLayout(in: ring.memory) }
    }
}

@Suite struct PCIConfigSpaceTests {
    @Test func barSizingFollowsTheProbeProtocol() {
        var config = PCIConfigSpace(vendor: 0x1AF4, device: 0x1041, classCode: 0x020000)
        config.addBAR(0, size: 0x8000)
        config.write(offset: 0x10, size: 4, value: 0xFFFF_FFFF)
        #expect(config.read(offset: 0x10, size: 4) == 0xFFFF_8000)
        #expect(config.barAddress(0) == 0xFFFF_8000)
        let changed = config.write(offset: 0x10, size: 4, value: 0xE000_0000)
        #expect(changed == [0])
        #expect(config.barAddress(0) == 0xE000_0000)
        config.addBAR(2, size: 0x4000, is64Bit: true)
        config.write(offset: 0x1C, size: 4, value: 0x1)
        config.write(offset: 0x18, size: 4, value: 0x2000_0000)
        #expect(config.barAddress(2) == 0x1_2000_0000)
    }

    @Test func readOnlyFieldsIgnoreWritesAndCapabilitiesChain() {
        var config = PCIConfigSpace(vendor: 0x1AF4, device: 0x1041, classCode: 0x020000)
        config.write(offset: 0x00, size: 4, value: 0)
        #expect(config.read(offset: 0x00, size: 2) == 0x1AF4)
        let first = config.addCapability(id: 0x09, body: [16, 1, 0, 0, 0, 0] + [UInt8](repeating: 0, count: 8))
        let second = config.addCapability(id: 0x11, body: [0, 0] + [UInt8](repeating: 0, count: 8))
        #expect(config.read(offset: 0x34, size: 1) == UInt32(first))
        #expect(config.read(offset: first + 1, size: 1) == UInt32(second))
        #expect(config.read(offset: 0x06, size: 2) & 0x10 != 0)
        #expect(config.read(offset: 0x100, size: 4) == 0xFFFF_FFFF)
        config.write(offset: 0x04, size: 2, value: 0xFFFF)
        #expect(config.command == 0x0407)
    }
}
