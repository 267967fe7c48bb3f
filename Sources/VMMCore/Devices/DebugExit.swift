/// QEMU's isa-debug-exit port: a guest write asks the VMM to exit. Here the status is
/// the value written (the bundled guest's `poweroff` writes 0), not QEMU's (v << 1) | 1.
public final class DebugExit: PortIODevice {
    public static let port: UInt16 = 0xF4
    private let onExit: @Sendable (UInt32) -> Void

    public init(onExit: @escaping @Sendable (UInt32) -> Void) { self.onExit = onExit }

    public func portRead(offset: UInt16, size: Int) -> UInt32 { 0xFFFF_FFFF }
    public func portWrite(offset: UInt16, size: Int, value: UInt32) { onExit(value) }
}
