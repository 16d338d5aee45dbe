// AdamW on 8-bit block-quantized moments, one pass, for memopt.optim.kernels on the CPU.
//
// The int8 optimizer state (memopt.optim._moments) keeps each moment as uint8 indices into a
// 256-entry fp32 code plus one fp32 absmax per 256-element block. The eager torch path
// dequantizes a whole parameter's moments into fp32 tensors, runs torch's fused AdamW on them
// and quantizes them back: a dozen passes over memory and two fp32 temporaries per moment.
// Here every quantization block is done in one go while it sits in L1:
//
//   1. read p, g and the two code arrays; dequantize m = code_m[q] * absmax_m (same for v),
//      or start from zero on the first step;
//   2. the Adam step in fp32, in exactly the form torch's CPU fused AdamW rounds it (the
//      Triton kernel memopt/optim/kernels/triton_lowbit.py is written the same way; see
//      memopt/optim/kernels/lowbit_adam.py for the derivation):
//        p = p * keep_pre
//        m = fma(w, g - m, m)              (lerp; fma(w', g - m, g) when 1 - b1 >= 0.5)
//        v = fma(g * c2, g, v * b2)
//        p = p - (step_size * m) / (sqrt(v) / bc2_sqrt + eps)
//        p = p * keep_post
//      then p is written back (rounded to nearest even for bf16 / fp16);
//   3. per block, absmax = max |m| (NaN if the block holds one, as torch.amax), the same for
//      v after v = max(v, 0);
//   4. y = m / absmax (a zero block divides by 1), code index = number of fp32 midpoints
//      below y (ties to the lower code), as memopt.optim.lowbit.quant.nearest_index gives.
//      The count is a table lookup and a short search: the top bits of y's float pattern
//      pick a cell (a contiguous float range); base[cell] counts the midpoints below the
//      cell and a `steps`-step binary search over the following midpoints (padded with
//      +inf) counts those inside it. The tables come from lowbit_adam.search_tables().
//      With AVX-512F the lookups avoid memory gathers (slow on recent Intel parts): the
//      code sits in 16 registers and the dequantization is a permute, and the count is a
//      plain 8-level binary search over the 255 midpoints, each level's midpoints in
//      registers. Either way the same divisions, comparisons and codes.
//
// Bit-exactness with the torch path needs every rounding to be the one written above: no
// contraction of a*b+c into an fma by the compiler (pragmas below; the build's -std=c++17
// also turns GCC's contraction off), std::fma exactly where torch fuses, and IEEE division
// and square root (no -ffast-math, no reciprocal estimates).
//
// memopt_q8_quantize / memopt_q8_dequantize expose steps 3-4 and the dequantization on
// their own (the same block routines), for memopt.optim.lowbit.quant's int8 path on the CPU.
//
// Work split: OpenMP over groups of whole quantization blocks (blocks are independent);
// a parameter below the grain stays on the calling thread. The block body is compiled per
// ISA (target_clones), like lowrank_adam.cpp. Plain C ABI, loaded with ctypes from
// memopt/offload/cpu_adam.py (same library and ABI version as the AdamW step).

#if defined(__clang__)
#pragma clang fp contract(off)
#elif defined(__GNUC__)
#pragma GCC optimize("fp-contract=off")
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowp_scalar.h"

#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__)
#define MEMOPT_Q8_AVX512 1
#include <immintrin.h>
#endif

#define MEMOPT_API __attribute__((visibility("default")))

// Clones by x86-64 level, not single features: the fma the update needs is not part of the
// "avx2" target, and without it std::fma is a libm call in the loop (exact, but scalar).
// GCC before 12 may not take the level names here; it gets the feature-named clones.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12
#define MEMOPT_CLONES \
    __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#elif defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MEMOPT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MEMOPT_CLONES
#endif

