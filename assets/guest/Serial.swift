import CPU

/// Polled 16550 UART on COM1. Interrupts stay masked; input is found by
/// polling the line status register from the idle loop.
enum Serial {
    private static let data: UInt16 = 0x3f8              // RBR on read, THR on write
    private static let interruptEnable: UInt16 = 0x3f9
    private static let fifoControl: UInt16 = 0x3fa
    private static let lineControl: UInt16 = 0x3fb
    private static let modemControl: UInt16 = 0x3fc
    private static let lineStatus: UInt16 = 0x3fd

    private static let dataReady: UInt8 = 0x01

    /// Four writes and no divisor programming: the baud rate means nothing
    /// to a virtual UART, and each port access is a VM exit.
    static func initialize() {
        cpu_out8(interruptEnable, 0x00)
        cpu_out8(lineControl, 0x03)      // 8N1, DLAB off
        cpu_out8(fifoControl, 0x07)      // enable and clear both FIFOs
        cpu_out8(modemControl, 0x03)     // DTR | RTS
    }

    /// Writes THR without polling LSR.THRE first: our VMM and QEMU both take
    /// a byte the moment it is written, and skipping the status read halves
    /// the port exits per character.
    @inline(__always)
    static func write(_ byte: UInt8) {
        cpu_out8(data, byte)
    }

    /// Returns the next received byte, or nil when the receiver is empty.
    @inline(__always)
    static func read() -> UInt8? {
        if cpu_in8(lineStatus) & dataReady == 0 {
            return nil
        }
        return cpu_in8(data)
    }
}
