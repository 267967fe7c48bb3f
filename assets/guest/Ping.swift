import CPU

/// The `ping` command: ICMP echo requests once a second, replies counted
/// and timed as busybox's ping does, summary in its words. While it runs
/// the NIC keeps being polled, so the guest still answers ARP and pings.
enum Ping {
    /// Echo identifier of our requests ("SG").
    private static let identifier: UInt16 = 0x5347
    private static let dataLength = 56
    private static let icmpLength = IPv4.icmpHeaderLength + dataLength
    private static let frameLength = Network.ethernetHeaderLength + IPv4.headerLength + icmpLength
    private static let interrupt: UInt8 = 0x03

    nonisolated(unsafe) private static var active = false
    nonisolated(unsafe) private static var target: UInt32 = 0
    nonisolated(unsafe) private static var transmitted = 0
    nonisolated(unsafe) private static var received = 0
    nonisolated(unsafe) private static var fastest: UInt64 = 0
    nonisolated(unsafe) private static var slowest: UInt64 = 0
    nonisolated(unsafe) private static var total: UInt64 = 0
    /// A request whose target had no MAC yet: sent when ARP answers.
    nonisolated(unsafe) private static var waiting = false
    nonisolated(unsafe) private static var waitingSequence: UInt16 = 0
    nonisolated(unsafe) private static var waitingStamp: UInt64 = 0
    /// One bit per sequence number: answered since it was last sent.
    nonisolated(unsafe) private static var answered = InlineArray<1024, UInt64>(repeating: 0)

    /// `count` requests (0: until ^C) to `destination`; after the last one,
    /// waits `timeout` seconds for a reply if none came at all, else about
    /// one second (busybox waits two round trips, at least a second).
    static func run(_ destination: UInt32, count: Int, timeout: UInt64) {
        guard Network.attach(), Network.isUp, Network.isOnLink(destination) else {
            Console.writeLine("ping: sendto: Network is unreachable")
            return
        }
        Console.write("PING ")
        Console.write(ipv4: destination)
        Console.write(" (")
        Console.write(ipv4: destination)
        Console.write("): ")
        Console.write(decimal: UInt64(dataLength))
        Console.writeLine(" data bytes")

        target = destination
        transmitted = 0
        received = 0
        fastest = ~0
        slowest = 0
        total = 0
        waiting = false
        active = true
        let second = Clock.ticksPerSecond
        var nextSend = Clock.now()
        var deadline: UInt64 = 0
        while true {
            let now = Clock.now()
            if count == 0 || transmitted < count {
                if Clock.hasPassed(nextSend, now: now) {
                    send(now: now)
                    nextSend = now &+ second
                    if transmitted == count {
                        deadline = now &+ (received == 0 ? timeout &* second : second)
                    }
                }
            } else if received >= count || Clock.hasPassed(deadline, now: now) {
                break
            }
            if Serial.read() == interrupt {
                break
            }
            Machine.idle()
        }
        active = false
        summary()
    }

    private static func send(now: UInt64) {
        let sequence = UInt16(truncatingIfNeeded: transmitted)
        transmitted += 1
        let word = Int(sequence >> 6)
        answered[word] &= ~(1 << UInt64(sequence & 63))
        if let mac = ARP.lookup(target) {
            transmitEcho(sequence, stamp: now, to: mac)
            // An unanswered previous request may mean the neighbour moved.
            if transmitted > 1 && !isAnswered(sequence &- 1) {
                ARP.resolve(target)
            }
        } else {
            waiting = true
            waitingSequence = sequence
            waitingStamp = now
            ARP.resolve(target)
        }
    }

    private static func isAnswered(_ sequence: UInt16) -> Bool {
        answered[Int(sequence >> 6)] & 1 << UInt64(sequence & 63) != 0
    }

    /// ARP learnt `address`: the request held back for it goes out now.
    static func resolved(_ address: UInt32, mac: UInt64) {
        guard active, waiting, address == target else { return }
        waiting = false
        transmitEcho(waitingSequence, stamp: waitingStamp, to: mac)
    }

    /// The send time rides in the first 8 data bytes, so a reply carries
    /// its own timestamp back.
    private static func transmitEcho(_ sequence: UInt16, stamp: UInt64, to mac: UInt64) {
        guard let slot = VirtioNet.transmitSlot(pair: 0) else { return }
        let frame = slot.frame
        Network.writeEthernetHeader(frame, destination: mac, type: Network.etherTypeIPv4)
        let packet = frame + Network.ethernetHeaderLength
        IPv4.writeHeader(packet, totalLength: IPv4.headerLength + icmpLength, destination: target,
                         identification: sequence)
        let icmp = packet + IPv4.headerLength
        icmp.storeBE32(0, 0x0800_0000)              // echo request, code 0, checksum 0 for now
        icmp.storeBE16(4, identifier)
        icmp.storeBE16(6, sequence)
        icmp.storeBytes(of: stamp, toByteOffset: 8, as: UInt64.self)
        mem_zero(icmp + 16, UInt64(dataLength - 8))
        icmp.storeBytes(of: Checksum.finish(Checksum.add(icmp, count: icmpLength)), toByteOffset: 2, as: UInt16.self)
        VirtioNet.transmit(slot, length: frameLength)
    }

    /// Counts and prints a reply to one of our requests; duplicates, and
    /// replies to requests never sent, are ignored.
    static func receiveReply(from source: UInt32, ttl: UInt8, icmp: UnsafeMutableRawPointer, length: Int) {
        guard active, source == target, length >= 16, icmp.loadBE16(4) == identifier else { return }
        let sequence = icmp.loadBE16(6)
        guard Int(sequence) < transmitted || transmitted > 0xffff, !isAnswered(sequence) else { return }
        answered[Int(sequence >> 6)] |= 1 << UInt64(sequence & 63)
        let stamp = icmp.loadUnaligned(fromByteOffset: 8, as: UInt64.self)
        let elapsed = Clock.microseconds(Clock.now() &- stamp)
        received += 1
        total &+= elapsed
        fastest = min(fastest, elapsed)
        slowest = max(slowest, elapsed)
        Console.write(decimal: UInt64(length))
        Console.write(" bytes from ")
        Console.write(ipv4: source)
        Console.write(": seq=")
        Console.write(decimal: UInt64(sequence))
        Console.write(" ttl=")
        Console.write(decimal: UInt64(ttl))
        Console.write(" time=")
        Console.write(milliseconds: elapsed)
        Console.writeLine(" ms")
    }

    private static func summary() {
        Console.write("\r\n--- ")
        Console.write(ipv4: target)
        Console.writeLine(" ping statistics ---")
        Console.write(decimal: UInt64(transmitted))
        Console.write(" packets transmitted, ")
        Console.write(decimal: UInt64(received))
        Console.write(" packets received, ")
        let lost = transmitted == 0 ? 0 : (transmitted - min(received, transmitted)) * 100 / transmitted
        Console.write(decimal: UInt64(lost))
        Console.writeLine("% packet loss")
        if received > 0 {
            Console.write("round-trip min/avg/max = ")
            Console.write(milliseconds: fastest)
            Console.write("/")
            Console.write(milliseconds: total / UInt64(received))
            Console.write("/")
            Console.write(milliseconds: slowest)
            Console.writeLine(" ms")
        }
    }
}
