// Kernel UAPI for Swift. Swift cannot import function-like macros (ioctl numbers)
// nor anonymous unions cleanly, so this header turns them into constants and accessors.
#ifndef CLINUX_H
#define CLINUX_H

// No _GNU_SOURCE here: it changes glibc's struct definitions (fd_set) and clashes with
// Swift's own Glibc module. The few GNU functions needed are declared explicitly below.

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/syscall.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/sysinfo.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>
#include <linux/kvm.h>
#include "CLinuxTap.h"
#include "CLinuxFDPassing.h"
#include "CLinuxVCPUState.h"
#include "CLinuxDirtyLog.h"
#include "CLinuxCRC32C.h"

// MARK: ioctl numbers

static const unsigned long CL_KVM_GET_API_VERSION = KVM_GET_API_VERSION;
static const unsigned long CL_KVM_CREATE_VM = KVM_CREATE_VM;
static const unsigned long CL_KVM_CHECK_EXTENSION = KVM_CHECK_EXTENSION;
static const unsigned long CL_KVM_GET_VCPU_MMAP_SIZE = KVM_GET_VCPU_MMAP_SIZE;
static const unsigned long CL_KVM_GET_SUPPORTED_CPUID = KVM_GET_SUPPORTED_CPUID;
static const unsigned long CL_KVM_SET_TSS_ADDR = KVM_SET_TSS_ADDR;
static const unsigned long CL_KVM_SET_IDENTITY_MAP_ADDR = KVM_SET_IDENTITY_MAP_ADDR;
static const unsigned long CL_KVM_SET_USER_MEMORY_REGION = KVM_SET_USER_MEMORY_REGION;
static const unsigned long CL_KVM_CREATE_VCPU = KVM_CREATE_VCPU;
static const unsigned long CL_KVM_RUN = KVM_RUN;
static const unsigned long CL_KVM_GET_REGS = KVM_GET_REGS;
static const unsigned long CL_KVM_SET_REGS = KVM_SET_REGS;
static const unsigned long CL_KVM_GET_SREGS = KVM_GET_SREGS;
static const unsigned long CL_KVM_SET_SREGS = KVM_SET_SREGS;
static const unsigned long CL_KVM_SET_CPUID2 = KVM_SET_CPUID2;
static const unsigned long CL_KVM_GET_DIRTY_LOG = KVM_GET_DIRTY_LOG;
static const unsigned long CL_KVM_GET_TSC_KHZ = KVM_GET_TSC_KHZ;
static const unsigned long CL_KVM_IOEVENTFD = KVM_IOEVENTFD;
static const unsigned int CL_KVM_IOEVENTFD_FLAG_DEASSIGN = KVM_IOEVENTFD_FLAG_DEASSIGN;

static const int CL_KVM_CAP_USER_MEMORY = KVM_CAP_USER_MEMORY;
static const int CL_KVM_CAP_IMMEDIATE_EXIT = KVM_CAP_IMMEDIATE_EXIT;
static const int CL_KVM_CAP_EXT_CPUID = KVM_CAP_EXT_CPUID;
static const int CL_KVM_CAP_IOEVENTFD = KVM_CAP_IOEVENTFD;
static const int CL_KVM_CAP_IOEVENTFD_ANY_LENGTH = KVM_CAP_IOEVENTFD_ANY_LENGTH;

static const unsigned int CL_KVM_EXIT_UNKNOWN = KVM_EXIT_UNKNOWN;
static const unsigned int CL_KVM_EXIT_IO = KVM_EXIT_IO;
static const unsigned int CL_KVM_EXIT_HLT = KVM_EXIT_HLT;
static const unsigned int CL_KVM_EXIT_MMIO = KVM_EXIT_MMIO;
static const unsigned int CL_KVM_EXIT_SHUTDOWN = KVM_EXIT_SHUTDOWN;
static const unsigned int CL_KVM_EXIT_FAIL_ENTRY = KVM_EXIT_FAIL_ENTRY;
static const unsigned int CL_KVM_EXIT_INTR = KVM_EXIT_INTR;
static const unsigned int CL_KVM_EXIT_INTERNAL_ERROR = KVM_EXIT_INTERNAL_ERROR;
static const unsigned int CL_KVM_EXIT_SYSTEM_EVENT = KVM_EXIT_SYSTEM_EVENT;
static const unsigned int CL_KVM_EXIT_IO_IN = KVM_EXIT_IO_IN;
static const unsigned int CL_KVM_EXIT_IO_OUT = KVM_EXIT_IO_OUT;

