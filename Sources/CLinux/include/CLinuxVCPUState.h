// vCPU state ioctls for saving and restoring a vCPU (migration). kvm_msrs has a
// flexible array, so MSR access goes through these helpers.
#ifndef CLINUX_VCPU_STATE_H
#define CLINUX_VCPU_STATE_H

#include <errno.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <linux/kvm.h>

static const unsigned long CL_KVM_GET_FPU = KVM_GET_FPU;
static const unsigned long CL_KVM_SET_FPU = KVM_SET_FPU;
static const unsigned long CL_KVM_GET_VCPU_EVENTS = KVM_GET_VCPU_EVENTS;
static const unsigned long CL_KVM_SET_VCPU_EVENTS = KVM_SET_VCPU_EVENTS;
static const unsigned long CL_KVM_GET_XCRS = KVM_GET_XCRS;
static const unsigned long CL_KVM_SET_XCRS = KVM_SET_XCRS;

/// Reads `n` MSRs; returns how many KVM read (it stops at the first it cannot), or -errno.
static inline int cl_kvm_get_msrs(int vcpu, const uint32_t *indices, uint64_t *values, int n) {
    struct kvm_msrs *m = calloc(1, sizeof(struct kvm_msrs) + (size_t)n * sizeof(struct kvm_msr_entry));
    if (!m) return -ENOMEM;
    m->nmsrs = (uint32_t)n;
    for (int i = 0; i < n; i++) m->entries[i].index = indices[i];
    int rc = ioctl(vcpu, KVM_GET_MSRS, m);
    if (rc < 0) rc = -errno;
    for (int i = 0; i < rc; i++) values[i] = m->entries[i].data;
    free(m);
    return rc;
}

/// Writes `n` MSRs; returns how many KVM accepted, or -errno.
static inline int cl_kvm_set_msrs(int vcpu, const uint32_t *indices, const uint64_t *values, int n) {
    struct kvm_msrs *m = calloc(1, sizeof(struct kvm_msrs) + (size_t)n * sizeof(struct kvm_msr_entry));
    if (!m) return -ENOMEM;
    m->nmsrs = (uint32_t)n;
    for (int i = 0; i < n; i++) {
        m->entries[i].index = indices[i];
        m->entries[i].data = values[i];
    }
    int rc = ioctl(vcpu, KVM_SET_MSRS, m);
    if (rc < 0) rc = -errno;
    free(m);
    return rc;
}

/// The MSR indices /dev/kvm can save and restore (KVM_GET_MSR_INDEX_LIST), up to `max`.
static inline int cl_kvm_msr_index_list(int kvm, uint32_t *indices, int max) {
    struct kvm_msr_list *l = calloc(1, sizeof(struct kvm_msr_list) + (size_t)max * sizeof(uint32_t));
    if (!l) return -ENOMEM;
    l->nmsrs = (uint32_t)max;
    int rc = ioctl(kvm, KVM_GET_MSR_INDEX_LIST, l);
    if (rc < 0) rc = -errno;
    else {
        rc = (int)l->nmsrs;
        memcpy(indices, l->indices, (size_t)rc * sizeof(uint32_t));
    }
    free(l);
    return rc;
}

#endif
