import FuzzSupport
import Glibc
import Logging
@testable import VMMCore

/// virtio-net's use of the chains a guest posts: TX (reads the header and frame, writes
/// them to the backend), RX (fills writable buffers from the backend) and the control
/// queue (reads a command, writes the ack), behind the PCI transport as a guest driver
/// sets it up. The backend is a socketpair per queue pair, standing in for the TAP.
///
/// Input: a flags byte (bit 0: the backend has the vnet header), a count and that many
/// action bytes (bit 7 set: a frame arrives on pair `action % 2`; else: the driver
/// notifies queue `action % 5`), then guest RAM from address 0. Queue q's ring is at
/// 0x400 * q (descriptors, available ring at +0x100, used ring at +0x200, 8 entries);
/// buffers can be anywhere in the 16 MiB of RAM. The walker itself has its own target.
@main enum FuzzVirtioNet {
    static func main() { runLibFuzzer(fuzz) }
}

final class PairBackend: NetBackend, @unchecked Sendable {
    let id = "n0"
    let ifname = "fuzz0"
    let queueFDs: [FileDescriptor]
    let peers: [Int32]
    let vnetHeader: Bool

    init(queues: Int, vnetHeader: Bool) {
        var ours: [FileDescriptor] = [], theirs: [Int32] = []
        for _ in 0..<queues {
            var fds: [Int32] = [-1, -1]
            precondition(socketpair(AF_UNIX, Int32(SOCK_SEQPACKET.rawValue) | Int32(SOCK_NONBLOCK.rawValue), 0, &fds) == 0)
            ours.append(FileDescriptor(adopting: fds[0], label: "fuzz queue"))
            theirs.append(fds[1])
        }
        queueFDs = ours
        peers = theirs
        self.vnetHeader = vnetHeader
    }

    deinit { peers.forEach { close($0) } }
    func attachQueues(count: Int) {}
}

/// Large enough that a chain can describe gigabytes (each segment up to all of RAM), as a
/// real guest's can; mapped without reserve, so only what an input touches costs memory.
let ramSize: UInt64 = 16 << 20

let frame: [UInt8] = [UInt8](repeating: 0xFF, count: 6) + [0x52, 0x54, 0, 1, 2, 3, 0x08, 0x06] + Array(0..<46)

@_cdecl("LLVMFuzzerTestOneInput")
public func fuzz(_ data: UnsafePointer<UInt8>?, _ size: Int) -> CInt {
    var input = FuzzInput(data, size)
    let vnetHeader = input.u8() & 1 != 0
    let actions = (0..<Int(input.u8() % 17)).map { _ in input.u8() }
    let memory = try! GuestMemory(size: ramSize)
    try! memory.write(input.rest().prefix(Int(ramSize)), at: 0)

    let backend = PairBackend(queues: 2, vnetHeader: vnetHeader)
    let logger = Logger(label: "fuzz", factory: { _ in SwiftLogNoOpLogHandler() })
    let datapath = UserspaceTapDatapath(queues: backend, pairs: 2)
    let nic = VirtioNet(id: "net0", mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56], datapath: datapath, multiQueue: true, logger: logger)
    let transport = VirtioPCITransport(name: "net0", model: nic, memory: memory, logger: logger)
    func common(_ offset: UInt64, _ value: UInt64, _ size: Int) {
        var v = value.littleEndian
        withUnsafeBytes(of: &v) { transport.barWrite(0, offset: offset, from: UnsafeRawBufferPointer(rebasing: $0[0..<size])) }
    }
    // The driver's initialisation: features (MAC, status, control queue, MQ, VERSION_1),
    // FEATURES_OK, every queue's layout and enable, DRIVER_OK.
    let features = VirtioNet.Feature.mac | VirtioNet.Feature.status | VirtioNet.Feature.controlQueue | VirtioNet.Feature.multiQueue
    common(0x08, 0, 4); common(0x0C, features, 4)
    common(0x08, 1, 4); common(0x0C, 1, 4)
    common(0x14, 1 | 2 | 8, 1)
    for q in 0..<nic.queueMaxSizes.count {
        let base = 0x400 * UInt64(q)
        common(0x16, UInt64(q), 2); common(0x18, 8, 2)
        common(0x20, base, 8); common(0x28, base + 0x100, 8); common(0x30, base + 0x200, 8)
        common(0x1C, 1, 2)
    }
    common(0x14, 1 | 2 | 8 | 4, 1)

    for action in actions {
        if action & 0x80 != 0 {
            let pair = Int(action % 2)
            _ = frame.withUnsafeBytes { send(backend.peers[pair], $0.baseAddress, $0.count, 0) }
            datapath.receive(pair: pair, wake: false)
            // The event loop polls the TAP while the device wants input; a frame the device
            // left there would make that poll return at once, forever.
            var byte: UInt8 = 0
            precondition(!datapath.wantsInput(pair: pair) || backend.queueFDs[pair].withRaw { recv($0, &byte, 1, Int32(MSG_PEEK)) } < 0,
                         "pair \(pair) wants input but left a frame in its backend")
        } else {
            nic.queueNotified(Int(action) % nic.queueMaxSizes.count)
        }
    }
    return 0
}
