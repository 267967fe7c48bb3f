/*
 * Memory the virtio-net device reads and writes, reserved in .bss: RAM is
 * handed over zeroed, which is exactly the state fresh rings need, and
 * reserving it costs the image nothing. Layout in include/memory.h.
 */
#include "include/memory.h"

    .section .bss.net, "aw", @nobits

    /* One page per queue: descriptor table, available ring, used ring, bookkeeping. */
    .balign 4096
    .globl net_queue_pages
net_queue_pages:
    .skip NET_QUEUE_PAGES * NET_QUEUE_PAGE_SIZE

    .balign 64
    .globl net_rx_buffers
net_rx_buffers:
    .skip NET_MAX_PAIRS * NET_RX_QUEUE_SIZE * NET_BUFFER_SIZE

    .balign 64
    .globl net_tx_buffers
net_tx_buffers:
    .skip NET_MAX_PAIRS * NET_TX_QUEUE_SIZE * NET_BUFFER_SIZE

    .section .note.GNU-stack, "", @progbits
