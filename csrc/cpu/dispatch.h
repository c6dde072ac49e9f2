// Runtime CPU-feature dispatch, shared by the CPU kernels that carry AVX2 clones.
//
// The module is built for a portable x86-64 baseline; kernels compiled with
// __attribute__((target("avx2,..."))) may only run after these checks pass.
#pragma once

#if defined(__GNUC__) && defined(__x86_64__)
#include <immintrin.h>
#define AIOS_X86_DISPATCH 1
#endif

#ifdef AIOS_X86_DISPATCH
#include <cstdlib>

namespace aios {

// True when the CPU has AVX2 and FMA. AIOS_FAST_NO_AVX2=1 forces the portable path (so
// tests can cover it on AVX2 machines). Checked once per process.
inline bool cpu_has_avx2() {
    static const bool ok = [] {
        const char* off = std::getenv("AIOS_FAST_NO_AVX2");
        if (off && off[0] && off[0] != '0') return false;
        __builtin_cpu_init();
        return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    }();
    return ok;
}

// Hardware half -> float conversion, needed on top of cpu_has_avx2() by kernels that load
// float16 with _mm256_cvtph_ps.
inline bool cpu_has_f16c() {
    static const bool ok = [] {
        __builtin_cpu_init();
        return __builtin_cpu_supports("f16c");
    }();
    return ok;
}

}  // namespace aios
#endif
