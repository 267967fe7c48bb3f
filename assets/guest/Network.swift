/// The one network interface, eth0: its address, its state, and where
/// received frames go. The NIC is started on first use rather than at
/// boot, which keeps boot-to-prompt at the UART's exits alone.
enum Network {
    enum Device {
        case unprobed
        case absent
        case running
    }

    static let etherTypeIPv4: UInt16 = 0x0800
    static let etherTypeARP: UInt16 = 0x0806
    static let ethernetHeaderLength = 14
    static let broadcastMAC: UInt64 = 0xffff_ffff_ffff

    nonisolated(unsafe) private(set) static var device = Device.unprobed
    /// The interface address (host byte order), 0 when none is set.
    nonisolated(unsafe) static var address: UInt32 = 0
    nonisolated(unsafe) static var prefixLength: UInt32 = 0
    /// Administratively up (`ip link set eth0 up`); down drops everything received.
    nonisolated(unsafe) static var isUp = false

    /// Probes and starts the NIC the first time; whether eth0 exists.
    static func attach() -> Bool {
        if case .unprobed = device {
            switch VirtioNet.start() {
            case .running:
                device = .running
            case .absent:
                device = .absent
            case .failed(let reason):
                Console.write("eth0: virtio-net: ")
                Console.writeLine(reason)
                device = .absent
            }
        }
        if case .running = device {
            return true
        }
        return false
    }

    /// One poll of every receive queue; true if any frame arrived.
    @inline(__always)
    static func poll() -> Bool {
        if case .running = device {
            return VirtioNet.poll()
        }
        return false
    }

    /// Whether `destination` is on eth0's subnet, i.e. reachable without a router.
    static func isOnLink(_ destination: UInt32) -> Bool {
        let mask: UInt32 = prefixLength == 0 ? 0 : ~0 << (32 - prefixLength)
        return address != 0 && destination & mask == address & mask
    }

    /// Dispatches one received Ethernet frame of `length` bytes (already
    /// bounded by the buffer size). `pair` is the queue pair it came on,
    /// where any answer goes back out.
    static func receive(_ frame: UnsafeMutableRawPointer, length: Int, pair: Int) {
        guard isUp, address != 0, length >= ethernetHeaderLength else { return }
        switch frame.loadBE16(12) {
        case etherTypeIPv4:
            IPv4.receive(frame, length: length, pair: pair)
        case etherTypeARP:
            ARP.receive(frame, length: length, pair: pair)
        default:
            return
        }
    }

    static func writeEthernetHeader(_ frame: UnsafeMutableRawPointer, destination: UInt64, type: UInt16) {
        frame.storeMAC(0, destination)
        frame.storeMAC(6, VirtioNet.mac)
        frame.storeBE16(12, type)
    }
}
