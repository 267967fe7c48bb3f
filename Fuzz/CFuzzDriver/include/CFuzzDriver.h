#pragma once
#include <stddef.h>
#include <stdint.h>

/// Runs libFuzzer's driver (flags, corpus, mutation loop) on `test`. It exists only in
/// binaries linked with -sanitize=fuzzer, which is why the fuzz targets are built only then.
int fuzz_driver_run(int *argc, char ***argv, int (*test)(const uint8_t *data, size_t size));
