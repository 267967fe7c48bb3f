import CLinux
import Glibc

/// Everything that defines a vCPU for migration: general and special registers, FPU,
/// pending events, extended control registers and the MSRs KVM can save. Structs go
/// into the stream as the x86-64 UAPI lays them out; each with its size, so a layout
/// mismatch is an error rather than garbage.
public struct VCPUState: Sendable, Equatable {
    public var regs: [UInt8]
    public var sregs: [UInt8]
    public var fpu: [UInt8]
    public var events: [UInt8]
    /// Empty where the host has no XCR support.
    public var xcrs: [UInt8]
    public var msrs: [UInt32: UInt64]

    /// MSRs a 64-bit guest may depend on, restored when KVM lists them as savable.
    public static let wantedMSRs: [UInt32] = [
        0x10,  // TSC
        0x174, 0x175, 0x176,  // SYSENTER_CS/ESP/EIP
        0x1A0,  // MISC_ENABLE
        0x277,  // PAT
        0xC000_0081, 0xC000_0082, 0xC000_0083, 0xC000_0084,  // STAR, LSTAR, CSTAR, SFMASK
        0xC000_0102, 0xC000_0103,  // KERNEL_GS_BASE, TSC_AUX
        0x4B56_4D00, 0x4B56_4D01, 0x4B56_4D02, 0x4B56_4D03, 0x4B56_4D04,  // kvmclock, async PF, steal time, PV EOI
        0x11, 0x12,  // legacy kvmclock
    ]

    static func bytes<T>(of value: T) -> [UInt8] { withUnsafeBytes(of: value) { Array($0) } }

    static func value<T>(_ type: T.Type, from bytes: [UInt8], what: String) throws -> T {
        guard bytes.count == MemoryLayout<T>.size else {
            throw StreamError("vCPU state: \(what) is \(bytes.count) bytes, this host's is \(MemoryLayout<T>.size)")
        }
        return bytes.withUnsafeBytes { $0.loadUnaligned(as: T.self) }
    }

    /// The subset of `wantedMSRs` this host's KVM saves and restores.
    public static func savableMSRs(hypervisor: Hypervisor) -> [UInt32] {
        var list = [UInt32](repeating: 0, count: 2048)
        let n = cl_kvm_msr_index_list(hypervisor.fd, &list, Int32(list.count))
        guard n > 0 else { return [] }
        let available = Set(list.prefix(Int(n)))
        return wantedMSRs.filter { available.contains($0) }
    }

    /// Reads the state of a stopped vCPU.
    public static func capture(_ vcpu: VCPU, msrIndices: [UInt32]) throws -> VCPUState {
        var fpu = kvm_fpu()
        try syscallChecked("KVM_GET_FPU") { cl_ioctl_ptr(vcpu.fd, CL_KVM_GET_FPU, &fpu) }
        var events = kvm_vcpu_events()
        try syscallChecked("KVM_GET_VCPU_EVENTS") { cl_ioctl_ptr(vcpu.fd, CL_KVM_GET_VCPU_EVENTS, &events) }
        var xcrs = kvm_xcrs()
        let xcrBytes = cl_ioctl_ptr(vcpu.fd, CL_KVM_GET_XCRS, &xcrs) == 0 ? bytes(of: xcrs) : []
        var values = [UInt64](repeating: 0, count: msrIndices.count)
        let read = msrIndices.isEmpty ? 0 : cl_kvm_get_msrs(vcpu.fd, msrIndices, &values, Int32(msrIndices.count))
        guard read >= 0 else { throw SystemError("KVM_GET_MSRS", errno: -read) }
        guard Int(read) == msrIndices.count else {
            throw SystemError("KVM_GET_MSRS: MSR \(hex(msrIndices[Int(read)])) unreadable", errno: EINVAL)
        }
        var msrs: [UInt32: UInt64] = [:]
        for (index, value) in zip(msrIndices, values) { msrs[index] = value }
        return VCPUState(regs: bytes(of: try vcpu.getRegisters()), sregs: bytes(of: try vcpu.getSpecialRegisters()),
                         fpu: bytes(of: fpu), events: bytes(of: events), xcrs: xcrBytes, msrs: msrs)
    }

    /// Writes this state into a vCPU that has not run yet (or is stopped).
    public func restore(into vcpu: VCPU) throws {
        try vcpu.setSpecialRegisters(try Self.value(kvm_sregs.self, from: sregs, what: "kvm_sregs"))
        try vcpu.setRegisters(try Self.value(kvm_regs.self, from: regs, what: "kvm_regs"))
        var fpu = try Self.value(kvm_fpu.self, from: fpu, what: "kvm_fpu")
        try syscallChecked("KVM_SET_FPU") { cl_ioctl_ptr(vcpu.fd, CL_KVM_SET_FPU, &fpu) }
        if !xcrs.isEmpty {
            var x = try Self.value(kvm_xcrs.self, from: xcrs, what: "kvm_xcrs")
            try syscallChecked("KVM_SET_XCRS") { cl_ioctl_ptr(vcpu.fd, CL_KVM_SET_XCRS, &x) }
        }
        let indices = msrs.keys.sorted()
        let values = indices.map { msrs[$0]! }
        if !indices.isEmpty {
            let written = cl_kvm_set_msrs(vcpu.fd, indices, values, Int32(indices.count))
            guard written == Int32(indices.count) else {
                let failed = written >= 0 && Int(written) < indices.count ? hex(indices[Int(written)]) : "?"
                throw SystemError("KVM_SET_MSRS: MSR \(failed) refused", errno: written < 0 ? -written : EINVAL)
            }
        }
        var e = try Self.value(kvm_vcpu_events.self, from: events, what: "kvm_vcpu_events")
        try syscallChecked("KVM_SET_VCPU_EVENTS") { cl_ioctl_ptr(vcpu.fd, CL_KVM_SET_VCPU_EVENTS, &e) }
    }

    public func encode() -> [UInt8] {
        var w = StreamWriter()
        for part in [regs, sregs, fpu, events, xcrs] { w.blob(part) }
        w.u16(UInt16(msrs.count))
        for index in msrs.keys.sorted() {
            w.u32(index)
            w.u64(msrs[index]!)
        }
        return w.bytes
    }

    public static func decode(_ bytes: [UInt8]) throws -> VCPUState {
        var r = StreamReader(bytes, context: "vCPU state")
        let regs = try r.blob("kvm_regs", limit: 4096)
        let sregs = try r.blob("kvm_sregs", limit: 4096)
        let fpu = try r.blob("kvm_fpu", limit: 4096)
        let events = try r.blob("kvm_vcpu_events", limit: 4096)
        let xcrs = try r.blob("kvm_xcrs", limit: 4096)
        var msrs: [UInt32: UInt64] = [:]
        for _ in 0..<Int(try r.u16("MSR count")) {
            let index = try r.u32("MSR index")
            msrs[index] = try r.u64("MSR \(hex(index))")
        }
        try r.finish()
        return VCPUState(regs: regs, sregs: sregs, fpu: fpu, events: events, xcrs: xcrs, msrs: msrs)
    }
}
