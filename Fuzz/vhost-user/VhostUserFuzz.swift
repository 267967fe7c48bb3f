import FuzzSupport
import Glibc
@testable import VMMCore

/// A front-end's session with the vhost-user-net backend, as a sequence of operations:
///
/// - `0`: a message: 12 header bytes, then the payload (as long as the header says, up
///   to the codec's limit), then a byte whose value % 10 is the number of fds attached
///   (the RAM memfd for SET_MEM_TABLE, the dirty log's memfd (32 bytes, covering the
///   1 MiB of RAM) for SET_LOG_BASE, eventfds otherwise). Decoded by `VhostUserCodec`;
///   what decodes goes to `VhostUserNetBackend.handle`, whose errors reset the device
///   as a closed connection does.
/// - `1`: a guest write into the shared RAM: offset (u16), length (u8), bytes — rings
///   and descriptors for the datapath to walk.
/// - `2`: a frame waiting in the TAP, then a TX and an RX pass over every ring that runs.
///
/// Checked beyond "no crash": every message that decodes encodes to the same payload
/// bytes (but SET_MEM_TABLE's padding), and the backend reads and writes guest RAM only through the mapped table
/// (AddressSanitizer would flag a stray access; the fd holds 1 MiB, the table may
/// claim any addresses).
@main enum FuzzVhostUser {
    static func main() { runLibFuzzer(fuzz) }
}

/// The guest's RAM: one 1 MiB memfd (GuestMemory's minimum) shared with the backend's
/// mappings; the writes of operation 1 reach its first 64 KiB.
enum FuzzRAM {
    static let size = 1 << 20
    nonisolated(unsafe) static let memory: GuestMemory = try! GuestMemory(size: UInt64(size), backing: .memfd, shared: true, name: "fuzz-ram")
    /// SET_LOG_BASE's fd; its size and offset come from the input.
    nonisolated(unsafe) static let log = try! VhostDirtyLog(covering: memory)
}

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    var tap: [Int32] = [0, 0]
    guard socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue), 0, &tap) == 0 else { return 0 }
    _ = fcntl(tap[0], F_SETFL, O_NONBLOCK)
    _ = fcntl(tap[1], F_SETFL, O_NONBLOCK)
    defer { close(tap[1]) }
    let backend = try! VhostUserNetBackend(queuePairs: 1, tapFDs: [FileDescriptor(adopting: tap[0], label: "tap")], tapVnetHeader: true)
    let memory = FuzzRAM.memory
    try! memory.zero(at: 0, count: FuzzRAM.size)
    var operations = 0
    while !input.isAtEnd && operations < 64 {
        operations += 1
        switch input.u8() % 3 {
        case 0:
            let headerBytes = (0..<VhostUserCodec.headerSize).map { _ in input.u8() }
            guard let header = try? VhostUserCodec.decodeHeader(headerBytes) else { continue }
            let payload = (0..<Int(header.size)).map { _ in input.u8() }
            let fdCount = Int(input.u8() % 10)
            let fds: [FileDescriptor] = (0..<fdCount).map { _ in
                switch VhostUserRequest(rawValue: header.request) {
                case .setMemTable: try! memory.fd.duplicate()
                case .setLogBase: try! FuzzRAM.log.fd!.duplicate()
                default: try! EventFD().fd.take()
                }
            }
            guard let received = try? VhostUserCodec.decode(header: header, payload: payload, fds: fds) else { continue }
            let encoded = VhostUserCodec.encode(received.message)
            var significant = payload
            // SET_MEM_TABLE's padding word is ignored on decode and written as 0.
            if case .setMemTable = received.message { significant.replaceSubrange(4..<8, with: [0, 0, 0, 0]) }
            precondition(Array(encoded[VhostUserCodec.headerSize...]) == significant, "\(received.message) encodes to other bytes")
            precondition(encoded.prefix(4).elementsEqual(headerBytes.prefix(4)), "\(received.message) encodes to another request")
            do {
                _ = try backend.handle(received)
            } catch {
                backend.resetDevice()
            }
        case 1:
            let offset = Int(input.integer(UInt16.self))
            let bytes = (0..<Int(input.u8())).map { _ in input.u8() }
            let count = min(bytes.count, FuzzRAM.size - offset)
            if count > 0 { try! memory.write(bytes[..<count], at: UInt64(offset)) }
        default:
            let frame = [UInt8](repeating: 0, count: 12) + [UInt8](repeating: 0xFF, count: 6) + (0..<54).map { UInt8($0) }
            _ = send(tap[1], frame, frame.count, Int32(MSG_DONTWAIT))
            backend.transmit(pair: 0)
            backend.receive(pair: 0)
            var sink = [UInt8](repeating: 0, count: 2048)
            while recv(tap[1], &sink, sink.count, Int32(MSG_DONTWAIT)) > 0 {}
        }
    }
    backend.shutdown()
    return 0
}
