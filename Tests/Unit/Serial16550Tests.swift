import Synchronization
import Testing
@testable import VMMCore

@Suite struct Serial16550Tests {
    final class Sink: Sendable {
        let bytes = Mutex<[UInt8]>([])
        let drained = Atomic<Int>(0)
    }

    func make() -> (Serial16550, Sink) {
        let sink = Sink()
        let uart = Serial16550(output: { b in sink.bytes.withLock { $0.append(b) } }, onInputDrained: { sink.drained.add(1, ordering: .relaxed) })
        return (uart, sink)
    }

    @Test func transmitsAndReportsTransmitterEmpty() {
        let (uart, sink) = make()
        for b in "hi".utf8 { uart.portWrite(offset: 0, size: 1, value: UInt32(b)) }
        #expect(sink.bytes.withLock { $0 } == Array("hi".utf8))
        #expect(uart.portRead(offset: 5, size: 1) & 0x60 == 0x60)
    }

    @Test func receivesInOrderAndSetsDataReady() {
        let (uart, _) = make()
        #expect(uart.portRead(offset: 5, size: 1) & 1 == 0)
        #expect(uart.enqueueInput(Array("ab".utf8)) == 2)
        #expect(uart.portRead(offset: 5, size: 1) & 1 == 1)
        #expect(uart.portRead(offset: 0, size: 1) == UInt32(UInt8(ascii: "a")))
        #expect(uart.portRead(offset: 0, size: 1) == UInt32(UInt8(ascii: "b")))
        #expect(uart.portRead(offset: 5, size: 1) & 1 == 0)
        #expect(uart.portRead(offset: 0, size: 1) == 0)
    }

    @Test func inputBufferIsBoundedAndReportsDrain() {
        let (uart, sink) = make()
        #expect(uart.enqueueInput([UInt8](repeating: 1, count: Serial16550.inputCapacity + 10)) == Serial16550.inputCapacity)
        #expect(uart.inputSpace == 0)
        _ = uart.portRead(offset: 0, size: 1)
        #expect(uart.inputSpace == 1)
        #expect(sink.drained.load(ordering: .relaxed) == 1)
    }

    @Test func divisorLatchAndScratchRegisters() {
        let (uart, sink) = make()
        uart.portWrite(offset: 3, size: 1, value: 0x83)
        uart.portWrite(offset: 0, size: 1, value: 0x01)
        uart.portWrite(offset: 1, size: 1, value: 0x02)
        #expect(uart.portRead(offset: 0, size: 1) == 0x01 && uart.portRead(offset: 1, size: 1) == 0x02)
        uart.portWrite(offset: 3, size: 1, value: 0x03)
        #expect(sink.bytes.withLock { $0 }.isEmpty)
        uart.portWrite(offset: 7, size: 1, value: 0x5A)
        #expect(uart.portRead(offset: 7, size: 1) == 0x5A)
    }

    @Test func interruptIdentificationFollowsPriority() {
        let (uart, _) = make()
        #expect(uart.portRead(offset: 2, size: 1) == 0x01)
        uart.portWrite(offset: 1, size: 1, value: 0x03)
        #expect(uart.portRead(offset: 2, size: 1) == 0x02)
        #expect(uart.portRead(offset: 2, size: 1) == 0x01)  // reading IIR acknowledged THRE
        uart.enqueueInput([7])
        #expect(uart.portRead(offset: 2, size: 1) == 0x04)
    }

    func lineStatusDataReady(_ uart: Serial16550) -> Bool { uart.portRead(offset: 5, size: 1) & 1 != 0 }

