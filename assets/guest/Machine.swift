import CPU

/// Whole-machine state and actions: the idle step, its tick counter and power off.
enum Machine {
    /// Counts idle steps. Only ever grows, which lets a test tell that guest
    /// RAM carried over (e.g. across a migration).
    nonisolated(unsafe) static var ticks: UInt64 = 0

    /// Whether `hlt` may be used while idle; see `StartInfo.haltWakesFlag`.
    nonisolated(unsafe) static var haltWhenIdle = false

    /// Runs once per poll that found nothing to do: polls the NIC's receive
    /// queues, then parks the CPU unless a frame arrived (more may follow
    /// right behind it, and the wake-up for them may already have passed).
    @inline(__always)
    static func idle() {
        ticks &+= 1
        if Network.poll() {
            return
        }
        if haltWhenIdle {
            cpu_halt()
            // The VMM mostly wakes us for a frame: take it before the console poll's exit.
            _ = Network.poll()
        } else {
            // A host that never wakes `hlt` with interrupts off (QEMU) needs spinning.
            cpu_pause()
        }
    }

    /// Writes the debug-exit port (the VMM exits with status 0), then parks
    /// the CPU for good in case nothing listens there.
    static func powerOff() -> Never {
        cpu_out8(0xf4, 0)
        cpu_stop()
    }
}
