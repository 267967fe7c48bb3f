import CPU

/// A transmit buffer taken from a pair's queue, to be filled and sent.
struct TransmitSlot {
    let pair: Int
    let id: UInt16
    /// Where the Ethernet frame goes, right after the (all-zero) virtio-net header.
    let frame: UnsafeMutableRawPointer
}

/// The virtio-net device (virtio 1.x, 5.1), polled. Queue pair `p` is
/// receive queue 2p and transmit queue 2p+1 at the device and in
/// `net_queue_pages`; the control queue is device queue 2 * max_pairs and
/// the last page. Receive descriptor `i` of pair `p` always points at the
/// same buffer, so receiving never allocates and a buffer is re-posted as
/// soon as its frame has been handled.
enum VirtioNet {
    enum StartResult {
        case running
        case absent
        case failed(StaticString)
    }

    private static let vendor: UInt16 = 0x1af4
    private static let modernDevice: UInt16 = 0x1041
    private static let transitionalDevice: UInt16 = 0x1000

    private static let featureMAC: UInt64 = 1 << 5
    private static let featureStatus: UInt64 = 1 << 16
    private static let featureControlQueue: UInt64 = 1 << 17
    private static let featureMultiQueue: UInt64 = 1 << 22
    private static let featureVersion1: UInt64 = 1 << 32

    /// virtio_net_config offsets (5.1.4).
    private static let configMAC: UInt32 = 0
    private static let configStatus: UInt32 = 6
    private static let configMaxPairs: UInt32 = 8
    private static let configLengthWithPairs: UInt32 = 10
    private static let linkUp: UInt16 = 1

    /// With VERSION_1 the header is always 12 bytes (5.1.6); ours are all
    /// zero: no offloads were negotiated.
    static let headerLength = 12
    static let bufferSize = Int(NET_BUFFER_SIZE)
    /// The longest frame a buffer holds.
    static let maxFrameLength = bufferSize - headerLength

    private static let controlPage = Int(NET_QUEUE_PAGES) - 1
    private static let controlQueueSize: UInt16 = 4
    private static let controlClassMQ: UInt8 = 4
    private static let controlMQPairsSet: UInt8 = 0
    private static let controlOK: UInt8 = 0

    /// Used when the device has no MAC of its own (QEMU's default address).
    private static let fallbackMAC: UInt64 = 0x5634_1200_5452

    /// Queue pairs in use; 0 until the device runs.
    nonisolated(unsafe) private(set) static var pairs = 0
    /// The MAC address in wire order in the low six bytes.
    nonisolated(unsafe) private(set) static var mac: UInt64 = 0
    /// The device configuration's status field, when the device reports link state.
    nonisolated(unsafe) private static var statusAddress: UInt64 = 0

    nonisolated(unsafe) static var receivedFrames = InlineArray<8, UInt64>(repeating: 0)
    nonisolated(unsafe) static var sentFrames = InlineArray<8, UInt64>(repeating: 0)
    /// Receive completions that named no buffer of ours or a bad length.
    nonisolated(unsafe) static var badFrames: UInt64 = 0
    /// Frames not sent because every transmit descriptor was in flight.
    nonisolated(unsafe) static var sendDrops: UInt64 = 0

