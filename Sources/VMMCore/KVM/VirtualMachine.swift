import CLinux
import Glibc

/// A KVM VM file descriptor: memory slots and vCPU creation.
public final class VirtualMachine {
    public let fd: Int32
    let vcpuMmapSize: Int

    init(fd: Int32, vcpuMmapSize: Int) {
        self.fd = fd
        self.vcpuMmapSize = vcpuMmapSize
    }

    deinit { close(fd) }

    /// Required on Intel before the first vCPU runs; the 3 pages below 4 GiB are never RAM here.
    public func setTSSAddress(_ address: UInt64) throws {
        try syscallChecked("KVM_SET_TSS_ADDR") { cl_ioctl_val(fd, CL_KVM_SET_TSS_ADDR, UInt(address)) }
    }

    public func setMemoryRegion(slot: UInt32, guestAddress: UInt64, size: UInt64, host: UnsafeMutableRawPointer, logDirty: Bool = false) throws {
        var region = kvm_userspace_memory_region(
            slot: slot, flags: logDirty ? UInt32(KVM_MEM_LOG_DIRTY_PAGES) : 0,
            guest_phys_addr: guestAddress, memory_size: size, userspace_addr: UInt64(UInt(bitPattern: host)))
        try syscallChecked("KVM_SET_USER_MEMORY_REGION slot \(slot) at 0x\(String(guestAddress, radix: 16)) size \(size)") {
            cl_ioctl_ptr(fd, CL_KVM_SET_USER_MEMORY_REGION, &region)
        }
    }

    public func createVCPU(id: UInt32) throws -> VCPU {
        let vcpufd = try syscallRetrying("KVM_CREATE_VCPU \(id)") { cl_ioctl_val(fd, CL_KVM_CREATE_VCPU, UInt(id)) }
        do {
            return try VCPU(fd: vcpufd, id: id, mmapSize: vcpuMmapSize)
        } catch {
            close(vcpufd)
            throw error
        }
    }
}