namespace {

constexpr int64_t kQBlock = 256;          // elements per absmax block (the int8 state's)
constexpr int64_t kGroup = 16;            // blocks per OpenMP work item (4096 elements)
constexpr int64_t kGrain = int64_t(1) << 15;  // elements per thread before threads pay off
enum Dtype { DT_F32 = 1, DT_BF16 = 2, DT_F16 = 3 };

struct Q8Scalars {
    float keep_pre, keep_post, lerp_w, c2, b2, step_size, bc2_sqrt, eps;
    bool first, lerp_from_g;
};

struct Q8Tables {  // one moment's code, padded midpoints and cell table
    const float* code;
    const float* mids;
    const int32_t* base;
    int steps;
};

using memopt_native::bits_of;
using memopt_native::f16_to_f32;
using memopt_native::f32_to_bf16;
using memopt_native::f32_to_f16;
using memopt_native::float_of;

// max |x| over x[0, len) by integer max over the bit patterns with the sign cleared: for
// non-negative floats the pattern order is the value order and every NaN pattern lies above
// +inf, so a NaN anywhere gives a NaN absmax (as torch.amax does), and the loop vectorizes.
inline float block_absmax(const float* __restrict x, int64_t len) {
    uint32_t top = 0;
    for (int64_t i = 0; i < len; ++i) {
        const uint32_t a = bits_of(x[i]) & 0x7fffffffu;
        top = a > top ? a : top;
    }
    return float_of(top);
}

// Codes for x[0, len) against one moment's tables; returns the block's absmax. Inlined into
// each ISA clone of step_block. The cell table is int32 so the lookups vectorize as gathers.
inline float quantize_block(const float* __restrict x, int64_t len, const Q8Tables& t,
                            uint8_t* __restrict out) {
    const float amax = block_absmax(x, len);
    const float scale = amax > 0.0f ? amax : 1.0f;  // a zero (or NaN) block divides by 1
    const float* __restrict mids = t.mids;
    const int32_t* __restrict base = t.base;
    if (t.steps == 2) {  // the int8 codes' tables need 2 (signed) and 3 (unsigned) steps
        for (int64_t i = 0; i < len; ++i) {
            const float y = x[i] / scale;
            int32_t pos = base[bits_of(y) >> 19];
            pos += mids[pos + 1] < y ? 2 : 0;
            pos += mids[pos] < y ? 1 : 0;
            out[i] = static_cast<uint8_t>(pos);
        }
    } else if (t.steps == 3) {
        for (int64_t i = 0; i < len; ++i) {
            const float y = x[i] / scale;
            int32_t pos = base[bits_of(y) >> 19];
            pos += mids[pos + 3] < y ? 4 : 0;
            pos += mids[pos + 1] < y ? 2 : 0;
            pos += mids[pos] < y ? 1 : 0;
            out[i] = static_cast<uint8_t>(pos);
        }
    } else {
        const int32_t top = 1 << (t.steps - 1);
        for (int64_t i = 0; i < len; ++i) {
            const float y = x[i] / scale;
            int32_t pos = base[bits_of(y) >> 19];
            for (int32_t half = top; half > 0; half >>= 1) pos += mids[pos + half - 1] < y ? half : 0;
            out[i] = static_cast<uint8_t>(pos);
        }
    }
    return amax;
}

inline void load_block(const void* src, int dt, int64_t len, float* __restrict dst) {
    if (dt == DT_BF16) {
        const uint16_t* s = static_cast<const uint16_t*>(src);
        for (int64_t i = 0; i < len; ++i) dst[i] = float_of(uint32_t(s[i]) << 16);
    } else if (dt == DT_F16) {
        const uint16_t* s = static_cast<const uint16_t*>(src);
        for (int64_t i = 0; i < len; ++i) dst[i] = f16_to_f32(s[i]);
    } else {
        std::memcpy(dst, src, static_cast<size_t>(len) * 4);
    }
}

inline void store_block(void* dst, int dt, int64_t len, const float* __restrict src) {
    if (dt == DT_BF16) {
        uint16_t* d = static_cast<uint16_t*>(dst);
        for (int64_t i = 0; i < len; ++i) d[i] = f32_to_bf16(src[i]);
    } else if (dt == DT_F16) {
        uint16_t* d = static_cast<uint16_t*>(dst);
        for (int64_t i = 0; i < len; ++i) d[i] = f32_to_f16(src[i]);
    } else {
        std::memcpy(dst, src, static_cast<size_t>(len) * 4);
    }
}

// The 255 midpoints in the order a branchless binary search visits them: with steps of
// h = 128 >> L (level L = 0..7) the running count pos is a multiple of 2h, and the midpoint
// compared is mids[pos + h - 1], i.e. entry pos >> (8 - L) of level L's 2^L midpoints
// mids[(2j + 1) h - 1]. Eight levels: count(mids < y) exactly, ties (mid == y) not counted.
struct alignas(64) LevelMids {
    float level[8][128];
};

void build_levels(const float* mids, LevelMids& out) {
    for (int lv = 0; lv < 8; ++lv) {
        const int h = 128 >> lv;
        for (int j = 0; j < 128; ++j)
            out.level[lv][j] = j < (1 << lv) ? mids[(2 * j + 1) * h - 1] : INFINITY;
    }
}

#ifdef MEMOPT_Q8_AVX512
#pragma GCC diagnostic push
// GCC 12 flags the deliberately undefined vector inside _mm512_permutexvar_ps's expansion.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// quantize_block with the search in registers: each level's midpoints are one to eight zmm
// registers and a lookup is a permute (vpermps / vpermt2ps) instead of a gather from memory,
// which costs several times more per element on recent Intel parts. Same divisions, same
// comparisons, same codes.
__attribute__((target("avx512f"))) float quantize_block_avx512(const float* __restrict x,
                                                               int64_t len,
                                                               const LevelMids& t,
                                                               uint8_t* __restrict out) {
    const float amax = block_absmax(x, len);
    const __m512 scale = _mm512_set1_ps(amax > 0.0f ? amax : 1.0f);
    __m512 lv[16];  // levels 0..4: one register each; level 5: lv[5..6]; level 6: lv[7..10]
    for (int i = 0; i < 5; ++i) lv[i] = _mm512_load_ps(t.level[i]);
    for (int i = 0; i < 2; ++i) lv[5 + i] = _mm512_load_ps(t.level[5] + 16 * i);
    for (int i = 0; i < 4; ++i) lv[7 + i] = _mm512_load_ps(t.level[6] + 16 * i);
    __m512 l7[8];
    for (int i = 0; i < 8; ++i) l7[i] = _mm512_load_ps(t.level[7] + 16 * i);
    const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = len - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - i)) - 1);
        const __m512 y = _mm512_div_ps(_mm512_maskz_loadu_ps(k, x + i), scale);
        __m512i pos = _mm512_setzero_si512();
        auto advance = [&](__m512 mid, int h) {
            const __mmask16 below = _mm512_cmp_ps_mask(mid, y, _CMP_LT_OQ);
            pos = _mm512_mask_add_epi32(pos, below, pos, _mm512_set1_epi32(h));
        };
        advance(_mm512_permutexvar_ps(_mm512_srli_epi32(pos, 8), lv[0]), 128);
        advance(_mm512_permutexvar_ps(_mm512_srli_epi32(pos, 7), lv[1]), 64);
        advance(_mm512_permutexvar_ps(_mm512_srli_epi32(pos, 6), lv[2]), 32);
        advance(_mm512_permutexvar_ps(_mm512_srli_epi32(pos, 5), lv[3]), 16);
        advance(_mm512_permutexvar_ps(_mm512_srli_epi32(pos, 4), lv[4]), 8);
        advance(_mm512_permutex2var_ps(lv[5], _mm512_srli_epi32(pos, 3), lv[6]), 4);
        {
            const __m512i j = _mm512_srli_epi32(pos, 2);  // 0..63
            const __m512 lo = _mm512_permutex2var_ps(lv[7], j, lv[8]);
            const __m512 hi = _mm512_permutex2var_ps(lv[9], j, lv[10]);
            advance(_mm512_mask_blend_ps(_mm512_test_epi32_mask(j, bit5), lo, hi), 2);
        }
        {
            const __m512i j = _mm512_srli_epi32(pos, 1);  // 0..127
            const __mmask16 b5 = _mm512_test_epi32_mask(j, bit5);
            const __m512 q0 = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(l7[0], j, l7[1]),
                                                   _mm512_permutex2var_ps(l7[2], j, l7[3]));
            const __m512 q1 = _mm512_mask_blend_ps(b5, _mm512_permutex2var_ps(l7[4], j, l7[5]),
                                                   _mm512_permutex2var_ps(l7[6], j, l7[7]));
            advance(_mm512_mask_blend_ps(_mm512_test_epi32_mask(j, bit6), q0, q1), 1);
        }
        _mm512_mask_cvtepi32_storeu_epi8(out + i, k, pos);
    }
    return amax;
}