    /// Finds the device on PCI bus 0 and brings it up (virtio 1.x, 3.1.1).
    static func start() -> StartResult {
        guard let function = PCI.find(vendor: vendor, device: modernDevice, orDevice: transitionalDevice) else {
            return .absent
        }
        guard let transport = VirtioPCI(function) else {
            return .failed("no virtio 1.x capabilities")
        }
        guard transport.reset() else {
            return .failed("reset did not complete")
        }
        transport.status = VirtioPCI.acknowledge
        transport.status = VirtioPCI.acknowledge | VirtioPCI.driver

        let offered = transport.deviceFeatures()
        guard offered & featureVersion1 != 0 else {
            transport.status = 0
            return .failed("device lacks VERSION_1")
        }
        var accepted = featureVersion1 | offered & (featureMAC | featureStatus)
        let multiQueue = featureMultiQueue | featureControlQueue
        if offered & multiQueue == multiQueue && transport.deviceLength >= configLengthWithPairs {
            accepted |= multiQueue
        }
        transport.setDriverFeatures(accepted)
        let driverStatus = VirtioPCI.acknowledge | VirtioPCI.driver
        transport.status = driverStatus | VirtioPCI.featuresOK
        guard transport.status & VirtioPCI.featuresOK != 0 else {
            transport.status = 0
            return .failed("features not accepted")
        }

        var devicePairs: UInt16 = 1
        if accepted & featureMultiQueue != 0 {
            devicePairs = transport.readDevice16(configMaxPairs)
            // 0x8000 is allowed by the spec, but its control queue (0x10000) has no 16-bit number.
            guard devicePairs != 0 && devicePairs < 0x8000 else {
                transport.status = 0
                return .failed("bad max_virtqueue_pairs")
            }
        }
        let wantedPairs = min(Int(devicePairs), Int(NET_MAX_PAIRS))
        var pair = 0
        while pair < wantedPairs {
            let receive = Virtqueue(page: 2 * pair)
            let send = Virtqueue(page: 2 * pair + 1)
            guard transport.setUpQueue(UInt16(2 * pair), receive, size: UInt16(NET_RX_QUEUE_SIZE)),
                  transport.setUpQueue(UInt16(2 * pair + 1), send, size: UInt16(NET_TX_QUEUE_SIZE)) else {
                transport.status = 0
                return .failed("queue setup failed")
            }
            postReceiveBuffers(pair: pair, queue: receive)
            prepareTransmitBuffers(pair: pair, queue: send)
            pair += 1
        }
        let control = Virtqueue(page: controlPage)
        if accepted & featureMultiQueue != 0 {
            guard transport.setUpQueue(2 * devicePairs, control, size: controlQueueSize) else {
                transport.status = 0
                return .failed("control queue setup failed")
            }
        }

        if accepted & featureMAC != 0 && transport.deviceLength >= configMAC + 6 {
            var address: UInt64 = 0
            var index: UInt32 = 6
            while index > 0 {
                index -= 1
                address = address << 8 | UInt64(transport.readDevice8(configMAC + index))
            }
            mac = address
        } else {
            mac = fallbackMAC
        }
        if accepted & featureStatus != 0 && transport.deviceLength >= configStatus + 2 {
            statusAddress = transport.device &+ UInt64(configStatus)
        }

        transport.status = driverStatus | VirtioPCI.featuresOK | VirtioPCI.driverOK
        // Buffers posted before DRIVER_OK may go unnoticed until a notification.
        pair = 0
        while pair < wantedPairs {
            Virtqueue(page: 2 * pair).notify()
            pair += 1
        }
        pairs = 1
        if accepted & featureMultiQueue != 0 && setPairs(wantedPairs, control: control) {
            pairs = wantedPairs
        }
        return .running
    }

    /// Whether the device reports carrier; devices without the STATUS
    /// feature are taken to have it.
    static var hasCarrier: Bool {
        statusAddress == 0 || mmio_read16(statusAddress) & linkUp != 0
    }

