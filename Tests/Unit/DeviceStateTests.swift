import Glibc
import Testing
@testable import VMMCore

/// Device state survives save() and load() into a fresh device, as migration needs.
@Suite struct DeviceStateTests {
    @Test func serialRegistersAndPendingInputRoundTrip() throws {
        let a = Serial16550(output: { _ in })
        a.portWrite(offset: 3, size: 1, value: 0x1B)
        a.portWrite(offset: 7, size: 1, value: 0x42)
        a.portWrite(offset: 1, size: 1, value: 0x01)
        a.enqueueInput(Array("ls\r".utf8))
        _ = a.portRead(offset: 0, size: 1)
        let b = Serial16550(output: { _ in })
        try b.load(a.save())
        #expect(b.portRead(offset: 3, size: 1) == 0x1B)
        #expect(b.portRead(offset: 7, size: 1) == 0x42)
        #expect(b.portRead(offset: 1, size: 1) == 0x01)
        #expect(b.pendingInput == 2)
        #expect(b.portRead(offset: 0, size: 1) == UInt32(UInt8(ascii: "s")))
        #expect(throws: StreamError.self) { try b.load(Array(a.save().dropLast())) }
    }

    @Test func virtioNetQueuesAndNegotiationRoundTrip() throws {
        let source = try VirtioNetTests.Rig(vnetHeader: true)
        try source.memory.write([UInt8](repeating: 0, count: 12) + VirtioNetTests.frame, at: 0x100000)
        try source.post(queue: 1, slot: 0, address: 0x100000, length: UInt32(12 + VirtioNetTests.frame.count), writable: false)
        source.bar(0x3000 + 4, 1, 2)
        let transportState = source.transport.save()
        let netState = source.nic.save()

        // The target: same RAM contents (shared memory or copied), fresh devices.
        let target = try VirtioNetTests.Rig(vnetHeader: true, configure: false)
        try target.memory.write(try source.memory.read(at: 0, count: 1 << 20), at: 0)
        try target.transport.load(transportState)
        try target.nic.load(netState)
        #expect(target.transport.status == source.transport.status)
        #expect(target.transport.negotiatedFeatures == source.transport.negotiatedFeatures)
        #expect(target.transport.configSpace.barAddress(0) == source.transport.configSpace.barAddress(0))
        // The target continues where the source stopped: the next frame uses slot 1.
        try target.post(queue: 1, slot: 1, address: 0x100000, length: UInt32(12 + VirtioNetTests.frame.count), writable: false)
        target.bar(0x3000 + 4, 1, 2)
        #expect(try target.usedEntries(queue: 1) == 2)
        var buffer = [UInt8](repeating: 0, count: 2048)
        #expect(recv(target.backend.peer, &buffer, buffer.count, Int32(MSG_DONTWAIT)) == 12 + VirtioNetTests.frame.count)
    }

    @Test func loadRefusesStateThatDoesNotFit() throws {
        let source = try VirtioNetTests.Rig(vnetHeader: true)
        var state = source.transport.save()
        let target = try VirtioNetTests.Rig(vnetHeader: true, configure: false)
        #expect(throws: StreamError.self) { try target.transport.load(Array(state.dropLast(3))) }
        state[PCIConfigSpace.size + 8] |= 0x80  // a driver feature bit nobody offered
        #expect(throws: StreamError.self) { try target.transport.load(state) }
        var pairs = StreamWriter()
        pairs.u16(9)
        #expect(throws: StreamError.self) { try target.nic.load(pairs.bytes) }
    }
}
