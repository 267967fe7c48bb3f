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

    /// Four writes, one read and no divisor programming: the baud rate means
    /// nothing to a virtual UART, and each port access is a VM exit.
    static func initialize() {
        cpu_out8(interruptEnable, 0x00)
        cpu_out8(lineControl, 0x03)      // 8N1, DLAB off
        cpu_out8(fifoControl, 0x07)      // enable and clear both FIFOs
        // A byte that arrived before this point filled RBR, so QEMU's 16550
        // stopped asking its chardev for input; the clear above dropped the
        // byte without telling the chardev, and only an RBR read does. Without
        // this read, console input sent before the prompt stalls the console
        // for good (our VMM's UART model behaves the same). Whatever it
        // returns arrived during the clear and goes with it.
        _ = cpu_in8(data)
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
