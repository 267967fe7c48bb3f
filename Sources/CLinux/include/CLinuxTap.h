// TAP queue handling for the VMM's TAP backend. struct ifreq and the TUN ioctls are
// awkward from Swift, so the whole open-and-attach step lives here.
#ifndef CLINUX_TAP_H
#define CLINUX_TAP_H

#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#include <errno.h>
#include <sys/ioctl.h>
#include <net/if.h>
#include <linux/if_tun.h>

static const int CL_TAP_IFF_VNET_HDR = IFF_VNET_HDR;
static const int CL_TAP_IFF_MULTI_QUEUE = IFF_MULTI_QUEUE;

/// Opens /dev/net/tun and attaches one queue of TAP `name` (created if missing; an empty
/// name lets the kernel choose). `extra_flags`: IFF_VNET_HDR and/or IFF_MULTI_QUEUE.
/// Writes the device's name to `name_out` (IFNAMSIZ bytes). Returns the fd or -errno.
static inline int cl_tap_open_queue(const char *name, int extra_flags, char *name_out) {
    int fd = open("/dev/net/tun", O_RDWR | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) return -errno;
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = (short)(IFF_TAP | IFF_NO_PI | extra_flags);
    if (name) strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    if (ioctl(fd, TUNSETIFF, &ifr) < 0) {
        int e = errno;
        close(fd);
        return -e;
    }
    if (name_out) memcpy(name_out, ifr.ifr_name, IFNAMSIZ);
    return fd;
}

/// The IFF_* flags of the TAP an fd is attached to (TUNGETIFF), or -errno.
static inline int cl_tap_get_flags(int fd, char *name_out) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    if (ioctl(fd, TUNGETIFF, &ifr) < 0) return -errno;
    if (name_out) memcpy(name_out, ifr.ifr_name, IFNAMSIZ);
    return ifr.ifr_flags & 0xffff;
}

static inline int cl_tap_set_vnet_header_size(int fd, int size) {
    return ioctl(fd, TUNSETVNETHDRSZ, &size) < 0 ? -errno : 0;
}

static inline int cl_tap_set_offload(int fd, unsigned int offload) {
    return ioctl(fd, TUNSETOFFLOAD, (unsigned long)offload) < 0 ? -errno : 0;
}

/// Attaches (1) or detaches (0) a queue of a multi-queue TAP, so the kernel only steers
/// packets to queues the guest uses.
static inline int cl_tap_set_queue_attached(int fd, int attached) {
    struct ifreq ifr;
    memset(&ifr, 0, sizeof ifr);
    ifr.ifr_flags = attached ? IFF_ATTACH_QUEUE : IFF_DETACH_QUEUE;
    return ioctl(fd, TUNSETQUEUE, &ifr) < 0 ? -errno : 0;
}

static inline int cl_tap_features(int *features) {
    int fd = open("/dev/net/tun", O_RDWR | O_CLOEXEC);
    if (fd < 0) return -errno;
    unsigned int f = 0;
    int rc = ioctl(fd, TUNGETFEATURES, &f);
    int e = errno;
    close(fd);
    if (rc < 0) return -e;
    *features = (int)f;
    return 0;
}

#endif
