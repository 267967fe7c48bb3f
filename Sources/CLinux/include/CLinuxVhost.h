#ifndef CLINUX_VHOST_H
#define CLINUX_VHOST_H

// linux/vhost.h's ioctl numbers and struct sizes as the C compiler computes them. The
// VMM computes its own (VhostKernel in VhostKernelIO.swift, quoting the header); the unit
// tests compare both, so a wrong size or direction in Swift cannot slip through.
#include <linux/vhost.h>

static const unsigned long CL_VHOST_GET_FEATURES = VHOST_GET_FEATURES;
static const unsigned long CL_VHOST_SET_FEATURES = VHOST_SET_FEATURES;
static const unsigned long CL_VHOST_SET_OWNER = VHOST_SET_OWNER;
static const unsigned long CL_VHOST_RESET_OWNER = VHOST_RESET_OWNER;
static const unsigned long CL_VHOST_SET_MEM_TABLE = VHOST_SET_MEM_TABLE;
static const unsigned long CL_VHOST_SET_LOG_BASE = VHOST_SET_LOG_BASE;
static const unsigned long CL_VHOST_SET_VRING_NUM = VHOST_SET_VRING_NUM;
static const unsigned long CL_VHOST_SET_VRING_ADDR = VHOST_SET_VRING_ADDR;
static const unsigned long CL_VHOST_SET_VRING_BASE = VHOST_SET_VRING_BASE;
static const unsigned long CL_VHOST_GET_VRING_BASE = VHOST_GET_VRING_BASE;
static const unsigned long CL_VHOST_SET_VRING_KICK = VHOST_SET_VRING_KICK;
static const unsigned long CL_VHOST_SET_VRING_CALL = VHOST_SET_VRING_CALL;
static const unsigned long CL_VHOST_SET_VRING_ERR = VHOST_SET_VRING_ERR;
static const unsigned long CL_VHOST_NET_SET_BACKEND = VHOST_NET_SET_BACKEND;
static const unsigned int CL_VHOST_F_LOG_ALL = VHOST_F_LOG_ALL;
static const unsigned int CL_VHOST_NET_F_VIRTIO_NET_HDR = VHOST_NET_F_VIRTIO_NET_HDR;
static const unsigned int CL_VHOST_VRING_F_LOG = VHOST_VRING_F_LOG;

static const unsigned long CL_VHOST_SIZEOF_MEMORY = sizeof(struct vhost_memory);
static const unsigned long CL_VHOST_SIZEOF_MEMORY_REGION = sizeof(struct vhost_memory_region);
static const unsigned long CL_VHOST_SIZEOF_VRING_ADDR = sizeof(struct vhost_vring_addr);
static const unsigned long CL_VHOST_SIZEOF_VRING_STATE = sizeof(struct vhost_vring_state);
static const unsigned long CL_VHOST_SIZEOF_VRING_FILE = sizeof(struct vhost_vring_file);
static const unsigned long CL_VHOST_OFFSETOF_ADDR_LOG = __builtin_offsetof(struct vhost_vring_addr, log_guest_addr);
static const unsigned long CL_VHOST_OFFSETOF_ADDR_USED = __builtin_offsetof(struct vhost_vring_addr, used_user_addr);
static const unsigned long CL_VHOST_OFFSETOF_REGION_USER = __builtin_offsetof(struct vhost_memory_region, userspace_addr);

#endif