    /// As QEMU's 16550: a byte pending when FCR turns the FIFO on (which clears it) is
    /// lost, and later input waits until the guest reads RBR, which re-arms the
    /// receiver. A guest that never does so stalls here as it does under QEMU.
    @Test func clearingAFullReceiverHoldsInputUntilRBRIsRead() {
        let (uart, _) = make()
        uart.enqueueInput(Array("\n".utf8))  // before the guest's UART init: RBR full
        #expect(lineStatusDataReady(uart))
        uart.portWrite(offset: 2, size: 1, value: 0x07)
        #expect(!lineStatusDataReady(uart))
        #expect(uart.enqueueInput(Array("echo\n".utf8)) == 5)
        #expect(!lineStatusDataReady(uart))  // the stall a guest must avoid
        #expect(uart.pendingInput == 5)
        #expect(uart.portRead(offset: 0, size: 1) == 0)  // empty FIFO; re-arms
        #expect(lineStatusDataReady(uart))
        var received: [UInt8] = []
        while lineStatusDataReady(uart) { received.append(UInt8(uart.portRead(offset: 0, size: 1))) }
        #expect(received == Array("echo\n".utf8))
    }

    @Test func fifoHoldsSixteenBytesAndClearingItKeepsTheBacklog() {
        let (uart, _) = make()
        uart.portWrite(offset: 2, size: 1, value: 0x01)
        uart.enqueueInput(Array(1...20) as [UInt8])
        uart.portWrite(offset: 2, size: 1, value: 0x03)  // clear RX: bytes 1...16 go
        #expect(!lineStatusDataReady(uart))
        #expect(uart.portRead(offset: 0, size: 1) == 0)
        var received: [UInt8] = []
        while lineStatusDataReady(uart) { received.append(UInt8(uart.portRead(offset: 0, size: 1))) }
        #expect(received == [17, 18, 19, 20])
    }

    @Test func clearingAFIFOWithRoomLeavesTheReceiverArmed() {
        let (uart, _) = make()
        uart.portWrite(offset: 2, size: 1, value: 0x01)
        uart.enqueueInput(Array("ab".utf8))
        uart.portWrite(offset: 2, size: 1, value: 0x03)
        #expect(!lineStatusDataReady(uart))
        uart.enqueueInput(Array("c".utf8))
        #expect(uart.portRead(offset: 0, size: 1) == UInt32(UInt8(ascii: "c")))
    }

    @Test func loopbackReturnsTransmittedBytes() {
        let (uart, sink) = make()
        uart.portWrite(offset: 4, size: 1, value: 0x10)
        uart.portWrite(offset: 0, size: 1, value: 0x42)
        #expect(sink.bytes.withLock { $0 }.isEmpty)
        #expect(uart.portRead(offset: 0, size: 1) == 0x42)
    }
}

@Suite struct IOBusTests {
    final class Recorder: PortIODevice, @unchecked Sendable {
        var writes: [(UInt16, UInt32)] = []
        func portRead(offset: UInt16, size: Int) -> UInt32 { 0x1234_5678 }
        func portWrite(offset: UInt16, size: Int, value: UInt32) { writes.append((offset, value)) }
    }

    @Test func routesByRangeAndFillsUnclaimedReadsWithOnes() throws {
        let device = Recorder()
        let bus = try IOBus([.init(base: 0x100, count: 4, device: device)])
        var data: [UInt8] = [0xAA, 0xBB, 0, 0]
        data.withUnsafeMutableBytes { bus.handle(port: 0x102, isWrite: true, size: 2, count: 1, data: $0.baseAddress!) }
        #expect(device.writes.count == 1 && device.writes[0].0 == 2 && device.writes[0].1 == 0xBBAA)
        data.withUnsafeMutableBytes { bus.handle(port: 0x200, isWrite: false, size: 4, count: 1, data: $0.baseAddress!) }
        #expect(data == [0xFF, 0xFF, 0xFF, 0xFF])
        data.withUnsafeMutableBytes { bus.handle(port: 0x100, isWrite: false, size: 2, count: 2, data: $0.baseAddress!) }
        #expect(data == [0x78, 0x56, 0x78, 0x56])
    }

    @Test func refusesOverlappingRanges() {
        #expect(throws: IOBusError.self) {
            try IOBus([.init(base: 0x100, count: 8, device: Recorder()), .init(base: 0x104, count: 2, device: Recorder())])
        }
    }
}