static const unsigned long CL_TIOCGWINSZ = TIOCGWINSZ;

// MARK: variadic / union helpers

static inline int cl_ioctl_ptr(int fd, unsigned long request, void *arg) {
    return ioctl(fd, request, arg);
}
static inline int cl_ioctl_val(int fd, unsigned long request, unsigned long value) {
    return ioctl(fd, request, value);
}
static inline int cl_fcntl_int(int fd, int cmd, int value) {
    return fcntl(fd, cmd, value);
}
static inline int cl_open(const char *path, int flags, mode_t mode) {
    return open(path, flags, mode);
}
static inline int cl_errno(void) { return errno; }
int accept4(int fd, struct sockaddr *addr, socklen_t *len, int flags);
static inline int cl_accept(int fd) { return accept4(fd, NULL, NULL, SOCK_CLOEXEC); }
int pthread_setname_np(pthread_t thread, const char *name);
static inline int cl_set_thread_name(pthread_t thread, const char *name) { return pthread_setname_np(thread, name); }
int memfd_create(const char *name, unsigned int flags);
static inline int cl_memfd_create(const char *name, unsigned int flags) { return memfd_create(name, flags); }
static const unsigned int CL_MFD_CLOEXEC = 0x0001U;
#include <spawn.h>
/// glibc 2.34+ only, hence weak: callers check `cl_spawn_can_close_from()` first.
int posix_spawn_file_actions_addclosefrom_np(posix_spawn_file_actions_t *actions, int from) __attribute__((weak));
static inline int cl_spawn_can_close_from(void) { return posix_spawn_file_actions_addclosefrom_np != NULL; }
static inline int cl_spawn_add_close_from(posix_spawn_file_actions_t *actions, int from) {
    return posix_spawn_file_actions_addclosefrom_np ? posix_spawn_file_actions_addclosefrom_np(actions, from) : -1;
}
static inline int cl_eventfd(unsigned int initial, int flags) { return eventfd(initial, flags); }
static const int CL_EFD_CLOEXEC = EFD_CLOEXEC;
static const int CL_EFD_NONBLOCK = EFD_NONBLOCK;

static inline struct kvm_run_io_view {
    uint8_t direction;
    uint8_t size;
    uint16_t port;
    uint32_t count;
    uint64_t data_offset;
} cl_run_io(const struct kvm_run *run) {
    struct kvm_run_io_view v = { run->io.direction, run->io.size, run->io.port, run->io.count, run->io.data_offset };
    return v;
}
static inline uint8_t *cl_run_mmio_data(struct kvm_run *run) { return run->mmio.data; }
static inline uint64_t cl_run_mmio_addr(const struct kvm_run *run) { return run->mmio.phys_addr; }
static inline uint32_t cl_run_mmio_len(const struct kvm_run *run) { return run->mmio.len; }
static inline uint8_t cl_run_mmio_is_write(const struct kvm_run *run) { return run->mmio.is_write; }
static inline uint32_t cl_run_internal_suberror(const struct kvm_run *run) { return run->internal.suberror; }
static inline uint64_t cl_run_fail_entry_reason(const struct kvm_run *run) {
    return run->fail_entry.hardware_entry_failure_reason;
}
static inline uint32_t cl_run_system_event_type(const struct kvm_run *run) { return run->system_event.type; }

// MARK: signals (Swift cannot build a sigaction with a handler union)

