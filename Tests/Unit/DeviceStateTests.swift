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
        let section = a.saveSection(.init(mode: .normal)).payload
        #expect(throws: StreamError.self) { try b.loadSection(Array(section.dropLast()), fds: ReceivedFDs()) }
    }

    @Test func virtioNetQueuesAndNegotiationRoundTrip() throws {
        let source = try VirtioNetTests.Rig(vnetHeader: true)
        try source.transmitFrame(slot: 0)
        try source.transport.pause()
        let state = source.transport.save(.init(mode: .normal))

        // The target: same RAM contents (shared memory or copied), fresh devices.
        let target = try VirtioNetTests.Rig(vnetHeader: true, configure: false)
        try target.memory.write(try source.memory.read(at: 0, count: 1 << 20), at: 0)
        try target.transport.load(state, fds: ReceivedFDs())
        try target.transport.resume()
        #expect(target.transport.status == source.transport.status)
        #expect(target.transport.negotiatedFeatures == source.transport.negotiatedFeatures)
        #expect(target.transport.configSpace.barAddress(0) == source.transport.configSpace.barAddress(0))
        // The target continues where the source stopped: the next frame uses slot 1.
        try target.transmitFrame(slot: 1)
        #expect(try target.usedEntries(queue: 1) == 2)
        var buffer = [UInt8](repeating: 0, count: 2048)
        #expect(recv(target.backend.peer, &buffer, buffer.count, Int32(MSG_DONTWAIT)) == 12 + VirtioNetTests.frame.count)
    }

    @Test func loadRefusesStateThatDoesNotFit() throws {
        let source = try VirtioNetTests.Rig(vnetHeader: true)
        try source.transport.pause()
        let state = source.transport.save(.init(mode: .normal))
        let target = try VirtioNetTests.Rig(vnetHeader: true, configure: false)
        let payload = state.encoded()
        #expect(throws: StreamError.self) { try target.transport.loadSection(Array(payload.dropLast(3)), fds: ReceivedFDs()) }
        var unoffered = state
        unoffered.driverFeatures |= 1 << 7  // a driver feature bit nobody offered
        #expect { try target.transport.load(unoffered, fds: ReceivedFDs()) } throws: { "\($0)".contains("does not offer") }
        var pairs = state
        pairs.model = VirtioNet.SavedState(activePairs: 9, handover: nil).encoded()
        #expect { try target.transport.load(pairs, fds: ReceivedFDs()) } throws: { "\($0)".contains("9 queue pairs active") }
        var outside = state
        outside.queues[0].descriptorTable = 1 << 40  // not in this machine's RAM
        #expect { try target.transport.load(outside, fds: ReceivedFDs()) } throws: { "\($0)".contains("outside guest RAM") }
        // A failed load left the device as it was: never negotiated, no queue enabled.
        #expect(target.transport.status == 0)
        #expect(target.nic.queuePairsInUse == 0)
    }

    /// A state from a newer build is refused by name, with both versions (issue 11 §2).
    @Test func newerStateVersionIsRefusedNamingDeviceAndVersions() throws {
        let target = try VirtioNetTests.Rig(vnetHeader: true, configure: false)
        let source = try VirtioNetTests.Rig(vnetHeader: true)
        try source.transport.pause()
        var payload = source.transport.saveSection(.init(mode: .normal)).payload
        payload[0] = 2
        #expect { try target.transport.loadSection(payload, fds: ReceivedFDs()) } throws: {
            "\($0)" == "nic0: state version 2 is newer than this build reads (1...1); update the target"
        }
        var model = VirtioNet.SavedState(activePairs: 1, handover: nil).encoded()
        model[0] = 7
        #expect { try target.nic.loadModelState(model, fds: ReceivedFDs()) } throws: { "\($0)".contains("nic0: state version 7 is newer") }
        let serial = Serial16550(output: { _ in })
        #expect { try serial.loadSection([3, 0], fds: ReceivedFDs()) } throws: { "\($0)".contains("serial0: state version 3 is newer") }
    }
}