// out = code[q] * absmax for q[0, len): the 256-entry code is 16 registers and a lookup is
// 8 two-register permutes blended on the index's top three bits, instead of a gather.
__attribute__((target("avx512f"))) void dequantize_block_avx512(const uint8_t* __restrict q,
                                                                float absmax,
                                                                const float* __restrict code,
                                                                int64_t len,
                                                                float* __restrict out) {
    __m512 c[16];
    for (int i = 0; i < 16; ++i) c[i] = _mm512_loadu_ps(code + 16 * i);
    const __m512 scale = _mm512_set1_ps(absmax);
    const __m512i bit5 = _mm512_set1_epi32(32), bit6 = _mm512_set1_epi32(64);
    const __m512i bit7 = _mm512_set1_epi32(128);
    for (int64_t i = 0; i < len; i += 16) {
        const __mmask16 k = len - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (len - i)) - 1);
        __m128i bytes;
        if (len - i >= 16) {
            bytes = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i));
        } else {  // the block's tail: no byte-masked load in AVX-512F alone
            alignas(16) uint8_t tail[16] = {0};
            std::memcpy(tail, q + i, static_cast<size_t>(len - i));
            bytes = _mm_load_si128(reinterpret_cast<const __m128i*>(tail));
        }
        const __m512i j = _mm512_cvtepu8_epi32(bytes);
        const __mmask16 b5 = _mm512_test_epi32_mask(j, bit5);
        const __mmask16 b6 = _mm512_test_epi32_mask(j, bit6);
        __m512 quarter[4];
        for (int h = 0; h < 4; ++h) {  // entries 64 h .. 64 h + 63
            const __m512 lo = _mm512_permutex2var_ps(c[4 * h], j, c[4 * h + 1]);
            const __m512 hi = _mm512_permutex2var_ps(c[4 * h + 2], j, c[4 * h + 3]);
            quarter[h] = _mm512_mask_blend_ps(b5, lo, hi);
        }
        const __m512 low = _mm512_mask_blend_ps(b6, quarter[0], quarter[1]);
        const __m512 high = _mm512_mask_blend_ps(b6, quarter[2], quarter[3]);
        const __m512 val = _mm512_mask_blend_ps(_mm512_test_epi32_mask(j, bit7), low, high);
        _mm512_mask_storeu_ps(out + i, k, _mm512_mul_ps(val, scale));
    }
}
#pragma GCC diagnostic pop
#endif

