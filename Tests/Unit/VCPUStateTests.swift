import CLinux
import TestKit
import Testing
@testable import VMMCore

@Suite struct VCPUStateTests {
    @Test(.requiresKVM) func stateMovesToAFreshVCPUOfAnotherVM() throws {
        let hypervisor = try Hypervisor()
        let msrs = VCPUState.savableMSRs(hypervisor: hypervisor)
        let sourceVM = try hypervisor.createVM()
        let source = try sourceVM.createVCPU(id: 0)
        let (regs0, apply) = PVHBoot.initialRegisters(entry: 0x10_00F0)
        var sregs = try source.getSpecialRegisters()
        apply(&sregs)
        try source.setSpecialRegisters(sregs)
        var regs = regs0
        regs.rax = 0x1234_5678_9ABC
        regs.r15 = 42
        try source.setRegisters(regs)
        let state = try VCPUState.capture(source, msrIndices: msrs)
        #expect(state.msrs.count == msrs.count)

        let decoded = try VCPUState.decode(state.encode())
        #expect(decoded == state)
        let targetVM = try hypervisor.createVM()
        let target = try targetVM.createVCPU(id: 0)
        try decoded.restore(into: target)
        let restored = try target.getRegisters()
        #expect(restored.rax == 0x1234_5678_9ABC && restored.r15 == 42 && restored.rip == 0x10_00F0)
        #expect(try target.getSpecialRegisters().cr0 == sregs.cr0)
    }

    @Test func decodeRefusesMalformedState() throws {
        let state = VCPUState(regs: [1, 2], sregs: [], fpu: [], events: [], xcrs: [], msrs: [0x10: 5])
        let bytes = state.encode()
        #expect(try VCPUState.decode(bytes) == state)
        for cut in 0..<bytes.count {
            #expect(throws: StreamError.self) { try VCPUState.decode(Array(bytes.prefix(cut))) }
        }
        #expect(throws: StreamError.self) { try VCPUState.value(kvm_regs.self, from: [1, 2], what: "kvm_regs") }
    }
}
