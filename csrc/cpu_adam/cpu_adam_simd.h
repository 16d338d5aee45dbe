// SIMD bodies of the AdamW step (included once, by cpu_adam.cpp, after the scalar helpers).
//
// Each *_span(s, h, gdt, odt) updates the longest prefix of the span that is a whole number
// of vectors and returns its length; the scalar loop finishes the tail. The bodies are
// compiled for their ISA with target pragmas (no -march flag on the command line), so only
// code the CPU was checked to support ever runs.
#pragma once

#ifdef MEMOPT_X86

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

namespace {

template <int GDT>
inline __m256 avx2_grad(const void* g, int64_t i) {
    if (GDT == DT_F32) return _mm256_loadu_ps(static_cast<const float*>(g) + i);
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(g) + i));
    if (GDT == DT_F16) return _mm256_cvtph_ps(h);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

inline void avx2_put(__m128i* dst, __m128i x, bool nt) {
    if (nt) _mm_stream_si128(dst, x);
    else _mm_storeu_si128(dst, x);
}

template <int ODT>
inline void avx2_store_lowp(void* out, int64_t i, __m256 p, bool nt) {
    __m128i* dst = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i);
    if (ODT == DT_F16) {
        avx2_put(dst, _mm256_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT), nt);
        return;
    }
    // bf16, round to nearest even: u + 0x7fff + lsb(u >> 16), keep the high half; NaN -> 0x7fc0
    __m256i u = _mm256_castps_si256(p);
    __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    __m256i r = _mm256_srli_epi32(
        _mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
    __m256 nan = _mm256_cmp_ps(p, p, _CMP_UNORD_Q);
    r = _mm256_castps_si256(
        _mm256_blendv_ps(_mm256_castsi256_ps(r), _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc0)), nan));
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xd8);
    avx2_put(dst, _mm256_castsi256_si128(packed), nt);
}

template <int GDT, int ODT>
int64_t avx2_body(const Span& s, const Hyper& h) {
    const __m256 b1 = _mm256_set1_ps(h.b1), omb1 = _mm256_set1_ps(h.a1);
    const __m256 b2 = _mm256_set1_ps(h.b2), omb2 = _mm256_set1_ps(h.a2);
    const __m256 eps = _mm256_set1_ps(h.eps), c2 = _mm256_set1_ps(h.c2);
    const __m256 step = _mm256_set1_ps(h.step_size);
    const __m256 pre = _mm256_set1_ps(h.pre), post = _mm256_set1_ps(h.post);
    // Local restrict copies: otherwise every store may alias the Span and the compiler
    // reloads its pointers each iteration.
    float* __restrict P = s.p;
    float* __restrict M = s.m;
    float* __restrict V = s.v;
    const void* G = s.g;
    void* O = s.out;
    const int64_t end = s.n / 8 * 8;
    // The low-precision copy is write-only: on a large call, streaming stores skip reading
    // its lines first (2 B/element less traffic; a small copy is better left in cache).
    // Chunks start on 64-element boundaries, so an aligned base keeps every store aligned.
    const bool nt = h.stream_out && (reinterpret_cast<uintptr_t>(O) & 15) == 0;
    for (int64_t i = 0; i < end; i += 8) {
        __m256 g = avx2_grad<GDT>(G, i);
        __m256 m = _mm256_fmadd_ps(b1, _mm256_loadu_ps(M + i), _mm256_mul_ps(omb1, g));
        __m256 v = _mm256_fmadd_ps(b2, _mm256_loadu_ps(V + i), _mm256_mul_ps(_mm256_mul_ps(omb2, g), g));
        __m256 den = _mm256_fmadd_ps(_mm256_sqrt_ps(v), c2, eps);
        __m256 p = _mm256_mul_ps(_mm256_loadu_ps(P + i), pre);
        p = _mm256_mul_ps(_mm256_fnmadd_ps(step, _mm256_div_ps(m, den), p), post);
        _mm256_storeu_ps(M + i, m);
        _mm256_storeu_ps(V + i, v);
        _mm256_storeu_ps(P + i, p);
        if (ODT != DT_NONE) avx2_store_lowp<ODT>(O, i, p, nt);
    }
    if (ODT != DT_NONE) _mm_sfence();  // order the streaming stores before the caller reads
    return end;
}

}  // namespace

#if defined(__clang__)
#pragma clang attribute pop
#pragma clang attribute push(__attribute__((target("avx512f,avx512bw,avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx2,fma,f16c")
// GCC 12's avx512fintrin.h trips its own -Wmaybe-uninitialized (the _mm512_undefined_* idiom).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif

namespace {

template <int GDT>
inline __m512 avx512_grad(const void* g, int64_t i) {
    if (GDT == DT_F32) return _mm512_loadu_ps(static_cast<const float*>(g) + i);
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(g) + i));
    if (GDT == DT_F16) return _mm512_cvtph_ps(h);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <int ODT>