// m = code[q] * absmax over the block: registers and permutes where the AVX-512 search runs
// (vec), else a plain loop (a gather where the clone vectorizes it).
inline void dequantize(const uint8_t* __restrict q, float absmax, const float* __restrict code,
                       int64_t len, bool vec, float* __restrict out) {
#ifdef MEMOPT_Q8_AVX512
    if (vec) return dequantize_block_avx512(q, absmax, code, len, out);
#else
    (void)vec;
#endif
    for (int64_t i = 0; i < len; ++i) out[i] = code[q[i]] * absmax;
}

// Codes and absmax of one block, by the register search (levels) or the table search.
// A block whose absmax is not finite (it holds an inf or a NaN) is the only place a y can
// be non-finite; there the torch path's key tables send every non-finite y (either NaN,
// +inf, -inf) to code 255, and so does this, whichever search ran. Its values dequantize
// to inf / NaN either way (code * non-finite absmax).
inline float quantize(const float* __restrict x, int64_t len, const Q8Tables& t,
                      const LevelMids* levels, uint8_t* __restrict out) {
    float amax;
#ifdef MEMOPT_Q8_AVX512
    if (levels != nullptr)
        amax = quantize_block_avx512(x, len, *levels, out);
    else
#else
    (void)levels;
#endif
        amax = quantize_block(x, len, t, out);
    if ((bits_of(amax) & 0x7fffffffu) >= 0x7f800000u) {
        for (int64_t i = 0; i < len; ++i)
            if ((bits_of(x[i]) & 0x7fffffffu) >= 0x7f800000u) out[i] = 255;
    }
    return amax;
}

