/*
 * x86 instructions Swift cannot spell. Kept static inline so they are
 * emitted into the Swift module and inlined: every extra instruction costs
 * close to a microsecond in this guest.
 */
#ifndef GUEST_CPU_H
#define GUEST_CPU_H

#include <stdint.h>

static inline __attribute__((always_inline)) void cpu_out8(uint16_t port, uint8_t value) {
    __asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline __attribute__((always_inline)) uint8_t cpu_in8(uint16_t port) {
    uint8_t value;
    __asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

/* Spin hint for hosts that never wake a halted vCPU with interrupts off. */
static inline __attribute__((always_inline)) void cpu_pause(void) {
    __asm__ volatile("pause" : : : "memory");
}

/* Interrupts stay off; the VMM resumes the vCPU on input, events or a timer. */
static inline __attribute__((always_inline)) void cpu_halt(void) {
    __asm__ volatile("hlt" : : : "memory");
}

static inline __attribute__((always_inline, noreturn)) void cpu_stop(void) {
    for (;;) {
        __asm__ volatile("cli; hlt" : : : "memory");
    }
}

#endif
