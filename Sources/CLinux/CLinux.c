#include "CLinux.h"

#include "CLinuxCRC32C.h"

static uint32_t crc32c_table[256];
static pthread_once_t crc32c_table_once = PTHREAD_ONCE_INIT;

static void crc32c_init_table(void) {
    for (uint32_t n = 0; n < 256; n++) {
        uint32_t c = n;
        for (int k = 0; k < 8; k++) c = c & 1 ? 0x82F63B78u ^ (c >> 1) : c >> 1;
        crc32c_table[n] = c;
    }
}

__attribute__((target("sse4.2")))
static uint32_t crc32c_hardware(uint32_t crc, const uint8_t *p, size_t length) {
    uint64_t c = crc;
    while (length >= 8) {
        uint64_t word;
        __builtin_memcpy(&word, p, 8);
        c = __builtin_ia32_crc32di(c, word);
        p += 8;
        length -= 8;
    }
    uint32_t c32 = (uint32_t)c;
    while (length--) c32 = __builtin_ia32_crc32qi(c32, *p++);
    return c32;
}

uint32_t cl_crc32c(uint32_t crc, const void *data, size_t length) {
    const uint8_t *p = data;
    crc = ~crc;
    if (__builtin_cpu_supports("sse4.2")) {
        crc = crc32c_hardware(crc, p, length);
    } else {
        pthread_once(&crc32c_table_once, crc32c_init_table);
        while (length--) crc = crc32c_table[(crc ^ *p++) & 0xFF] ^ (crc >> 8);
    }
    return ~crc;
}