// Quantization blocks [b0, b1) of an fp32 array of n elements (the last may be short).
MEMOPT_CLONES
void quantize_blocks(const float* __restrict x, int64_t n, int64_t b0, int64_t b1,
                     const Q8Tables& t, const LevelMids* levels, uint8_t* __restrict q,
                     float* __restrict absmax) {
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * kQBlock, len = std::min(kQBlock, n - o);
        absmax[b] = quantize(x + o, len, t, levels, q + o);
    }
}

// fp32 -> bf16 as torch's vectorized CPU conversion does it (what torch.mul into a bf16
// output runs on x86): round to nearest even, every NaN -> 0xffff. The scalar f32_to_bf16
// gives torch's scalar 0x7fc0 instead; finite values and infinities are the same.
inline uint16_t bf16_torch_vec(float f) {
    const uint32_t u = bits_of(f);
    const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? 0xffffu : rounded);
}

// out = code[q] * absmax over blocks [b0, b1), written as fp32, bf16 or fp16 (the fp32
// product rounded to nearest even, as torch.mul into a low-precision output rounds it).
MEMOPT_CLONES
void dequantize_blocks(const uint8_t* __restrict q, const float* __restrict absmax, int64_t n,
                       int64_t b0, int64_t b1, const float* __restrict code, bool vec, int dt,
                       void* out) {
    alignas(64) float buf[kQBlock];
    for (int64_t b = b0; b < b1; ++b) {
        const int64_t o = b * kQBlock, len = std::min(kQBlock, n - o);
        if (dt == DT_F32) {
            dequantize(q + o, absmax[b], code, len, vec, static_cast<float*>(out) + o);
        } else if (dt == DT_BF16) {
            dequantize(q + o, absmax[b], code, len, vec, buf);
            uint16_t* d = static_cast<uint16_t*>(out) + o;
            for (int64_t i = 0; i < len; ++i) d[i] = bf16_torch_vec(buf[i]);
        } else {
            dequantize(q + o, absmax[b], code, len, vec, buf);
            store_block(static_cast<uint16_t*>(out) + o, dt, len, buf);
        }
    }
}

// One quantization block [0, len) of the parameter (pointers already offset to it).
MEMOPT_CLONES
void step_block(void* p, int pdt, const void* g, int gdt, uint8_t* __restrict mq,
                float* __restrict mabs, uint8_t* __restrict vq, float* __restrict vabs,
                const Q8Tables& tm, const Q8Tables& tv, const LevelMids* lm,
                const LevelMids* lv, int64_t len, const Q8Scalars& s) {
    alignas(64) float pf[kQBlock], gf[kQBlock], m[kQBlock], v[kQBlock];
    load_block(p, pdt, len, pf);
    load_block(g, gdt, len, gf);
    if (s.first) {
        for (int64_t i = 0; i < len; ++i) m[i] = v[i] = 0.0f;
    } else {
        dequantize(mq, *mabs, tm.code, len, lm != nullptr, m);
        dequantize(vq, *vabs, tv.code, len, lv != nullptr, v);
    }
    const float keep_pre = s.keep_pre, keep_post = s.keep_post, w = s.lerp_w, c2 = s.c2;
    const float b2 = s.b2, step_size = s.step_size, bc2_sqrt = s.bc2_sqrt, eps = s.eps;
    const bool from_g = s.lerp_from_g;
    for (int64_t i = 0; i < len; ++i) {
        const float gi = gf[i];
        const float mi = std::fma(w, gi - m[i], from_g ? gi : m[i]);
        const float vi = std::fma(gi * c2, gi, v[i] * b2);
        const float denom = std::sqrt(vi) / bc2_sqrt + eps;
        pf[i] = (pf[i] * keep_pre - (step_size * mi) / denom) * keep_post;
        m[i] = mi;
        v[i] = vi < 0.0f ? 0.0f : vi;  // v.clamp_(min=0) before quantizing, NaN kept
    }
    store_block(p, pdt, len, pf);
    *mabs = quantize(m, len, tm, lm, mq);
    *vabs = quantize(v, len, tv, lv, vq);
}

