/// ARP for IPv4 over Ethernet (RFC 826): answers requests for eth0's
/// address and keeps a small cache of neighbours for `ping`. Answers to
/// other traffic need no cache: they go back to the sender's MAC.
enum ARP {
    private static let frameLength = 42
    private static let request: UInt16 = 1
    private static let reply: UInt16 = 2
    /// Hardware type 1 (Ethernet) and protocol 0x0800 (IPv4), then hardware
    /// length 6 and protocol length 4: the fixed start of every ARP packet we handle.
    private static let ethernetIPv4: UInt32 = 0x0001_0800
    private static let addressLengths: UInt16 = 0x0604

    private static let cacheSize = 8
    nonisolated(unsafe) private static var cachedAddresses = InlineArray<8, UInt32>(repeating: 0)
    nonisolated(unsafe) private static var cachedMACs = InlineArray<8, UInt64>(repeating: 0)
    nonisolated(unsafe) private static var nextVictim = 0

    static func lookup(_ address: UInt32) -> UInt64? {
        var index = 0
        while index < cacheSize {
            if cachedAddresses[index] == address && address != 0 {
                return cachedMACs[index]
            }
            index += 1
        }
        return nil
    }

    /// Records or refreshes a neighbour; the oldest insertion makes room.
    private static func learn(_ address: UInt32, mac: UInt64) {
        var index = 0
        while index < cacheSize {
            if cachedAddresses[index] == address {
                cachedMACs[index] = mac
                return
            }
            index += 1
        }
        cachedAddresses[nextVictim] = address
        cachedMACs[nextVictim] = mac
        nextVictim = (nextVictim + 1) % cacheSize
    }

    static func receive(_ frame: UnsafeMutableRawPointer, length: Int, pair: Int) {
        guard length >= frameLength,
              frame.loadBE32(14) == ethernetIPv4, frame.loadBE16(18) == addressLengths,
              frame.loadBE32(38) == Network.address else { return }
        let operation = frame.loadBE16(20)
        let senderMAC = frame.loadMAC(22)
        let senderAddress = frame.loadBE32(28)
        // A sender without an address (duplicate-address probe) teaches nothing.
        if senderAddress != 0 {
            learn(senderAddress, mac: senderMAC)
        }
        if operation == request {
            send(reply, to: senderMAC, address: senderAddress, pair: pair)
        } else if operation == reply {
            Ping.resolved(senderAddress, mac: senderMAC)
        }
    }

    /// Broadcasts a request for `address` on the first queue pair.
    static func resolve(_ address: UInt32) {
        send(request, to: Network.broadcastMAC, address: address, pair: 0)
    }

    private static func send(_ operation: UInt16, to mac: UInt64, address: UInt32, pair: Int) {
        guard let slot = VirtioNet.transmitSlot(pair: pair) else { return }
        let frame = slot.frame
        Network.writeEthernetHeader(frame, destination: mac, type: Network.etherTypeARP)
        frame.storeBE32(14, ethernetIPv4)
        frame.storeBE16(18, addressLengths)
        frame.storeBE16(20, operation)
        frame.storeMAC(22, VirtioNet.mac)
        frame.storeBE32(28, Network.address)
        frame.storeMAC(32, operation == request ? 0 : mac)
        frame.storeBE32(38, address)
        VirtioNet.transmit(slot, length: frameLength)
    }
}
