/*
 * PVH entry stub: 32-bit protected mode (paging off, %ebx = hvm_start_info)
 * to 64-bit long mode, then into Swift's guest_main(startInfo).
 *
 * The guest runs roughly 200x slower than native, so everything the CPU
 * needs (GDT, page tables, stack) is prebuilt in the image: no loops run here.
 */

#define XEN_ELFNOTE_PHYS32_ENTRY 18

#define CR0_PG          0x80000000
#define CR4_PAE         0x00000020
#define MSR_EFER        0xc0000080
#define EFER_LME        0x00000100

#define KERNEL_CS       0x08
#define KERNEL_DS       0x10

/*
 * Accessed/dirty bits are preset so the CPU never writes back into the
 * tables (with shadow paging each such update would cost a hypervisor trip).
 */
#define PTE_TABLE       0x23    /* present | writable | accessed */
#define PDE_2M          0xe3    /* present | writable | accessed | dirty | 2 MiB page */

#define STACK_SIZE      16384

/* ------------------------------------------------------------------------ */

    .section .note.pvh, "a", @note
    .balign 4
    .long 4                         /* namesz: "Xen\0" */
    .long 4                         /* descsz: 32-bit physical entry */
    .long XEN_ELFNOTE_PHYS32_ENTRY
    .asciz "Xen"
    .long pvh_start32
    /*
     * An empty note follows. QEMU reads this descriptor as 8 bytes for
     * ELF64 images; the empty note's zero namesz supplies the upper half
     * while staying a well-formed note for parsers that walk the list.
     */
    .long 0, 0, 0

/* ------------------------------------------------------------------------ */

    .section .text.entry, "ax"
    .code32
    .globl pvh_start32
pvh_start32:
    lgdt    gdt_descriptor

    movl    %cr4, %eax
    orl     $CR4_PAE, %eax
    movl    %eax, %cr4

    movl    $pml4, %eax
    movl    %eax, %cr3

    movl    $MSR_EFER, %ecx
    rdmsr
    orl     $EFER_LME, %eax
    wrmsr

    /* CR0.PE is already set by the PVH contract. */
    movl    %cr0, %eax
    orl     $CR0_PG, %eax
    movl    %eax, %cr0

    ljmpl   $KERNEL_CS, $long_mode_entry

    .code64
long_mode_entry:
    movl    $KERNEL_DS, %eax
    movl    %eax, %ds
    movl    %eax, %es
    movl    %eax, %ss

    movl    $stack_top, %esp
    /* A 32-bit move zero-extends: the upper halves are undefined after the mode switch. */
    movl    %ebx, %edi
    call    guest_main

    /* guest_main never returns; stop quietly if it ever does. */
1:  cli
    hlt
    jmp     1b

/* ------------------------------------------------------------------------ */

    .section .rodata.gdt, "a"
    .balign 16
gdt:
    .quad 0
    .quad 0x00af9b000000ffff        /* 0x08: 64-bit code, accessed preset */
    .quad 0x00cf93000000ffff        /* 0x10: flat data, accessed preset */
gdt_end:

    .balign 8
gdt_descriptor:
    .word gdt_end - gdt - 1
    .long gdt

/* ------------------------------------------------------------------------ */

    /*
     * Identity map of the first 4 GiB with 2 MiB pages, emitted as data: RAM
     * and the 32-bit PCI hole (where firmware and our VMM put device BARs).
     * Four page directories follow each other, one per GiB.
     */
    .section .data.pagetables, "aw"
    .balign 4096
    .globl pml4, pdpt
pml4:
    .quad pdpt + PTE_TABLE
    .fill 511, 8, 0
pdpt:
    .quad pd + PTE_TABLE
    .quad pd + 0x1000 + PTE_TABLE
    .quad pd + 0x2000 + PTE_TABLE
    .quad pd + 0x3000 + PTE_TABLE
    .fill 508, 8, 0
pd:
    .set page, 0
    .rept 2048
    .quad page + PDE_2M
    .set page, page + 0x200000
    .endr

    /*
     * Spare tables for one 1 GiB region above 4 GiB (a 64-bit BAR placed
     * there by firmware), filled at run time by PageTables.swift. The PDPT
     * is only used when the region lies beyond the first 512 GiB.
     */
    .section .bss.pagetables, "aw", @nobits
    .balign 4096
    .globl high_pdpt, high_pd
high_pdpt:
    .skip 4096
high_pd:
    .skip 4096

/* ------------------------------------------------------------------------ */

    /* Left in .bss: the VMM hands over zeroed RAM, and a stack needs no init anyway. */
    .section .bss.stack, "aw", @nobits
    .balign 16
    .skip STACK_SIZE
stack_top:

    .section .note.GNU-stack, "", @progbits
