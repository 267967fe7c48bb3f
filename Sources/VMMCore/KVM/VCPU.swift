import CLinux
import Glibc

/// Why KVM_RUN returned, decoded from the shared `kvm_run` page.
public enum VCPUExit {
    /// `data` points into the kvm_run page: `size * count` bytes to read (out) or fill (in).
    case io(port: UInt16, isWrite: Bool, size: Int, count: Int, data: UnsafeMutableRawPointer)
    case mmio(address: UInt64, isWrite: Bool, data: UnsafeMutableRawBufferPointer)
    case halt
    case shutdown
    /// KVM_RUN returned EINTR (a kick from another thread) or immediate_exit was set.
    case interrupted
    case internalError(suberror: UInt32)
    case failEntry(reason: UInt64)
    case systemEvent(type: UInt32)
    case other(reason: UInt32)
}

/// One vCPU: its fd and the mmapped `kvm_run` page. Used by a single thread, except
/// `requestImmediateExit`, which another thread sets before kicking this one.
public final class VCPU: @unchecked Sendable {
    let fd: Int32
    public let id: UInt32
    private let runPage: UnsafeMutablePointer<kvm_run>
    private let mmapSize: Int

    init(fd: Int32, id: UInt32, mmapSize: Int) throws {
        guard let p = mmap(nil, mmapSize, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0), p != MAP_FAILED else {
            throw SystemError("mmap kvm_run of vCPU \(id)")
        }
        self.fd = fd
        self.id = id
        self.mmapSize = mmapSize
        runPage = p.assumingMemoryBound(to: kvm_run.self)
    }

    deinit {
        munmap(runPage, mmapSize)
        close(fd)
    }

    /// Makes the next (or current, once kicked) KVM_RUN return at once.
    public func setImmediateExit(_ on: Bool) {
        // A volatile-enough store: the field is read by the kernel on entry to KVM_RUN.
        withUnsafeMutablePointer(to: &runPage.pointee.immediate_exit) { $0.pointee = on ? 1 : 0 }
    }

    public func run() throws -> VCPUExit {
        if cl_ioctl_val(fd, CL_KVM_RUN, 0) < 0 {
            if errno == EINTR || errno == EAGAIN { return .interrupted }
            throw SystemError("KVM_RUN on vCPU \(id)")
        }
        let raw = UnsafeMutableRawPointer(runPage)
        switch runPage.pointee.exit_reason {
        case CL_KVM_EXIT_IO:
            let io = cl_run_io(runPage)
            return .io(port: io.port, isWrite: UInt32(io.direction) == CL_KVM_EXIT_IO_OUT, size: Int(io.size),
                       count: Int(io.count), data: raw + Int(io.data_offset))
        case CL_KVM_EXIT_MMIO:
            let len = min(Int(cl_run_mmio_len(runPage)), 8)
            return .mmio(address: cl_run_mmio_addr(runPage), isWrite: cl_run_mmio_is_write(runPage) != 0,
                         data: UnsafeMutableRawBufferPointer(start: cl_run_mmio_data(runPage), count: len))
        case CL_KVM_EXIT_HLT: return .halt
        case CL_KVM_EXIT_SHUTDOWN: return .shutdown
        case CL_KVM_EXIT_INTR: return .interrupted
        case CL_KVM_EXIT_INTERNAL_ERROR: return .internalError(suberror: cl_run_internal_suberror(runPage))
        case CL_KVM_EXIT_FAIL_ENTRY: return .failEntry(reason: cl_run_fail_entry_reason(runPage))
        case CL_KVM_EXIT_SYSTEM_EVENT: return .systemEvent(type: cl_run_system_event_type(runPage))
        case let reason: return .other(reason: reason)
        }
    }

    public func getRegisters() throws -> kvm_regs {
        var regs = kvm_regs()
        try syscallChecked("KVM_GET_REGS") { cl_ioctl_ptr(fd, CL_KVM_GET_REGS, &regs) }
        return regs
    }

    public func setRegisters(_ regs: kvm_regs) throws {
        var regs = regs
        try syscallChecked("KVM_SET_REGS") { cl_ioctl_ptr(fd, CL_KVM_SET_REGS, &regs) }
    }

    public func getSpecialRegisters() throws -> kvm_sregs {
        var sregs = kvm_sregs()
        try syscallChecked("KVM_GET_SREGS") { cl_ioctl_ptr(fd, CL_KVM_GET_SREGS, &sregs) }
        return sregs
    }

    public func setSpecialRegisters(_ sregs: kvm_sregs) throws {
        var sregs = sregs
        try syscallChecked("KVM_SET_SREGS") { cl_ioctl_ptr(fd, CL_KVM_SET_SREGS, &sregs) }
    }

    public func setCPUID(_ table: CPUIDTable) throws {
        try syscallChecked("KVM_SET_CPUID2") { cl_ioctl_ptr(fd, CL_KVM_SET_CPUID2, table.raw) }
    }
}