inline bool valid_dtype(int dt) { return dt == DT_F32 || dt == DT_BF16 || dt == DT_F16; }

inline int64_t dtype_size(int dt) { return dt == DT_F32 ? 4 : 2; }

// Threads for n elements: n_threads (at least one), fewer when each would get under kGrain.
inline int pick_threads(int64_t n, int n_threads) {
#ifdef _OPENMP
    return static_cast<int>(
        std::max<int64_t>(1, std::min<int64_t>(std::max(n_threads, 1), n / kGrain)));
#else
    (void)n;
    (void)n_threads;
    return 1;
#endif
}

// The register-search levels for these padded midpoints, or nullptr (no AVX-512F, or not
// asked for): then the cell-table search runs.
inline const LevelMids* levels_for(const float* mids, bool want, LevelMids& storage) {
#ifdef MEMOPT_Q8_AVX512
    if (want && __builtin_cpu_supports("avx512f")) {
        build_levels(mids, storage);
        return &storage;
    }
#else
    (void)mids;
    (void)want;
    (void)storage;
#endif
    return nullptr;
}

inline bool vector_lookup(bool want) {
#ifdef MEMOPT_Q8_AVX512
    return want && __builtin_cpu_supports("avx512f");
#else
    (void)want;
    return false;
#endif
}

}  // namespace

// One AdamW step of n elements on int8 moments, in place: param (dtype code 1 fp32, 2 bf16,
// 3 fp16), grad (same codes), the codes m_q / v_q (n bytes each) and absmax m_abs / v_abs
// (ceil(n / 256) floats each). m_code / v_code are the 256-entry codes; m_mids / v_mids the
// 255 midpoints padded with 2**steps +inf; m_base / v_base the 2**(32 - 19) cell counts
// as int32 (lowbit_adam.search_tables). The scalars are lowbit_adam._scalars, already fp32.
// first: the moments start at zero (codes and absmax are only written). n_threads <= 0: one.
// vector_search: 1 searches the midpoints in AVX-512 registers where the CPU has AVX-512F,
// 0 always uses the table search (the same codes; a switch for tests and comparisons).
// Returns 0, or -1 on bad arguments.
extern "C" MEMOPT_API int memopt_adamw_q8(
    void* param, int param_dtype, const void* grad, int grad_dtype, uint8_t* m_q,
    float* m_abs, uint8_t* v_q, float* v_abs, const float* m_code, const float* v_code,
    const float* m_mids, const float* v_mids, const int32_t* m_base, const int32_t* v_base,
    int m_steps, int v_steps, int64_t n, float keep_pre, float keep_post, float lerp_w,
    float c2, float b2, float step_size, float bc2_sqrt, float eps, int first,
    int lerp_from_g, int n_threads, int vector_search) {
    if (n < 0 || !valid_dtype(param_dtype) || !valid_dtype(grad_dtype)) return -1;
    if (m_steps < 1 || m_steps > 8 || v_steps < 1 || v_steps > 8) return -1;
    if (n == 0) return 0;
    if (!param || !grad || !m_q || !m_abs || !v_q || !v_abs || !m_mids || !v_mids ||
        !m_base || !v_base || (!first && (!m_code || !v_code)))
        return -1;
    const Q8Scalars s{keep_pre, keep_post, lerp_w, c2,    b2,
                      step_size, bc2_sqrt, eps,    first != 0, lerp_from_g != 0};
    const Q8Tables tm{m_code, m_mids, m_base, m_steps};
    const Q8Tables tv{v_code, v_mids, v_base, v_steps};
    // The register search needs the 255 midpoints themselves (steps and padding aside).
    LevelMids lm_levels, lv_levels;
    const LevelMids* lm = levels_for(m_mids, vector_search != 0, lm_levels);
    const LevelMids* lv = levels_for(v_mids, vector_search != 0, lv_levels);
    const int64_t blocks = (n + kQBlock - 1) / kQBlock;
    const int64_t groups = (blocks + kGroup - 1) / kGroup;
    const int64_t psize = dtype_size(param_dtype), gsize = dtype_size(grad_dtype);
    const int threads = pick_threads(n, n_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t grp = 0; grp < groups; ++grp) {
        const int64_t b1 = std::min(blocks, (grp + 1) * kGroup);
        for (int64_t b = grp * kGroup; b < b1; ++b) {
            const int64_t o = b * kQBlock, len = std::min(kQBlock, n - o);
            step_block(static_cast<char*>(param) + o * psize, param_dtype,
                       static_cast<const char*>(grad) + o * gsize, grad_dtype, m_q + o,
                       m_abs + b, v_q + o, v_abs + b, tm, tv, lm, lv, len, s);
        }
    }
    return 0;
}

