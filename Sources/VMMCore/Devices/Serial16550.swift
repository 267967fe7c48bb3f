import Synchronization

/// A 16550A UART at a legacy COM port. The vCPU thread drives the registers while the
/// I/O thread feeds console input, so all state sits behind one lock. No interrupt
/// line is wired (this host's KVM cannot deliver them); the guest polls LSR, and IIR
/// still reports what a real chip would.
public final class Serial16550: PortIODevice, StatefulDevice {
    public var id: String { "serial0" }
    public func configuration(_ context: HandoverContext) -> MachineDescription.Device? {
        .init(id: id, type: "isa-serial", properties: [:])
    }

    public static let com1: UInt16 = 0x3F8
    /// Console input the VMM holds for the guest; beyond this the I/O thread stops reading
    /// its input fd, so a fast sender is slowed down instead of losing bytes.
    public static let inputCapacity = 4096

    /// The receive FIFO's depth when FCR enables it; one byte (RBR) otherwise.
    public static let fifoDepth = 16

    /// Receiving follows QEMU's 16550 (hw/char/serial.c), so a guest that only works on
    /// our model cannot hide a bug that stalls it under QEMU: console input waits in a
    /// backlog (QEMU: the chardev's socket) and moves into the FIFO while the receiver
    /// is armed. A full FIFO disarms it, and only a read of RBR re-arms it (QEMU's
    /// `qemu_chr_fe_accept_input`). Clearing the FIFO through FCR does not re-arm it: a
    /// guest that clears a full FIFO and never reads RBR gets no more input, on QEMU
    /// and here.
    struct State {
        var ier: UInt8 = 0
        var lcr: UInt8 = 0x03
        var mcr: UInt8 = 0x08
        var scr: UInt8 = 0
        var dll: UInt8 = 0x0C
        var dlm: UInt8 = 0
        var fcr: UInt8 = 0
        var thrInterruptPending = true
        /// What the guest can read: at most `fifoCapacity` bytes.
        var fifo: [UInt8] = []
        /// Input accepted from the console, not yet in the FIFO.
        var backlog: [UInt8] = []
        var backlogHead = 0
        var receiverArmed = true

        var backlogCount: Int { backlog.count - backlogHead }
        var rxCount: Int { fifo.count + backlogCount }
        var fifoCapacity: Int { fcr & 0x01 != 0 ? Serial16550.fifoDepth : 1 }
        var dlab: Bool { lcr & 0x80 != 0 }
        var loopback: Bool { mcr & 0x10 != 0 }

        /// Moves backlog into the FIFO while armed; a full FIFO disarms the receiver.
        mutating func deliver() {
            guard receiverArmed else { return }
            let count = min(fifoCapacity - fifo.count, backlogCount)
            if count > 0 {
                fifo.append(contentsOf: backlog[backlogHead..<backlogHead + count])
                backlogHead += count
                if backlogHead == backlog.count {
                    backlog.removeAll(keepingCapacity: true)
                    backlogHead = 0
                }
            }
            receiverArmed = fifo.count < fifoCapacity
        }

        /// RBR: the oldest FIFO byte (0 when empty); the read re-arms the receiver.
        mutating func readRBR() -> UInt8 {
            let byte = fifo.isEmpty ? 0 : fifo.removeFirst()
            receiverArmed = true
            deliver()
            return byte
        }

        var iir: UInt8 {
            let fifo: UInt8 = fcr & 0x01 != 0 ? 0xC0 : 0
            if ier & 0x01 != 0 && !self.fifo.isEmpty { return fifo | 0x04 }
            if ier & 0x02 != 0 && thrInterruptPending { return fifo | 0x02 }
            return fifo | 0x01
        }
    }

    private let state = Mutex(State())
    private let output: @Sendable (UInt8) -> Void
    private let onInputDrained: @Sendable () -> Void

    /// - Parameters:
    ///   - output: receives each transmitted byte, on the vCPU thread.
    ///   - onInputDrained: called when the guest frees space in a full input buffer, so
    ///     the I/O thread can resume reading console input.
    public init(output: @escaping @Sendable (UInt8) -> Void, onInputDrained: @escaping @Sendable () -> Void = {}) {
        self.output = output
        self.onInputDrained = onInputDrained
    }

    /// Queues console input for the guest; returns how many bytes fit.
    @discardableResult
    public func enqueueInput(_ bytes: some Collection<UInt8>) -> Int {
        state.withLock { s in
            let accepted = min(bytes.count, Self.inputCapacity - s.rxCount)
            s.backlog.append(contentsOf: bytes.prefix(accepted))
            s.deliver()
            return accepted
        }
    }

