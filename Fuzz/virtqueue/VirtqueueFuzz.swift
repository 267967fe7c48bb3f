import FuzzSupport
@testable import VMMCore

/// The split-virtqueue walker over guest memory the input controls. The input is the
/// queue's registers as a guest can program them through the transport (size, rings'
/// addresses, and the device's indices as a migration stream can set them), then the
/// image of guest RAM from address 0: descriptor tables, indirect tables, rings.
///
/// The guest controls all of it. The device pops chains and returns them until the ring
/// is empty or the walker reports an error (the device then needs a reset).
///
/// Beyond "no crash": every segment of every chain lies inside guest RAM and a chain has
/// no more segments than its tables have descriptors. The device uses a queue only after
/// `validateLayout` accepted it (at DRIVER_OK, at a later queue enable, on a migration
/// load); for such a queue the walk must also end. A layout it refuses is still walked
/// (a few chains), because the walker itself must never trap on what the guest wrote.
@main enum FuzzVirtqueue {
    static func main() { runLibFuzzer(fuzz) }
}

/// Small enough to clear every run; the walker's checks do not depend on the size.
let ramSize: UInt64 = 1 << 20
nonisolated(unsafe) let memory = try! GuestMemory(size: ramSize)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    var queue = Virtqueue(maxSize: 256)
    queue.size = input.integer()
    queue.descriptorTable = input.integer()
    queue.driverArea = input.integer()
    queue.deviceArea = input.integer()
    queue.lastAvailable = input.integer()
    queue.usedIndex = input.integer()
    queue.ready = input.u8() & 1 == 0
    let image = input.rest().prefix(Int(ramSize))
    let ram = try! memory.slice(at: 0, count: Int(ramSize))
    ram.initializeMemory(as: UInt8.self, repeating: 0)
    ram.copyBytes(from: image)

    let validated = (try? queue.validateLayout(in: memory)) != nil
    // Each pop consumes one available entry; more than 2^16 of them would mean the walk
    // does not end (the available index is 16 bits).
    for _ in 0...(validated ? 0x1_0000 : 16) {
        let chain: Virtqueue.Chain
        do {
            guard try queue.hasAvailable(in: memory), let popped = try queue.popAvailable(from: memory) else { return 0 }
            chain = popped
        } catch {
            return 0
        }
        for segment in chain.readable + chain.writable {
            precondition((try? memory.slice(at: segment.address, count: Int(segment.length))) != nil,
                         "segment \(segment) of chain \(chain.head) is outside guest RAM")
        }
        // At most the ring's table up to an indirect descriptor, then a whole indirect table.
        precondition(chain.readable.count + chain.writable.count <= Int(queue.size) + 0xFFFF, "chain \(chain.head) is longer than its tables")
        do {
            try queue.pushUsed(head: chain.head, length: UInt32(truncatingIfNeeded: chain.writableLength), to: memory)
        } catch {
            return 0
        }
    }
    precondition(!validated, "the device took more than 65536 chains from one ring")
    return 0
}
