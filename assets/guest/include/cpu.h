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

static inline __attribute__((always_inline)) void cpu_out32(uint16_t port, uint32_t value) {
    __asm__ volatile("outl %0, %1" : : "a"(value), "Nd"(port));
}

static inline __attribute__((always_inline)) uint32_t cpu_in32(uint16_t port) {
    uint32_t value;
    __asm__ volatile("inl %1, %0" : "=a"(value) : "Nd"(port));
    return value;
}

/* Takes several microseconds on this host: read it once per loop, not per packet. */
static inline __attribute__((always_inline)) uint64_t cpu_rdtsc(void) {
    uint32_t low, high;
    __asm__ volatile("rdtsc" : "=a"(low), "=d"(high));
    return ((uint64_t)high << 32) | low;
}

typedef struct {
    uint32_t eax, ebx, ecx, edx;
} cpu_cpuid_result;

static inline __attribute__((always_inline)) cpu_cpuid_result cpu_cpuid(uint32_t leaf) {
    cpu_cpuid_result r;
    __asm__ volatile("cpuid" : "=a"(r.eax), "=b"(r.ebx), "=c"(r.ecx), "=d"(r.edx) : "a"(leaf), "c"(0));
    return r;
}

static inline __attribute__((always_inline)) void cpu_wrmsr(uint32_t msr, uint64_t value) {
    __asm__ volatile("wrmsr" : : "c"(msr), "a"((uint32_t)value), "d"((uint32_t)(value >> 32)) : "memory");
}

/* Reloading CR3 drops every cached translation: used after mapping a region at run time. */
static inline __attribute__((always_inline)) void cpu_reload_cr3(void) {
    uint64_t cr3;
    __asm__ volatile("mov %%cr3, %0; mov %0, %%cr3" : "=r"(cr3) : : "memory");
}

/*
 * Device memory. Each access is one instruction of exactly the given width
 * (a device may not accept split or merged accesses) and a compiler barrier,
 * so ring updates in RAM are never moved across a register access.
 */
static inline __attribute__((always_inline)) uint8_t mmio_read8(uint64_t address) {
    uint8_t value;
    __asm__ volatile("movb (%1), %0" : "=q"(value) : "r"(address) : "memory");
    return value;
}

static inline __attribute__((always_inline)) uint16_t mmio_read16(uint64_t address) {
    uint16_t value;
    __asm__ volatile("movw (%1), %0" : "=r"(value) : "r"(address) : "memory");
    return value;
}

static inline __attribute__((always_inline)) uint32_t mmio_read32(uint64_t address) {
    uint32_t value;
    __asm__ volatile("movl (%1), %0" : "=r"(value) : "r"(address) : "memory");
    return value;
}

static inline __attribute__((always_inline)) void mmio_write8(uint64_t address, uint8_t value) {
    __asm__ volatile("movb %0, (%1)" : : "q"(value), "r"(address) : "memory");
}

static inline __attribute__((always_inline)) void mmio_write16(uint64_t address, uint16_t value) {
    __asm__ volatile("movw %0, (%1)" : : "r"(value), "r"(address) : "memory");
}

static inline __attribute__((always_inline)) void mmio_write32(uint64_t address, uint32_t value) {
    __asm__ volatile("movl %0, (%1)" : : "r"(value), "r"(address) : "memory");
}

/*
 * RAM shared with a device (virtqueue indices): the acquire after reading
 * used.idx and the release before publishing avail.idx that virtio asks of a
 * driver. x86 is TSO (loads are not reordered with older loads, stores not
 * with older stores), so neither needs a fence instruction, only a compiler
 * barrier (the "memory" clobber) to keep the compiler from moving ring
 * accesses across the index access. No SSE either way (-mgeneral-regs-only).
 */
static inline __attribute__((always_inline)) uint16_t shared_load16_acquire(const void *address) {
    uint16_t value;
    __asm__ volatile("movw (%1), %0" : "=r"(value) : "r"(address) : "memory");
    return value;
}

static inline __attribute__((always_inline)) uint8_t shared_load8(const void *address) {
    uint8_t value;
    __asm__ volatile("movb (%1), %0" : "=q"(value) : "r"(address) : "memory");
    return value;
}

static inline __attribute__((always_inline)) void shared_store16_release(void *address, uint16_t value) {
    __asm__ volatile("movw %0, (%1)" : : "r"(value), "r"(address) : "memory");
}

/*
 * String moves: the host runs one step per element, so eight bytes per step
 * beat a byte loop many times over. No vector registers are involved.
 */
static inline __attribute__((always_inline)) void mem_copy(void *destination, const void *source, uint64_t count) {
    uint64_t words = count >> 3, bytes = count & 7;
    __asm__ volatile("rep movsq\n\tmov %3, %%rcx\n\trep movsb"
                     : "+D"(destination), "+S"(source), "+c"(words)
                     : "r"(bytes)
                     : "memory");
}

static inline __attribute__((always_inline)) void mem_zero(void *destination, uint64_t count) {
    uint64_t words = count >> 3, bytes = count & 7;
    __asm__ volatile("rep stosq\n\tmov %2, %%rcx\n\trep stosb"
                     : "+D"(destination), "+c"(words)
                     : "r"(bytes), "a"(0)
                     : "memory");
}

#endif
