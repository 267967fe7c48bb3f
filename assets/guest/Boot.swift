/// The parts of the PVH `hvm_start_info` the guest uses.
struct StartInfo {
    static let magic: UInt32 = 0x336e_c578

    /// Project-defined flag: the VMM wakes a halted vCPU on console input,
    /// device events or a short timer, so idling may use `hlt`.
    static let haltWakesFlag: UInt32 = 1 << 31

    /// Only the first 4 GiB are mapped at entry; anything else cannot be a start_info here.
    private static let mappedLimit: UInt64 = 1 << 32

    let flags: UInt32

    init(address: UInt64) {
        guard address != 0, address < StartInfo.mappedLimit - 64 else {
            flags = 0
            return
        }
        let fields = UnsafePointer<UInt32>(bitPattern: UInt(address))!
        flags = fields[0] == StartInfo.magic ? fields[2] : 0
    }

    var haltWakes: Bool { flags & StartInfo.haltWakesFlag != 0 }
}

/// Called by entry.S in 64-bit mode with the physical (= virtual) address
/// of the start_info structure.
@_cdecl("guest_main")
func guestMain(_ startInfoAddress: UInt64) -> Never {
    Machine.haltWhenIdle = StartInfo(address: startInfoAddress).haltWakes
    Serial.initialize()
    Shell.run()
}
