// SCM_RIGHTS over unix sockets: QMP `getfd`, and later migration channels, carry file
// descriptors next to their message. The CMSG macros cannot be used from Swift.
#ifndef CLINUX_FD_PASSING_H
#define CLINUX_FD_PASSING_H

#include <errno.h>
#include <string.h>
#include <unistd.h>
#include <sys/socket.h>
#include <sys/uio.h>

#define CL_MAX_PASSED_FDS 64

/// recvmsg into `buf`; received fds (close-on-exec) go to `fds` (capacity `max_fds`,
/// extra ones are closed) and their count to `*nfds`. Returns bytes read or -errno.
static inline long cl_recv_with_fds_flags(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds, int flags);

static inline long cl_recv_with_fds(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds) {
    return cl_recv_with_fds_flags(sock, buf, len, fds, max_fds, nfds, 0);
}

/// recvmsg with extra flags (MSG_DONTWAIT to poll); -EAGAIN when nothing is there yet.
static inline long cl_recv_with_fds_flags(int sock, void *buf, size_t len, int *fds, int max_fds, int *nfds, int flags) {
    union { struct cmsghdr align; char space[CMSG_SPACE(sizeof(int) * CL_MAX_PASSED_FDS)]; } control;
    struct iovec iov = { buf, len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.space;
    msg.msg_controllen = sizeof control.space;
    *nfds = 0;
    ssize_t n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC | flags);
    if (n < 0) return -errno;
    for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); c; c = CMSG_NXTHDR(&msg, c)) {
        if (c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS) continue;
        int count = (int)((c->cmsg_len - CMSG_LEN(0)) / sizeof(int));
        int *received = (int *)CMSG_DATA(c);
        for (int i = 0; i < count; i++) {
            if (*nfds < max_fds) fds[(*nfds)++] = received[i];
            else close(received[i]);
        }
    }
    return (long)n;
}

/// sendmsg of `len` bytes with `nfds` fds attached. Returns bytes sent or -errno.
static inline long cl_send_with_fds(int sock, const void *buf, size_t len, const int *fds, int nfds) {
    if (nfds < 0 || nfds > CL_MAX_PASSED_FDS) return -EINVAL;
    union { struct cmsghdr align; char space[CMSG_SPACE(sizeof(int) * CL_MAX_PASSED_FDS)]; } control;
    struct iovec iov = { (void *)buf, len };
    struct msghdr msg;
    memset(&msg, 0, sizeof msg);
    msg.msg_iov = &iov;
    msg.msg_iovlen = 1;
    if (nfds > 0) {
        msg.msg_control = control.space;
        msg.msg_controllen = CMSG_SPACE(sizeof(int) * nfds);
        struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int) * nfds);
        memcpy(CMSG_DATA(c), fds, sizeof(int) * nfds);
    }
    ssize_t n = sendmsg(sock, &msg, MSG_NOSIGNAL);
    return n < 0 ? -errno : (long)n;
}

static const int CL_MSG_DONTWAIT = MSG_DONTWAIT;

#endif
