import CLinux
import Glibc

/// A KVM VM file descriptor: memory slots, dirty log and vCPU creation. Its ioctls are
/// safe from any thread (KVM serialises slot updates), hence Sendable.
public final class VirtualMachine: @unchecked Sendable {
    let fd: Int32
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

    /// Turns KVM's dirty-page logging on or off for every RAM slot of `memory`.
    public func setDirtyLogging(_ enabled: Bool, memory: GuestMemory) throws {
        for (slot, region) in memory.regions.enumerated() {
            try setMemoryRegion(slot: UInt32(slot), guestAddress: region.guestAddress, size: region.size,
                                host: memory.hostAddress(of: region), logDirty: enabled)
        }
    }

    /// ORs the pages the guest wrote since the last call (KVM clears its log as it
    /// returns it) into `bitmap`, indexed by page of host offset like `DirtyBitmap`.
    public func collectDirtyLog(memory: GuestMemory, into bitmap: inout [UInt64]) throws {
        for (slot, region) in memory.regions.enumerated() {
            let pages = Int(region.size / DirtyBitmap.pageSize)
            var log = [UInt64](repeating: 0, count: (pages + 63) / 64)
            try syscallChecked("KVM_GET_DIRTY_LOG slot \(slot)") { cl_kvm_get_dirty_log(fd, UInt32(slot), &log) }
            // Slots start at page offsets that are multiples of 64 (see GuestMemory.layout).
            let first = Int(region.hostOffset / DirtyBitmap.pageSize)
            precondition(first % 64 == 0)
            for (i, word) in log.enumerated() where word != 0 { bitmap[first / 64 + i] |= word }
        }
    }

    // MARK: ioeventfd

    /// A guest write to `address` (of `length` bytes, 0 = any) signals `eventFD` inside
    /// KVM, without an exit to the VMM; the registration holds the eventfd until detached.
    public func attachIOEventFD(_ eventFD: EventFD, mmio address: UInt64, length: UInt32) throws -> IOEventFDRegistration {
        let registration = IOEventFDRegistration(eventFD: eventFD, address: address, length: length)
        try ioeventfd(registration, deassign: false)
        return registration
    }

    public func detach(_ registration: IOEventFDRegistration) {
        do { try ioeventfd(registration, deassign: true) } catch {}  // only fails if it was not attached
    }

    private func ioeventfd(_ r: IOEventFDRegistration, deassign: Bool) throws {
        try r.eventFD.fd.withRaw { eventfd in
            var request = kvm_ioeventfd()
            request.addr = r.address
            request.len = r.length
            request.fd = eventfd
            request.flags = deassign ? CL_KVM_IOEVENTFD_FLAG_DEASSIGN : 0
            try syscallChecked("KVM_IOEVENTFD \(deassign ? "deassign " : "")\(hex(r.address)) length \(r.length)") {
                cl_ioctl_ptr(fd, CL_KVM_IOEVENTFD, &request)
            }
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

/// A guest address whose writes signal an eventfd inside KVM.
public struct IOEventFDRegistration: Sendable {
    public let eventFD: EventFD
    public let address: UInt64
    public let length: UInt32
}
