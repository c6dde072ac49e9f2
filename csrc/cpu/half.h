// Half-precision to float conversion by bits, shared by every CPU kernel that reads
// float16 / bfloat16 buffers directly (no upcast copy), and the dtype codes those kernels
// take from Python.
#pragma once
#include <cstdint>
#include <cstring>

namespace aios {

inline float bf16_to_float(uint16_t h) {
    const uint32_t bits = static_cast<uint32_t>(h) << 16;
    float f;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// IEEE half -> float without F16C: shift exponent+mantissa into place and rebias by a
// multiplication by 2^112, which also normalises subnormals; inf/nan get the full exponent.
// Branch-light so GCC vectorises the loops that call it.
inline float f16_to_float(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t em = static_cast<uint32_t>(h & 0x7fffu) << 13;
    float f;
    std::memcpy(&f, &em, sizeof f);
    f *= 5.192296858534828e+33f;  // 2^112
    uint32_t bits;
    std::memcpy(&bits, &f, sizeof bits);
    if ((h & 0x7c00u) == 0x7c00u) bits = em | 0x7f800000u;  // inf / nan keep their payload
    bits |= sign;
    std::memcpy(&f, &bits, sizeof f);
    return f;
}

// Element dtype codes (the Python layers pass these numbers).
enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };

// Element i of a buffer of dtype DT, as float.
template <int DT>
inline float load_elem(const void* base, int64_t i) {
    if constexpr (DT == kF32) return static_cast<const float*>(base)[i];
    if constexpr (DT == kBF16) return bf16_to_float(static_cast<const uint16_t*>(base)[i]);
    return f16_to_float(static_cast<const uint16_t*>(base)[i]);
}

}  // namespace aios
