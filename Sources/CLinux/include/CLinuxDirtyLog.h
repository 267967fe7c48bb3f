#ifndef CLINUX_DIRTY_LOG_H
#define CLINUX_DIRTY_LOG_H

#include <linux/kvm.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

// KVM_GET_DIRTY_LOG takes a struct with an anonymous union, which Swift cannot
// initialise conveniently; the bitmap has one bit per page of the slot, in 64-bit words.
static inline int cl_kvm_get_dirty_log(int vmfd, uint32_t slot, uint64_t *bitmap) {
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof(log));
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    return ioctl(vmfd, KVM_GET_DIRTY_LOG, &log);
}

// Pages the VMM itself writes (virtio rings and RX buffers) are marked from several
// threads while the migration thread collects them: word-wise atomics.
static inline void cl_atomic_or_u64(uint64_t *word, uint64_t bits) {
    __atomic_fetch_or(word, bits, __ATOMIC_RELAXED);
}

static inline uint64_t cl_atomic_take_u64(uint64_t *word) {
    return __atomic_exchange_n(word, 0, __ATOMIC_ACQ_REL);
}

// vhost's dirty log is byte-addressed (bit p%8 of byte p/8), and a back-end may map it at
// any offset its front-end names: byte-wise atomics need no alignment.
static inline void cl_atomic_or_u8(uint8_t *byte, uint8_t bits) {
    __atomic_fetch_or(byte, bits, __ATOMIC_RELEASE);
}

// lseek's SEEK_DATA/SEEK_HOLE (glibc hides them without _GNU_SOURCE): the first pre-copy
// pass skips the holes of shared RAM, pages the guest never touched, without reading them.
static const int CL_SEEK_DATA = 3;
static const int CL_SEEK_HOLE = 4;

// fallocate (GNU): a migration target empties a RAM file that holds an earlier guest's
// pages before RAM is copied into it, since the source never sends zero pages.
int fallocate(int fd, int mode, off_t offset, off_t len);
static inline int cl_punch_hole(int fd, off_t offset, off_t len) {
    return fallocate(fd, 0x01 /* FALLOC_FL_KEEP_SIZE */ | 0x02 /* FALLOC_FL_PUNCH_HOLE */, offset, len);
}

#endif
