import CLinux
import Glibc

/// The open /dev/kvm: the system-level ioctls (API version, capabilities, CPUID).
public final class Hypervisor {
    let fd: Int32
    public let vcpuMmapSize: Int

    public init(path: String = "/dev/kvm") throws {
        let fd = try syscallRetrying("open \(path)") { cl_open(path, O_RDWR | O_CLOEXEC, 0) }
        self.fd = fd
        do {
            let version = try syscallChecked("KVM_GET_API_VERSION") { cl_ioctl_val(fd, CL_KVM_GET_API_VERSION, 0) }
            guard version == KVM_API_VERSION else {
                throw SystemError("KVM API version \(version) (expected \(KVM_API_VERSION))", errno: EINVAL)
            }
            for (cap, name) in [(CL_KVM_CAP_USER_MEMORY, "KVM_CAP_USER_MEMORY"), (CL_KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT")] {
                guard cl_ioctl_val(fd, CL_KVM_CHECK_EXTENSION, UInt(cap)) > 0 else {
                    throw SystemError("\(path) lacks \(name)", errno: ENOTSUP)
                }
            }
            vcpuMmapSize = Int(try syscallChecked("KVM_GET_VCPU_MMAP_SIZE") { cl_ioctl_val(fd, CL_KVM_GET_VCPU_MMAP_SIZE, 0) })
        } catch {
            close(fd)
            throw error
        }
    }

    deinit { close(fd) }

    /// The CPUID leaves KVM can virtualize on this host, as a KVM_SET_CPUID2-ready buffer.
    /// KVM_CHECK_EXTENSION: 0 when `capability` is missing, else its value.
    public func checkExtension(_ capability: Int32) -> Int32 {
        max(0, cl_ioctl_val(fd, CL_KVM_CHECK_EXTENSION, UInt(capability)))
    }

    public func supportedCPUID() throws -> CPUIDTable {
        var capacity = 128
        while true {
            let table = CPUIDTable(capacity: capacity)
            let rc = cl_ioctl_ptr(fd, CL_KVM_GET_SUPPORTED_CPUID, table.raw)
            if rc == 0 { return table }
            if errno == E2BIG && capacity < 4096 {
                capacity *= 2
                continue
            }
            throw SystemError("KVM_GET_SUPPORTED_CPUID")
        }
    }

    public func createVM() throws -> VirtualMachine {
        let vmfd = try syscallRetrying("KVM_CREATE_VM") { cl_ioctl_val(fd, CL_KVM_CREATE_VM, 0) }
        return VirtualMachine(fd: vmfd, vcpuMmapSize: vcpuMmapSize)
    }
}

/// A `struct kvm_cpuid2` with its trailing entries, owned as one allocation.
public final class CPUIDTable {
    let raw: UnsafeMutableRawPointer
    let capacity: Int

    init(capacity: Int) {
        self.capacity = capacity
        let size = MemoryLayout<kvm_cpuid2>.size + capacity * MemoryLayout<kvm_cpuid_entry2>.stride
        raw = UnsafeMutableRawPointer.allocate(byteCount: size, alignment: 8)
        raw.initializeMemory(as: UInt8.self, repeating: 0, count: size)
        raw.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent = UInt32(capacity)
    }

    deinit { raw.deallocate() }

    var entries: UnsafeMutableBufferPointer<kvm_cpuid_entry2> {
        let count = Int(raw.assumingMemoryBound(to: kvm_cpuid2.self).pointee.nent)
        let base = (raw + MemoryLayout<kvm_cpuid2>.size).assumingMemoryBound(to: kvm_cpuid_entry2.self)
        return UnsafeMutableBufferPointer(start: base, count: count)
    }

    /// A copy with `leaf` set (added if missing), and the max-leaf entry `base` raised to cover it.
    public func adding(leaf: UInt32, eax: UInt32, raisingMaxOf base: UInt32) -> CPUIDTable {
        var list = Array(entries).filter { $0.function != leaf }
        var entry = kvm_cpuid_entry2()
        entry.function = leaf
        entry.eax = eax
        list.append(entry)
        let copy = CPUIDTable(capacity: list.count)
        let out = copy.entries
        for (i, e) in list.enumerated() { out[i] = e }
        copy.update(leaf: base) { $0.eax = max($0.eax, leaf) }
        return copy
    }

    /// Applies `body` to every entry of a leaf (all sub-leaves).
    public func update(leaf: UInt32, _ body: (inout kvm_cpuid_entry2) -> Void) {
        let all = entries
        for i in all.indices where all[i].function == leaf { body(&all[i]) }
    }
}
