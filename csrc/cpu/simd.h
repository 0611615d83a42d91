// Portable vector code generation for the CPU kernels.
//
// The extension must run on any x86-64 machine, so nothing is compiled with -march=native. Plain loops
// are written so that -O3 vectorises them for the SSE2 baseline; on GCC/Clang for x86-64 Linux the hot
// per-tile functions are additionally cloned for x86-64-v3 (AVX2 + FMA + F16C) and picked once at load
// time by the dynamic loader (ifunc), which is safe on every CPU. Measured on the fused step (2^24 fp32,
// 2-core Xeon): the x86-64-v3 clone moves ~20% more bytes per second than the SSE2 baseline; an
// x86-64-v4 (AVX-512) clone was no faster, so there is none. FASTGUIDE_NO_TARGET_CLONES turns them off.
#pragma once

#if defined(__x86_64__) && defined(__linux__) && !defined(FASTGUIDE_NO_TARGET_CLONES) && \
    (defined(__clang__) ? (__clang_major__ >= 14) : (defined(__GNUC__) && __GNUC__ >= 11))
#define FASTGUIDE_TARGET_CLONES __attribute__((target_clones("default", "arch=x86-64-v3")))
#else
#define FASTGUIDE_TARGET_CLONES
#endif