    /// Register state and pending input, for the migration stream.
    public struct SavedState: VersionedState {
        public static let version: UInt16 = 1
        public var ier, lcr, mcr, scr, dll, dlm, fcr: UInt8
        public var thrInterruptPending: Bool
        /// The FIFO and the backlog behind it, in order.
        public var input: [UInt8]

        public func encode(into w: inout StreamWriter) {
            for register in [ier, lcr, mcr, scr, dll, dlm, fcr] { w.u8(register) }
            w.bool(thrInterruptPending)
            w.blob(input)
        }

        public init(decoding r: inout StreamReader, version: UInt16) throws {
            ier = try r.u8("IER")
            lcr = try r.u8("LCR")
            mcr = try r.u8("MCR")
            scr = try r.u8("SCR")
            dll = try r.u8("DLL")
            dlm = try r.u8("DLM")
            fcr = try r.u8("FCR")
            thrInterruptPending = try r.bool("THRE pending")
            input = try r.blob("input", limit: Serial16550.inputCapacity)
        }

        init(_ s: State) {
            (ier, lcr, mcr, scr, dll, dlm, fcr) = (s.ier, s.lcr, s.mcr, s.scr, s.dll, s.dlm, s.fcr)
            thrInterruptPending = s.thrInterruptPending
            input = s.fifo + s.backlog[s.backlogHead...]
        }
    }

    public func save(_ context: HandoverContext = .init(mode: .normal)) -> SavedState { state.withLock { SavedState($0) } }

    /// Only bits a guest can set survive, as a register write would leave them.
    public func load(_ saved: SavedState, fds: ReceivedFDs = ReceivedFDs()) throws {
        var s = State()
        s.ier = saved.ier & 0x0F
        s.lcr = saved.lcr
        s.mcr = saved.mcr & 0x1F
        s.scr = saved.scr
        s.dll = saved.dll
        s.dlm = saved.dlm
        s.fcr = saved.fcr & 0xC9
        s.thrInterruptPending = saved.thrInterruptPending
        s.backlog = saved.input
        s.deliver()
        state.withLock { $0 = s }
    }

    public var inputSpace: Int { state.withLock { Self.inputCapacity - $0.rxCount } }
    public var pendingInput: Int { state.withLock { $0.rxCount } }

    public func portRead(offset: UInt16, size: Int) -> UInt32 {
        var drainedFromFull = false
        let value: UInt8 = state.withLock { s in
            switch offset {
            case 0:
                if s.dlab { return s.dll }
                let wasFull = s.rxCount == Self.inputCapacity
                let byte = s.readRBR()
                drainedFromFull = wasFull && s.rxCount < Self.inputCapacity
                return byte
            case 1: return s.dlab ? s.dlm : s.ier
            case 2:
                let iir = s.iir
                if iir & 0x0F == 0x02 { s.thrInterruptPending = false }
                return iir
            case 3: return s.lcr
            case 4: return s.mcr
            case 5: return 0x60 | (s.fifo.isEmpty ? 0 : 0x01)
            case 6:
                if s.loopback {
                    // Loopback wires DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                    let m = s.mcr
                    return (m & 0x01) << 5 | (m & 0x02) << 3 | (m & 0x04) << 4 | (m & 0x08) << 4
                }
                return 0xB0
            case 7: return s.scr
            default: return 0xFF
            }
        }
        if drainedFromFull { onInputDrained() }
        return UInt32(value)
    }

    public func portWrite(offset: UInt16, size: Int, value: UInt32) {
        let byte = UInt8(truncatingIfNeeded: value)
        let transmit: Bool = state.withLock { s in
            switch offset {
            case 0:
                if s.dlab {
                    s.dll = byte
                    return false
                }
                s.thrInterruptPending = true
                if s.loopback {
                    // Straight into the FIFO, as QEMU does; a full FIFO overruns.
                    if s.fifo.count < s.fifoCapacity { s.fifo.append(byte) }
                    return false
                }
                return true
            case 1:
                if s.dlab {
                    s.dlm = byte
                } else {
                    if byte & 0x02 != 0 && s.ier & 0x02 == 0 { s.thrInterruptPending = true }
                    s.ier = byte & 0x0F
                }
            case 2:
                // Turning the FIFO on or off clears it too (16550A datasheet, QEMU).
                if byte & 0x02 != 0 || (byte ^ s.fcr) & 0x01 != 0 {
                    // Only what the guest could see goes; the backlog stays for when
                    // the receiver is armed again (an RBR read).
                    s.fifo.removeAll(keepingCapacity: true)
                }
                s.fcr = byte & 0xC9
            case 3: s.lcr = byte
            case 4: s.mcr = byte & 0x1F
            case 7: s.scr = byte
            default: break
            }
            return false
        }
        if transmit { output(byte) }
    }
}