inline void avx512_store_lowp(void* out, int64_t i, __m512 p, bool nt) {
    __m256i* dst = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i);
    __m256i x;
    if (ODT == DT_F16) {
        x = _mm512_cvtps_ph(p, _MM_FROUND_TO_NEAREST_INT);
    } else {
        __m512i u = _mm512_castps_si512(p);
        __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
        __m512i r = _mm512_srli_epi32(
            _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(p, p, _CMP_UNORD_Q);
        r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
        x = _mm512_cvtepi32_epi16(r);
    }
    if (nt) _mm256_stream_si256(dst, x);
    else _mm256_storeu_si256(dst, x);
}

template <int GDT, int ODT>
int64_t avx512_body(const Span& s, const Hyper& h) {
    const __m512 b1 = _mm512_set1_ps(h.b1), omb1 = _mm512_set1_ps(h.a1);
    const __m512 b2 = _mm512_set1_ps(h.b2), omb2 = _mm512_set1_ps(h.a2);
    const __m512 eps = _mm512_set1_ps(h.eps), c2 = _mm512_set1_ps(h.c2);
    const __m512 step = _mm512_set1_ps(h.step_size);
    const __m512 pre = _mm512_set1_ps(h.pre), post = _mm512_set1_ps(h.post);
    // Local restrict copies: otherwise every store may alias the Span and the compiler
    // reloads its pointers each iteration.
    float* __restrict P = s.p;
    float* __restrict M = s.m;
    float* __restrict V = s.v;
    const void* G = s.g;
    void* O = s.out;
    const int64_t end = s.n / 16 * 16;
    // The low-precision copy is write-only: on a large call, streaming stores skip reading
    // its lines first (2 B/element less traffic; a small copy is better left in cache).
    // Chunks start on 64-element boundaries, so an aligned base keeps every store aligned.
    const bool nt = h.stream_out && (reinterpret_cast<uintptr_t>(O) & 31) == 0;
    for (int64_t i = 0; i < end; i += 16) {
        __m512 g = avx512_grad<GDT>(G, i);
        __m512 m = _mm512_fmadd_ps(b1, _mm512_loadu_ps(M + i), _mm512_mul_ps(omb1, g));
        __m512 v = _mm512_fmadd_ps(b2, _mm512_loadu_ps(V + i), _mm512_mul_ps(_mm512_mul_ps(omb2, g), g));
        __m512 den = _mm512_fmadd_ps(_mm512_sqrt_ps(v), c2, eps);
        __m512 p = _mm512_mul_ps(_mm512_loadu_ps(P + i), pre);
        p = _mm512_mul_ps(_mm512_fnmadd_ps(step, _mm512_div_ps(m, den), p), post);
        _mm512_storeu_ps(M + i, m);
        _mm512_storeu_ps(V + i, v);
        _mm512_storeu_ps(P + i, p);
        if (ODT != DT_NONE) avx512_store_lowp<ODT>(O, i, p, nt);
    }
    if (ODT != DT_NONE) _mm_sfence();  // order the streaming stores before the caller reads
    return end;
}

}  // namespace

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace {

// (grad dtype, copy-back dtype) -> the matching instantiation; the ISA checks are the caller's.
#define MEMOPT_DISPATCH(BODY)                                              \
    switch (gdt * 4 + odt) {                                               \
        case DT_F32 * 4 + DT_NONE: return BODY<DT_F32, DT_NONE>(s, h);     \
        case DT_F32 * 4 + DT_BF16: return BODY<DT_F32, DT_BF16>(s, h);     \
        case DT_F32 * 4 + DT_F16: return BODY<DT_F32, DT_F16>(s, h);       \
        case DT_BF16 * 4 + DT_NONE: return BODY<DT_BF16, DT_NONE>(s, h);   \
        case DT_BF16 * 4 + DT_BF16: return BODY<DT_BF16, DT_BF16>(s, h);   \
        case DT_BF16 * 4 + DT_F16: return BODY<DT_BF16, DT_F16>(s, h);     \
        case DT_F16 * 4 + DT_NONE: return BODY<DT_F16, DT_NONE>(s, h);     \
        case DT_F16 * 4 + DT_BF16: return BODY<DT_F16, DT_BF16>(s, h);     \
        case DT_F16 * 4 + DT_F16: return BODY<DT_F16, DT_F16>(s, h);       \
        default: return 0;                                                 \
    }

int64_t avx2_span(const Span& s, const Hyper& h, int gdt, int odt) { MEMOPT_DISPATCH(avx2_body) }

int64_t avx512_span(const Span& s, const Hyper& h, int gdt, int odt) { MEMOPT_DISPATCH(avx512_body) }

#undef MEMOPT_DISPATCH

}  // namespace

#endif  // MEMOPT_X86
