import CPU

/// Time from the TSC, whose rate is taken once, on first use, from the
/// first source that has it:
/// - CPUID 0x40000010 EAX (TSC kHz), which our VMM provides;
/// - the KVM clock's scale factor, which QEMU/KVM provides (two MSR writes);
/// - CPUID 0x15 (crystal ratio) or 0x16 (base MHz) of a bare-metal-like CPU;
/// - else 2 GHz.
/// All arithmetic is integer: the guest has no FPU.
enum Clock {
    nonisolated(unsafe) private static var kilohertz: UInt64 = 0

    @inline(__always)
    static func now() -> UInt64 {
        cpu_rdtsc()
    }

    static var ticksPerMillisecond: UInt64 {
        if kilohertz == 0 {
            kilohertz = measureKilohertz()
        }
        return kilohertz
    }

    static var ticksPerSecond: UInt64 { ticksPerMillisecond &* 1000 }

    /// Whether `deadline` (a TSC value) has come; correct across wraparound.
    static func hasPassed(_ deadline: UInt64, now: UInt64) -> Bool {
        now &- deadline < 1 << 63
    }

    static func microseconds(_ ticks: UInt64) -> UInt64 {
        ticks / ticksPerMillisecond &* 1000 &+ ticks % ticksPerMillisecond &* 1000 / ticksPerMillisecond
    }

    private static let hypervisorBase: UInt32 = 0x4000_0000
    private static let timingLeaf: UInt32 = 0x4000_0010
    private static let plausible: ClosedRange<UInt64> = 100_000...20_000_000

    private static func measureKilohertz() -> UInt64 {
        let hypervisor = cpu_cpuid(hypervisorBase)
        if hypervisor.eax >= timingLeaf && hypervisor.eax < hypervisorBase + 0x100 {
            let rate = UInt64(cpu_cpuid(timingLeaf).eax)
            if plausible.contains(rate) {
                return rate
            }
        }
        // "KVMKVMKVM\0\0\0"
        if hypervisor.ebx == 0x4b4d_564b && hypervisor.ecx == 0x564b_4d56 && hypervisor.edx == 0x4d {
            let rate = kvmClockKilohertz()
            if plausible.contains(rate) {
                return rate
            }
        }
        let maxLeaf = cpu_cpuid(0).eax
        if maxLeaf >= 0x15 {
            let ratio = cpu_cpuid(0x15)
            if ratio.eax != 0 && ratio.ebx != 0 && ratio.ecx != 0 {
                let rate = UInt64(ratio.ecx) * UInt64(ratio.ebx) / UInt64(ratio.eax) / 1000
                if plausible.contains(rate) {
                    return rate
                }
            }
        }
        if maxLeaf >= 0x16 {
            let rate = UInt64(cpu_cpuid(0x16).eax & 0xffff) * 1000
            if plausible.contains(rate) {
                return rate
            }
        }
        return 2_000_000
    }

    /// Scratch for the KVM clock's pvclock_vcpu_time_info (32 bytes, must
    /// not cross a page: a 32-byte aligned slot inside these 64 bytes).
    nonisolated(unsafe) private static var timeInfo = InlineArray<8, UInt64>(repeating: 0)

    /// Turns the KVM clock on just long enough for the host to write its
    /// scale factor: nanoseconds = ticks * mul / 2^32, shifted by `shift`.
    /// 0 when the host offers no KVM clock.
    private static func kvmClockKilohertz() -> UInt64 {
        let features = cpu_cpuid(hypervisorBase + 1).eax
        let msr: UInt32
        if features & (1 << 3) != 0 {
            msr = 0x4b56_4d01      // MSR_KVM_SYSTEM_TIME_NEW
        } else if features & 1 != 0 {
            msr = 0x12             // MSR_KVM_SYSTEM_TIME
        } else {
            return 0
        }
        return withUnsafeMutablePointer(to: &timeInfo) { storage in
            let address = (UInt64(UInt(bitPattern: storage)) &+ 31) & ~31
            cpu_wrmsr(msr, address | 1)
            let info = UnsafeRawPointer(bitPattern: UInt(address))!
            let version = info.load(as: UInt32.self)
            let multiplier = UInt64(info.load(fromByteOffset: 24, as: UInt32.self))
            let shift = Int(info.load(fromByteOffset: 28, as: Int8.self))
            cpu_wrmsr(msr, 0)
            guard version != 0, version & 1 == 0, multiplier != 0, shift > -8, shift < 8 else { return 0 }
            // kHz = 10^6 * 2^32 / (mul * 2^shift)
            let scaled = (1_000_000 << 32) / multiplier
            return shift >= 0 ? scaled >> UInt64(shift) : scaled << UInt64(-shift)
        }
    }
}
