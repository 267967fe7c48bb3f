import CPU

/// A split virtqueue living in one page of `net_queue_pages` (dma.S):
///
///     0x000  descriptor table, 16 bytes per entry (16-byte aligned)
///     0x400  available ring: flags, idx, ring[size], used_event
///     0x800  used ring: flags, idx, ring[size] of {id, len}, avail_event
///     0xc00  the driver's bookkeeping (fields below)
///     0xe00  scratch bytes for control commands
///
/// The page is cleared when the queue is set up (RAM outside .bss may hold
/// anything, e.g. a reused RAM file); it is the only state a queue has, so it
/// carries over with guest memory (e.g. across a migration).
struct Virtqueue {
    static let descriptorNext: UInt16 = 1
    static let descriptorWrite: UInt16 = 2

    private static let availOffset = 0x400
    private static let usedOffset = 0x800
    private static let notifyField = 0xc00         // UInt64: notification address
    private static let sizeField = 0xc08           // UInt16: descriptors in use (a power of two)
    private static let indexField = 0xc0a          // UInt16: the queue's number at the device
    private static let nextAvailField = 0xc0c      // UInt16: next avail.idx to publish
    private static let lastUsedField = 0xc0e       // UInt16: used.idx already consumed
    private static let freeCountField = 0xc10      // UInt16: entries on the free list
    private static let freeListField = 0xc20       // UInt8 each: free descriptor ids
    static let scratchOffset = 0xe00

    let page: UnsafeMutableRawPointer

    init(page number: Int) {
        page = UnsafeMutableRawPointer(memory_net_queue_pages()!) + number &* Int(NET_QUEUE_PAGE_SIZE)
    }

    init(base: UnsafeMutableRawPointer) {
        page = base
    }

    var physicalAddress: UInt64 { UInt64(UInt(bitPattern: page)) }

    /// Empty rings and bookkeeping, before the device is told where they are.
    func clear() {
        mem_zero(page, UInt64(NET_QUEUE_PAGE_SIZE))
    }
    var availAddress: UInt64 { physicalAddress &+ UInt64(Virtqueue.availOffset) }
    var usedAddress: UInt64 { physicalAddress &+ UInt64(Virtqueue.usedOffset) }

    var notifyAddress: UInt64 {
        get { page.load(fromByteOffset: Virtqueue.notifyField, as: UInt64.self) }
        nonmutating set { page.storeBytes(of: newValue, toByteOffset: Virtqueue.notifyField, as: UInt64.self) }
    }

    var size: UInt16 {
        get { page.load(fromByteOffset: Virtqueue.sizeField, as: UInt16.self) }
        nonmutating set { page.storeBytes(of: newValue, toByteOffset: Virtqueue.sizeField, as: UInt16.self) }
    }

    var index: UInt16 {
        get { page.load(fromByteOffset: Virtqueue.indexField, as: UInt16.self) }
        nonmutating set { page.storeBytes(of: newValue, toByteOffset: Virtqueue.indexField, as: UInt16.self) }
    }

    var nextAvail: UInt16 {
        get { page.load(fromByteOffset: Virtqueue.nextAvailField, as: UInt16.self) }
        nonmutating set { page.storeBytes(of: newValue, toByteOffset: Virtqueue.nextAvailField, as: UInt16.self) }
    }

    var lastUsed: UInt16 {
        get { page.load(fromByteOffset: Virtqueue.lastUsedField, as: UInt16.self) }
        nonmutating set { page.storeBytes(of: newValue, toByteOffset: Virtqueue.lastUsedField, as: UInt16.self) }
    }

    private var freeCount: UInt16 {
        get { page.load(fromByteOffset: Virtqueue.freeCountField, as: UInt16.self) }
        nonmutating set { page.storeBytes(of: newValue, toByteOffset: Virtqueue.freeCountField, as: UInt16.self) }
    }

    func setDescriptor(_ id: Int, address: UInt64, length: UInt32, flags: UInt16, next: UInt16 = 0) {
        let entry = page + id &* 16
        entry.storeBytes(of: address, as: UInt64.self)
        entry.storeBytes(of: length, toByteOffset: 8, as: UInt32.self)
        entry.storeBytes(of: flags, toByteOffset: 12, as: UInt16.self)
        entry.storeBytes(of: next, toByteOffset: 14, as: UInt16.self)
    }

    func setDescriptorLength(_ id: Int, _ length: UInt32) {
        page.storeBytes(of: length, toByteOffset: id &* 16 &+ 8, as: UInt32.self)
    }

    /// Queues descriptor chain `id` in the available ring; the device sees
    /// it once `publish()` writes the index.
    func post(_ id: UInt16) {
        let next = nextAvail
        let slot = Int(next & (size &- 1))
        page.storeBytes(of: id, toByteOffset: Virtqueue.availOffset &+ 4 &+ slot &* 2, as: UInt16.self)
        nextAvail = next &+ 1
    }

    /// Makes everything posted so far visible to the device: a release store
    /// of avail.idx after the ring entries and descriptors (virtio 1.x 2.7.13).
    func publish() {
        shared_store16_release(page + Virtqueue.availOffset + 2, nextAvail)
    }

    /// Tells the device to look at the queue: one MMIO exit.
    func notify() {
        mmio_write16(notifyAddress, index)
    }

    /// The device's used.idx, read once per poll with acquire ordering: the
    /// entries up to it, and the bytes the device wrote, are read after it.
    func usedIndex() -> UInt16 {
        shared_load16_acquire(page + Virtqueue.usedOffset + 2)
    }

    /// Used ring entry `position` (a free-running index): the descriptor
    /// id and the bytes the device wrote. Both are the device's word and
    /// must be checked before use.
    func usedElement(_ position: UInt16) -> (id: UInt32, length: UInt32) {
        let entry = page + Virtqueue.usedOffset + 4 + Int(position & (size &- 1)) &* 8
        return (entry.load(as: UInt32.self), entry.load(fromByteOffset: 4, as: UInt32.self))
    }

    /// Puts descriptors 0..<size on the free list (transmit queues).
    func fillFreeList() {
        var id: UInt16 = 0
        while id < size {
            page.storeBytes(of: UInt8(truncatingIfNeeded: id), toByteOffset: Virtqueue.freeListField &+ Int(id), as: UInt8.self)
            id &+= 1
        }
        freeCount = size
    }

    /// Takes a free descriptor, first collecting what the device has
    /// finished with when none is left; nil when all are in flight.
    func takeFree() -> UInt16? {
        var count = freeCount
        if count == 0 {
            reclaim()
            count = freeCount
            if count == 0 {
                return nil
            }
        }
        count &-= 1
        freeCount = count
        return UInt16(page.load(fromByteOffset: Virtqueue.freeListField &+ Int(count), as: UInt8.self))
    }

    /// Returns completed descriptors to the free list. Ids out of range,
    /// or more completions than descriptors, are ignored: a confused
    /// device must not make the list overflow.
    private func reclaim() {
        let used = usedIndex()
        var position = lastUsed
        var count = freeCount
        let size = self.size
        while position != used {
            let id = usedElement(position).id
            position &+= 1
            if id < UInt32(size) && count < size {
                page.storeBytes(of: UInt8(truncatingIfNeeded: id), toByteOffset: Virtqueue.freeListField &+ Int(count), as: UInt8.self)
                count &+= 1
            }
        }
        lastUsed = position
        freeCount = count
    }
}
