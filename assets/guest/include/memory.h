/*
 * Static memory reserved in assembly (entry.S, dma.S): page-aligned, in
 * .bss where it needs no contents, so it costs nothing at boot. The sizes
 * below are shared by the assembly that reserves the memory and the Swift
 * code that carves it up.
 */
#ifndef GUEST_MEMORY_H
#define GUEST_MEMORY_H

/* Queue pairs the guest drives at most; the device may offer more. */
#define NET_MAX_PAIRS 8
/* Queues with a page of their own: a receive and a transmit queue per pair, and the control queue. */
#define NET_QUEUE_PAGES 17
#define NET_QUEUE_PAGE_SIZE 4096
/*
 * Descriptors per receive queue and per transmit queue: powers of two (the
 * device may allow fewer), at most 64 to fit the page layout in Virtqueue.swift.
 */
#define NET_RX_QUEUE_SIZE 64
#define NET_TX_QUEUE_SIZE 16
/* One packet: 12-byte virtio-net header and an Ethernet frame of up to 1518 bytes (VLAN-tagged), rounded up to 8. */
#define NET_BUFFER_SIZE 1544

#ifndef __ASSEMBLER__
#include <stdint.h>

/* Page tables from entry.S: the boot PML4 and PDPT, and one spare PDPT and PD for a region above 4 GiB. */
static inline __attribute__((always_inline)) uint64_t *memory_pml4(void) {
    extern uint64_t pml4[];
    return pml4;
}

static inline __attribute__((always_inline)) uint64_t *memory_pdpt(void) {
    extern uint64_t pdpt[];
    return pdpt;
}

static inline __attribute__((always_inline)) uint64_t *memory_high_pdpt(void) {
    extern uint64_t high_pdpt[];
    return high_pdpt;
}

static inline __attribute__((always_inline)) uint64_t *memory_high_pd(void) {
    extern uint64_t high_pd[];
    return high_pd;
}

/* dma.S: NET_QUEUE_PAGES queue pages, then the receive and the transmit packet buffers. */
static inline __attribute__((always_inline)) uint8_t *memory_net_queue_pages(void) {
    extern uint8_t net_queue_pages[];
    return net_queue_pages;
}

static inline __attribute__((always_inline)) uint8_t *memory_net_rx_buffers(void) {
    extern uint8_t net_rx_buffers[];
    return net_rx_buffers;
}

static inline __attribute__((always_inline)) uint8_t *memory_net_tx_buffers(void) {
    extern uint8_t net_tx_buffers[];
    return net_tx_buffers;
}
#endif

#endif
