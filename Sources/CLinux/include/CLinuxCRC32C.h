#ifndef CLINUX_CRC32C_H
#define CLINUX_CRC32C_H

#include <stddef.h>
#include <stdint.h>

// CRC-32C (Castagnoli) over migration sections. The host VMM may use SSE4.2 (only the
// guest may not): the crc32 instruction checks 8 bytes per cycle, where a table walks one
// byte at a time, which made the checksum the slowest step of sending RAM.
uint32_t cl_crc32c(uint32_t crc, const void *data, size_t length);

#endif