// Block-quantize n fp32 values x into codes q (n bytes) and absmax (ceil(n / 256) floats),
// exactly as memopt.optim.lowbit.quant.quantize_blockwise does with bits=8 and 256-element
// blocks: absmax = max |x| per block (NaN if the block holds one), y = x / absmax (a block
// whose absmax is zero or NaN divides by 1), code = count(midpoints < y), non-finite y ->
// 255. mids / base / steps are one code's tables as memopt_adamw_q8 takes them
// (lowbit_adam.search_tables, cell counts as int32). n_threads <= 0: one. vector_search as
// in memopt_adamw_q8. Returns 0, or -1 on bad arguments.
extern "C" MEMOPT_API int memopt_q8_quantize(const float* x, int64_t n, const float* mids,
                                             const int32_t* base, int steps, uint8_t* q,
                                             float* absmax, int n_threads, int vector_search) {
    if (n < 0 || steps < 1 || steps > 8) return -1;
    if (n == 0) return 0;
    if (!x || !mids || !base || !q || !absmax) return -1;
    const Q8Tables t{nullptr, mids, base, steps};
    LevelMids storage;
    const LevelMids* levels = levels_for(mids, vector_search != 0, storage);
    const int64_t blocks = (n + kQBlock - 1) / kQBlock;
    const int64_t groups = (blocks + kGroup - 1) / kGroup;
    const int threads = pick_threads(n, n_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t grp = 0; grp < groups; ++grp)
        quantize_blocks(x, n, grp * kGroup, std::min(blocks, (grp + 1) * kGroup), t, levels, q,
                        absmax);
    return 0;
}

// The inverse: out[i] = code[q[i]] * absmax[i / 256] for n elements, computed in fp32 and
// written as out_dtype (1 fp32, 2 bf16, 3 fp16; round to nearest even; NaN as torch's
// vectorized conversions write it: bf16 0xffff, fp16 sign | 0x7e00), as
// dequantize_blockwise does with bits=8. code: 256 fp32 values. vector_lookup: 1 looks the
// code up in AVX-512 registers where the CPU has AVX-512F (the same values). Returns 0, or
// -1 on bad arguments.
extern "C" MEMOPT_API int memopt_q8_dequantize(const uint8_t* q, const float* absmax, int64_t n,
                                               const float* code, int out_dtype, void* out,
                                               int n_threads, int vector_lookup_flag) {
    if (n < 0 || !valid_dtype(out_dtype)) return -1;
    if (n == 0) return 0;
    if (!q || !absmax || !code || !out) return -1;
    const bool vec = vector_lookup(vector_lookup_flag != 0);
    const int64_t blocks = (n + kQBlock - 1) / kQBlock;
    const int64_t groups = (blocks + kGroup - 1) / kGroup;
    const int threads = pick_threads(n, n_threads);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) if (threads > 1)
    for (int64_t grp = 0; grp < groups; ++grp)
        dequantize_blocks(q, absmax, n, grp * kGroup, std::min(blocks, (grp + 1) * kGroup), code,
                          vec, out_dtype, out);
    return 0;
}
