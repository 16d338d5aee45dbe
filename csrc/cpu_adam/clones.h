// Export and per-ISA cloning macros shared by the elementwise kernels of the CPU library
// (lowrank_adam.cpp, channel_sumsq.cpp). MEMOPT_CLONES compiles a function once per ISA
// (AVX-512, AVX2, baseline) and lets the loader pick the best at load time, so the library
// needs no -march flag and runs on any x86-64.
#pragma once

#define MEMOPT_API __attribute__((visibility("default")))

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEMOPT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MEMOPT_CLONES
#endif
