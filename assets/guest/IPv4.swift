import CPU

/// IPv4 and the part of ICMP the guest speaks: it answers echo requests
/// and hands echo replies to `Ping`. Everything else is ignored.
enum IPv4 {
    static let headerLength = 20
    private static let protocolICMP: UInt8 = 1
    private static let echoReply: UInt8 = 0
    private static let echoRequest: UInt8 = 8
    static let icmpHeaderLength = 8
    /// Version 4, header length 5 words, no TOS.
    private static let versionAndLength: UInt16 = 0x4500
    /// TTL 64, protocol ICMP.
    private static let ttlAndICMP: UInt16 = 0x4001

    /// Checks every length against the bytes actually received before
    /// reading past the Ethernet header.
    static func receive(_ frame: UnsafeMutableRawPointer, length: Int, pair: Int) {
        let available = length &- Network.ethernetHeaderLength
        guard available >= headerLength, frame.loadMAC(0) == VirtioNet.mac else { return }
        let packet = frame + Network.ethernetHeaderLength
        let first = packet.load(as: UInt8.self)
        let optionsLength = Int(first & 0x0f) &* 4
        let totalLength = Int(packet.loadBE16(2))
        guard first >> 4 == 4, optionsLength >= headerLength,
              totalLength >= optionsLength &+ icmpHeaderLength, totalLength <= available,
              packet.loadBE16(6) & 0x3fff == 0,                 // neither a fragment nor fragmented
              packet.load(fromByteOffset: 9, as: UInt8.self) == protocolICMP,
              packet.loadBE32(16) == Network.address,
              Checksum.finish(Checksum.add(packet, count: optionsLength)) == 0 else { return }
        let source = packet.loadBE32(12)
        let icmp = packet + optionsLength
        let icmpLength = totalLength &- optionsLength
        switch icmp.load(as: UInt8.self) {
        case echoRequest:
            answerEcho(frame, source: source, icmp: icmp, length: icmpLength, pair: pair)
        case echoReply:
            Ping.receiveReply(from: source, ttl: packet.load(fromByteOffset: 8, as: UInt8.self),
                              icmp: icmp, length: icmpLength)
        default:
            return
        }
    }

    /// Echoes the request back to the sender's MAC on the same queue pair:
    /// a fresh IP header without options, the ICMP message copied with its
    /// type changed and its checksum adjusted to match.
    private static func answerEcho(_ request: UnsafeMutableRawPointer, source: UInt32,
                                   icmp: UnsafeMutableRawPointer, length: Int, pair: Int) {
        guard let slot = VirtioNet.transmitSlot(pair: pair) else { return }
        let frame = slot.frame
        Network.writeEthernetHeader(frame, destination: request.loadMAC(6), type: Network.etherTypeIPv4)
        let packet = frame + Network.ethernetHeaderLength
        writeHeader(packet, totalLength: headerLength &+ length, destination: source, identification: 0)
        let reply = packet + headerLength
        mem_copy(reply, icmp, UInt64(length))
        let oldWord = reply.loadUnaligned(as: UInt16.self)
        reply.storeBytes(of: echoReply, as: UInt8.self)
        let checksum = reply.loadUnaligned(fromByteOffset: 2, as: UInt16.self)
        let updated = Checksum.update(checksum, old: oldWord, new: reply.loadUnaligned(as: UInt16.self))
        reply.storeBytes(of: updated, toByteOffset: 2, as: UInt16.self)
        VirtioNet.transmit(slot, length: Network.ethernetHeaderLength &+ headerLength &+ length)
    }

    /// A 20-byte header from eth0's address to `destination`, TTL 64, ICMP.
    static func writeHeader(_ packet: UnsafeMutableRawPointer, totalLength: Int, destination: UInt32,
                            identification: UInt16) {
        packet.storeBE16(0, versionAndLength)
        packet.storeBE16(2, UInt16(truncatingIfNeeded: totalLength))
        packet.storeBE16(4, identification)
        packet.storeBE16(6, 0)
        packet.storeBE16(8, ttlAndICMP)
        packet.storeBE16(10, 0)
        packet.storeBE32(12, Network.address)
        packet.storeBE32(16, destination)
        packet.storeBytes(of: Checksum.finish(Checksum.add(packet, count: headerLength)),
                          toByteOffset: 10, as: UInt16.self)
    }
}
