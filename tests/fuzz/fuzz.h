/* fuzz.h — the entry point every fuzz target defines (libFuzzer's), and what the targets share.
 * Built two ways (meson.build): with clang's -fsanitize=fuzzer for on-demand fuzzing
 * (bench/fuzz), and with replay.c as an ordinary program that runs a corpus (the CI test). */
#pragma once

#include <stddef.h>
#include <stdint.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);
/* Once, before the first input (optional; replay.c and libFuzzer call it). */
int LLVMFuzzerInitialize(int *argc, char ***argv);
