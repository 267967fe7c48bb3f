/// ICMP echo packets (RFC 792), built and parsed without a socket so that they can be
/// tested without privileges.
enum ICMPEcho {
    static let echoRequest: UInt8 = 8
    static let echoReply: UInt8 = 0
    static let headerSize = 8

    struct Reply: Equatable {
        var identifier: UInt16
        var sequence: UInt16
        var payload: [UInt8]
    }

    /// Type, code, checksum, identifier and sequence (both big-endian), then the payload.
    static func request(identifier: UInt16, sequence: UInt16, payload: [UInt8]) -> [UInt8] {
        var packet: [UInt8] = [echoRequest, 0, 0, 0]
        packet += [UInt8(identifier >> 8), UInt8(identifier & 0xff), UInt8(sequence >> 8), UInt8(sequence & 0xff)]
        packet += payload
        let sum = checksum(packet)
        packet[2] = UInt8(sum >> 8)
        packet[3] = UInt8(sum & 0xff)
        return packet
    }

    /// The Internet checksum: ones' complement of the ones' complement sum of 16-bit words.
    static func checksum<C: Collection<UInt8>>(_ bytes: C) -> UInt16 {
        var sum: UInt32 = 0
        var iterator = bytes.makeIterator()
        while let high = iterator.next() {
            let low = iterator.next() ?? 0
            sum += UInt32(high) << 8 | UInt32(low)
        }
        while sum >> 16 != 0 { sum = (sum & 0xffff) + (sum >> 16) }
        return ~UInt16(sum)
    }

    /// An echo reply from a datagram, or nil for anything else. Raw sockets deliver the
    /// IPv4 header first (`hasIPHeader`); ICMP datagram sockets do not.
    static func parseReply(_ datagram: UnsafeRawBufferPointer, hasIPHeader: Bool) -> Reply? {
        var offset = 0
        if hasIPHeader {
            guard datagram.count >= 20, datagram[0] >> 4 == 4 else { return nil }
            offset = Int(datagram[0] & 0x0f) * 4
        }
        guard datagram.count >= offset + headerSize, datagram[offset] == echoReply, datagram[offset + 1] == 0 else {
            return nil
        }
        let identifier = UInt16(datagram[offset + 4]) << 8 | UInt16(datagram[offset + 5])
        let sequence = UInt16(datagram[offset + 6]) << 8 | UInt16(datagram[offset + 7])
        return Reply(identifier: identifier, sequence: sequence, payload: Array(datagram[(offset + headerSize)...]))
    }
}