static void cl_noop_signal_handler(int sig) { (void)sig; }
/// Installs a handler that does nothing and does not restart syscalls, so that
/// pthread_kill(thread, sig) makes a blocking KVM_RUN or poll() return EINTR.
static inline int cl_install_kick_signal(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = cl_noop_signal_handler;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}
static inline int cl_ignore_signal(int sig) {
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_handler = SIG_IGN;
    sigemptyset(&sa.sa_mask);
    return sigaction(sig, &sa, NULL);
}

static inline sigset_t cl_sigset_of(const int *sigs, int count) {
    sigset_t set;
    sigemptyset(&set);
    for (int i = 0; i < count; i++) sigaddset(&set, sigs[i]);
    return set;
}
/// A signalfd for `sigs` (which the caller has blocked in every thread).
static inline int cl_signalfd(const int *sigs, int count) {
    sigset_t set = cl_sigset_of(sigs, count);
    return signalfd(-1, &set, SFD_CLOEXEC | SFD_NONBLOCK);
}
static inline int cl_block_signals(const int *sigs, int count) {
    sigset_t set = cl_sigset_of(sigs, count);
    return pthread_sigmask(SIG_BLOCK, &set, NULL);
}
static inline int cl_gettid(void) { return (int)syscall(SYS_gettid); }

// MARK: wait status

static inline int cl_wifexited(int status) { return WIFEXITED(status); }
static inline int cl_wexitstatus(int status) { return WEXITSTATUS(status); }
static inline int cl_wifsignaled(int status) { return WIFSIGNALED(status); }
static inline int cl_wtermsig(int status) { return WTERMSIG(status); }

// MARK: TestKit: network namespaces and persistent TAPs

#include <net/if.h>
#include <linux/if_tun.h>

// sched.h declares these only with _GNU_SOURCE.
int unshare(int flags);
int setns(int fd, int nstype);
static const int CL_CLONE_NEWNET = 0x40000000;
static inline int cl_unshare(int flags) { return unshare(flags); }
static inline int cl_setns(int fd, int nstype) { return setns(fd, nstype); }

// Declared here instead of including <sys/mount.h>, which clashes with <linux/mount.h>
// (pulled in by other UAPI headers) on glibc before 2.36. Flag values from linux/mount.h.
int mount(const char *source, const char *target, const char *type, unsigned long flags, const void *data);
int umount2(const char *target, int flags);
/// `mount --bind SOURCE TARGET`, as `ip netns add` pins a namespace to /run/netns/NAME.
static inline int cl_mount_bind(const char *source, const char *target) {
    return mount(source, target, "none", 4096UL /* MS_BIND */, NULL);
}
/// `mount --make-rshared TARGET`; `cl_mount_bind_recursive` first when TARGET is no mount point (EINVAL).
static inline int cl_mount_make_shared(const char *target) {
    return mount("", target, "none", (1UL << 20) /* MS_SHARED */ | 16384UL /* MS_REC */, NULL);
}
static inline int cl_mount_bind_recursive(const char *source, const char *target) {
    return mount(source, target, "none", 4096UL /* MS_BIND */ | 16384UL /* MS_REC */, NULL);
}
static inline int cl_umount_detach(const char *target) { return umount2(target, 2 /* MNT_DETACH */); }

static const int CL_IFF_UP = IFF_UP;
static const int CL_IFF_TAP = IFF_TAP;
static const int CL_IFF_NO_PI = IFF_NO_PI;
static const int CL_IFF_VNET_HDR = IFF_VNET_HDR;
static const int CL_IFF_MULTI_QUEUE = IFF_MULTI_QUEUE;
static const int CL_IFNAMSIZ = IFNAMSIZ;
/// TUNSETPERSIST on an attached queue: 1 keeps the device when its last queue closes. 0 or -errno.
static inline int cl_tun_set_persist(int fd, int persist) {
    return ioctl(fd, TUNSETPERSIST, (unsigned long)persist) < 0 ? -errno : 0;
}

#endif