    private static func receiveBuffer(pair: Int, id: Int) -> UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(memory_net_rx_buffers()!) + (pair &* Int(NET_RX_QUEUE_SIZE) &+ id) &* bufferSize
    }

    private static func transmitBuffer(pair: Int, id: Int) -> UnsafeMutableRawPointer {
        UnsafeMutableRawPointer(memory_net_tx_buffers()!) + (pair &* Int(NET_TX_QUEUE_SIZE) &+ id) &* bufferSize
    }

    private static func postReceiveBuffers(pair: Int, queue: Virtqueue) {
        let size = Int(queue.size)
        var id = 0
        while id < size {
            let buffer = UInt64(UInt(bitPattern: receiveBuffer(pair: pair, id: id)))
            queue.setDescriptor(id, address: buffer, length: UInt32(bufferSize), flags: Virtqueue.descriptorWrite)
            queue.post(UInt16(id))
            id += 1
        }
        queue.publish()
    }

    /// Points each transmit descriptor at its buffer for good; only the
    /// length changes per frame.
    private static func prepareTransmitBuffers(pair: Int, queue: Virtqueue) {
        let size = Int(queue.size)
        var id = 0
        while id < size {
            let pointer = transmitBuffer(pair: pair, id: id)
            // The header stays all zero from here on; the buffer may hold anything before.
            mem_zero(pointer, UInt64(headerLength))
            let buffer = UInt64(UInt(bitPattern: pointer))
            queue.setDescriptor(id, address: buffer, length: 0, flags: 0)
            id += 1
        }
        queue.fillFreeList()
    }

    /// VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (5.1.6.5.5): header, pair count and
    /// ack in the control page's scratch bytes, as one two-descriptor chain.
    private static func setPairs(_ count: Int, control: Virtqueue) -> Bool {
        let command = control.page + Virtqueue.scratchOffset
        let ack = command + 8
        command.storeBytes(of: controlClassMQ, as: UInt8.self)
        command.storeBytes(of: controlMQPairsSet, toByteOffset: 1, as: UInt8.self)
        command.storeBytes(of: UInt16(count), toByteOffset: 2, as: UInt16.self)
        ack.storeBytes(of: 0xff, as: UInt8.self)
        let address = UInt64(UInt(bitPattern: command))
        control.setDescriptor(0, address: address, length: 4, flags: Virtqueue.descriptorNext, next: 1)
        control.setDescriptor(1, address: address &+ 8, length: 1, flags: Virtqueue.descriptorWrite)
        control.post(0)
        control.publish()
        control.notify()
        let deadline = Clock.now() &+ Clock.ticksPerSecond
        while control.usedIndex() == control.lastUsed {
            if Clock.now() &- deadline < 1 << 63 {
                return false
            }
            cpu_pause()
        }
        control.lastUsed &+= 1
        return shared_load8(ack) == controlOK
    }

    /// Handles what arrived on every receive queue; true if anything did.
    /// This runs in every idle step, and each instruction costs about a
    /// microsecond here: the loop only compares used.idx with the last
    /// index seen, stepping from one receive queue page to the next.
    static func poll() -> Bool {
        let count = pairs
        guard count > 0 else { return false }
        let first = Virtqueue(page: 0).page
        let stride = 2 &* Int(NET_QUEUE_PAGE_SIZE)
        let end = first + count &* stride
        var page = first
        var busy = false
        repeat {
            let queue = Virtqueue(base: page)
            if queue.usedIndex() != queue.lastUsed {
                receive(pair: (page - first) / stride, queue: queue)
                busy = true
            }
            page += stride
        } while page != end
        return busy
    }

    /// Hands each completed buffer's frame to the network stack, re-posts
    /// the buffers and tells the device once for the whole batch.
    @inline(never)
    private static func receive(pair: Int, queue: Virtqueue) {
        let used = queue.usedIndex()
        var position = queue.lastUsed
        let size = UInt32(queue.size)
        var frames: UInt64 = 0
        while position != used {
            let (id, length) = queue.usedElement(position)
            position &+= 1
            frames &+= 1
            guard id < size else {
                badFrames &+= 1
                continue
            }
            if length > UInt32(headerLength) && length <= UInt32(bufferSize) {
                let frame = receiveBuffer(pair: pair, id: Int(id)) + headerLength
                Network.receive(frame, length: Int(length) &- headerLength, pair: pair)
            } else {
                badFrames &+= 1
            }
            queue.post(UInt16(truncatingIfNeeded: id))
        }
        queue.lastUsed = position
        queue.publish()
        queue.notify()
        receivedFrames[pair] &+= frames
    }

    /// A free transmit buffer of `pair`, or nil when all are in flight
    /// (the frame is then dropped, as a full NIC queue would).
    static func transmitSlot(pair: Int) -> TransmitSlot? {
        guard let id = Virtqueue(page: pair &* 2 &+ 1).takeFree() else {
            sendDrops &+= 1
            return nil
        }
        return TransmitSlot(pair: pair, id: id, frame: transmitBuffer(pair: pair, id: Int(id)) + headerLength)
    }

    /// Sends the first `length` bytes of the slot's frame.
    static func transmit(_ slot: TransmitSlot, length: Int) {
        let queue = Virtqueue(page: slot.pair &* 2 &+ 1)
        queue.setDescriptorLength(Int(slot.id), UInt32(truncatingIfNeeded: headerLength &+ length))
        queue.post(slot.id)
        queue.publish()
        queue.notify()
        sentFrames[slot.pair] &+= 1
    }
}
