// Scalar conversions between fp32 and the 16-bit float formats, shared by the native CPU
// kernels (cpu_adam.cpp, lowbit_adam.cpp). Round to nearest even, as torch's .to() does;
// NaN becomes a quiet NaN (bf16 0x7fc0, fp16 sign | 0x7e00; torch 2.13 on x86 writes a bf16
// NaN as 0xffff, so only a NaN's bit pattern can differ from torch's); fp16 overflow
// goes to inf and fp16 subnormals are exact. Integer work on the bit patterns only (the one
// float multiply scales by a power of two), so the results do not depend on the compiler's
// floating-point contraction or the target ISA.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

namespace memopt_native {

inline uint32_t bits_of(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    return u;
}

inline float float_of(uint32_t u) {
    float x;
    std::memcpy(&x, &u, 4);
    return x;
}

inline float bf16_to_f32(uint16_t h) { return float_of(static_cast<uint32_t>(h) << 16); }

// Branch-free (a select), so loops over it vectorize.
inline uint16_t f32_to_bf16(float f) {
    const uint32_t u = bits_of(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
}

inline float f16_to_f32(uint16_t h) {
    const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
    const uint32_t exp = (h >> 10) & 0x1fu;
    const uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return float_of(sign | 0x7f800000u | (man << 13));
    if (exp != 0) return float_of(sign | ((exp + 112u) << 23) | (man << 13));
    // zero or subnormal: man * 2^-24 is exact in fp32
    const float mag = static_cast<float>(man) * 5.9604644775390625e-08f;
    return sign ? -mag : mag;
}

inline uint16_t f32_to_f16(float f) {
    const uint32_t u = bits_of(f);
    const uint16_t sign = static_cast<uint16_t>((u >> 16) & 0x8000u);
    const uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return sign | 0x7e00u;   // NaN: quiet, as F16C and torch give
    if (a >= 0x477ff000u) return sign | 0x7c00u;  // rounds to 65520 or more: inf
    if (a < 0x38800000u) {  // below the smallest normal half: count units of 2^-24, half even
        const float units = std::nearbyint(float_of(a) * 16777216.0f);  // exact scaling
        return sign | static_cast<uint16_t>(units);
    }
    const uint32_t r = a + 0xfffu + ((a >> 13) & 1u);  // round the mantissa to 10 bits
    return sign | static_cast<uint16_t>((r >> 13) - (112u << 10));
}

}  // namespace memopt_native
