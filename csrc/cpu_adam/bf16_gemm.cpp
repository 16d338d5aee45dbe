// bf16 GEMM on Intel AMX tiles for fp32 operands: C = alpha * A B (+ beta * C), where A (M x K)
// and B (K x N) are fp32 with arbitrary element strides, rounded to bf16 (round to nearest
// even) while they are packed, and the products accumulate in fp32 inside the tiles.
//
// This is memopt's projection GEMM for matmul_dtype="bfloat16" on AMX CPUs: the GaLore /
// APOLLO / FRUGAL projections P^T G, G P^T and the fused write-back W = beta W + alpha P L.
// oneDNN's fp32-in / bf16-math route (torch.backends.mkldnn.matmul.fp32_precision = "bf16")
// does the same arithmetic, but at the sizes of a projection (K = 128..4096, one side = the
// rank) it spent most of its time outside the tiles: 0.6-0.7 TFLOP/s on two cores.
//
// Layout and order. The larger of A's rows and B's columns is streamed: each thread of the
// OpenMP team takes a contiguous range of 32-wide strips of it, packs one strip at a time into
// its own buffer (bf16, 16 x 32 tiles of 1 KiB each for A; the tiles' pair layout for B, the
// two K rows of each pair side by side per column) and computes that strip's 32 x 32 output
// blocks against the other operand, which the team packs whole first. Each block is four
// 16 x 16 accumulator tiles fed by two A and two B tiles per 32-deep K step; while they
// work, the next strip's fp32 source (and, with beta, the next block of C) is prefetched into
// L2, and the previous block is merged into C (alpha, beta) with AVX-512, masked at the
// edges. Each packer has a vector path for the layouts projections have (the strided side's
// elements contiguous along K, or along the other index) and a scalar path for any strides.
// Measured alternatives that were slower and dropped (benchmarks/gemm_route.py, table 2):
// packing the next strip a K step at a time between the tile instructions (+10%).
//
// Linux needs a process to ask for the AMX state before using the tiles (arch_prctl
// ARCH_REQ_XCOMP_PERM); memopt_bf16_gemm_available() checks CPUID and makes that request.

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <new>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__) && defined(__linux__)
#define MEMOPT_HAVE_AMX 1
#include <cpuid.h>
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "clones.h"
#include "scratch.h"

namespace {

constexpr int64_t kBlock = 32;  // output block edge and K step (two 16-row tiles)

int64_t round_up(int64_t x, int64_t to) { return (x + to - 1) / to * to; }

#ifdef MEMOPT_HAVE_AMX

#define MEMOPT_AMX_TARGET \
    __attribute__((target("amx-tile,amx-bf16,avx512f,avx512bw,avx512vl,avx512bf16")))

bool cpu_has_amx() {
    unsigned a, b, c, d;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
    const bool amx_bf16 = (d >> 22) & 1u, amx_tile = (d >> 24) & 1u;
    const bool avx512f = (b >> 16) & 1u, avx512bw = (b >> 30) & 1u, avx512vl = (b >> 31) & 1u;
    if (!(amx_bf16 && amx_tile && avx512f && avx512bw && avx512vl)) return false;
    if (!__get_cpuid_count(7, 1, &a, &b, &c, &d)) return false;
    return (a >> 5) & 1u;  // AVX512_BF16
}

bool request_amx() {
    constexpr int kReqXcompPerm = 0x1023;
    constexpr int kXfeatureXtiledata = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool amx_ready() {
    static const bool ready = cpu_has_amx() && request_amx();  // thread-safe static init
    return ready;
}

struct alignas(64) TileConfig {
    uint8_t palette = 1;
    uint8_t start_row = 0;
    uint8_t reserved[14] = {};
    uint16_t colsb[16] = {};
    uint8_t rows[16] = {};
};

// fp32 -> bf16 as VCVTNEPS2BF16 does it: round to nearest even, NaN stays NaN (quiet bit
// set), subnormal inputs become signed zeros.
uint16_t to_bf16(float x) {
    uint32_t u;
    std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40u);
    if ((u & 0x7f800000u) == 0) return static_cast<uint16_t>((u >> 16) & 0x8000u);
    return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// 16 fp32 (masked: missing ones are zero) -> 16 bf16 in a 256-bit register.
MEMOPT_AMX_TARGET inline __m256i cvt16(const float* src, __mmask16 mask) {
    __m512 x = _mm512_maskz_loadu_ps(mask, src);
    return (__m256i)_mm512_cvtneps_pbh(x);
}

// [lo0..lo15 hi0..hi15] (bf16) -> [lo0 hi0 lo1 hi1 ...]: 16 pairs in pair-layout order.
MEMOPT_AMX_TARGET inline __m512i interleave(__m512bh both) {
    const __m512i idx = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9,
                                         24, 8, 23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1,
                                         16, 0);
    return _mm512_permutexvar_epi16(idx, (__m512i)both);
}

// The same from two rows of 16 bf16 held apart: [lo0 hi0 lo1 hi1 ...].
MEMOPT_AMX_TARGET inline __m512i pairs16(__m256i lo, __m256i hi) {
    return interleave((__m512bh)_mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1));
}

__mmask16 tail_mask(int64_t left) {
    return left >= 16 ? static_cast<__mmask16>(0xffff)
                      : static_cast<__mmask16>((1u << left) - 1u);
}

// Packed layouts. A (Mp x Kp) is stored as 16 x 32 tiles, each 1 KiB contiguous: element
// (i, k) at a_at(i, k). B (Kp x Np) is stored in the tiles' pair layout, also 1 KiB per
// tile: pair row p = k / 2 of column j holds (B[2p][j], B[2p+1][j]) side by side, at
// b_at(p, j). Tiles of one 16-row (A) or 16-column (B) strip follow each other along K.
inline int64_t a_at(int64_t i, int64_t k, int64_t Kp) {
    return (i / 16) * Kp * 16 + (k / 32) * 512 + (i % 16) * 32 + (k % 32);
}
inline int64_t b_at(int64_t p, int64_t j, int64_t Kp) {
    return (j / 16) * Kp * 16 + p * 32 + (j % 16) * 2;
}

// Columns [j0, j1) (multiples of 16) of B (K x N, element strides ks, js), every pair row,
// written as columns j - base. Pair rows past K and columns past N are zero.
MEMOPT_AMX_TARGET void pack_pairs(const float* x, int64_t ks, int64_t js, int64_t K, int64_t N,
                                  int64_t Kp, uint16_t* out, int64_t j0, int64_t j1,
                                  int64_t base) {
    for (int64_t p = 0; p < Kp / 2; ++p) {
        const int64_t k0 = 2 * p, k1 = 2 * p + 1;
        for (int64_t j = j0; j < j1; j += 16) {
            uint16_t* dst = out + b_at(p, j - base, Kp);
            if (js == 1) {  // rows of B contiguous: convert two rows, interleave into pairs
                const __mmask16 m = j < N && k0 < K ? tail_mask(N - j) : 0;
                const __m512 lo = _mm512_maskz_loadu_ps(m, x + k0 * ks + j);
                const __m512 hi = _mm512_maskz_loadu_ps(k1 < K ? m : 0, x + k1 * ks + j);
                _mm512_store_si512(dst, interleave(_mm512_cvtne2ps_pbh(hi, lo)));
            } else {
                for (int64_t q = 0; q < 16; ++q) {
                    const bool in = j + q < N;
                    dst[2 * q] = in && k0 < K ? to_bf16(x[k0 * ks + (j + q) * js]) : 0;
                    dst[2 * q + 1] = in && k1 < K ? to_bf16(x[k1 * ks + (j + q) * js]) : 0;
                }
            }
        }
    }
}

// Columns [j0, j1) of B, as pack_pairs, when its columns are contiguous along K (ks == 1):
// column j's pairs are adjacent floats; 16 pairs (32 k) are converted at once and scattered
// down the strip.
MEMOPT_AMX_TARGET void pack_pairs_kmajor(const float* x, int64_t js, int64_t K, int64_t N,
                                         int64_t Kp, uint16_t* out, int64_t j0, int64_t j1,
                                         int64_t base) {
    const __m512i lanes = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80,
                                           64, 48, 32, 16, 0);  // pair rows, in 32-bit words
    for (int64_t j = j0; j < j1; ++j) {
        const float* src = x + j * js;
        for (int64_t k = 0; k < Kp; k += 32) {
            __m256i lo = _mm256_setzero_si256(), hi = _mm256_setzero_si256();
            if (j < N && k < K) {
                lo = cvt16(src + k, tail_mask(K - k));
                if (k + 16 < K) hi = cvt16(src + k + 16, tail_mask(K - k - 16));
            }
            __m512i words = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
            _mm512_i32scatter_epi32(out + b_at(k / 2, j - base, Kp), lanes, words, 4);
        }
    }
}

// Rows [i0, i1) of A (M x K, element strides is, ks), written as rows i - base; rows past M
// and columns past K are zero.
MEMOPT_AMX_TARGET void pack_rows(const float* a, int64_t is, int64_t ks, int64_t M, int64_t K,
                                 int64_t Kp, uint16_t* out, int64_t i0, int64_t i1,
                                 int64_t base) {
    for (int64_t i = i0; i < i1; ++i) {
        const float* src = a + i * is;
        if (ks == 1 && i < M) {  // the common case: 32 floats -> one 64-byte tile row
            uint16_t* row = out + a_at(i - base, 0, Kp);
            int64_t k = 0;
            for (; k + 32 <= K; k += 32) {
                const __m512bh v = _mm512_cvtne2ps_pbh(_mm512_loadu_ps(src + k + 16),
                                                       _mm512_loadu_ps(src + k));
                _mm512_store_si512(row + (k / 32) * 512, (__m512i)v);
            }
            for (; k < Kp; k += 16) {
                const __mmask16 m = k < K ? tail_mask(K - k) : 0;
                _mm256_store_si256(reinterpret_cast<__m256i*>(row + (k / 32) * 512 + k % 32),
                                   cvt16(src + k, m));
            }
            continue;
        }
        for (int64_t k = 0; k < Kp; k += 16) {
            uint16_t* dst = out + a_at(i - base, k, Kp);
            if (ks == 1 || i >= M) {
                const __mmask16 m = i < M && k < K ? tail_mask(K - k) : 0;
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), cvt16(src + k, m));
            } else {
                for (int64_t q = 0; q < 16; ++q)
                    dst[q] = k + q < K ? to_bf16(src[(k + q) * ks]) : 0;
            }
        }
    }
}

// Rows [i0, i1) (multiples of 16) of A when its columns are contiguous along M (is == 1):
// two K rows of 16 elements are converted, interleaved into pairs and scattered, one 32-bit
// pair per output row.
MEMOPT_AMX_TARGET void pack_rows_mmajor(const float* a, int64_t ks, int64_t M, int64_t K,
                                        int64_t Kp, uint16_t* out, int64_t i0, int64_t i1,
                                        int64_t base) {
    const __m512i lanes = _mm512_set_epi32(240, 224, 208, 192, 176, 160, 144, 128, 112, 96, 80,
                                           64, 48, 32, 16, 0);  // rows of a tile, in words
    for (int64_t i = i0; i < i1; i += 16) {
        const __mmask16 m = i < M ? tail_mask(M - i) : 0;
        for (int64_t k = 0; k < Kp; k += 2) {
            __m256i lo = cvt16(a + k * ks + i, k < K ? m : 0);
            __m256i hi = cvt16(a + (k + 1) * ks + i, k + 1 < K ? m : 0);
            _mm512_i32scatter_epi32(out + a_at(i - base, k, Kp), lanes, pairs16(lo, hi), 4);
        }
    }
}

// C[i0:i0+32, j0:j0+32] = alpha * block (+ beta * C), clipped to M x N.
MEMOPT_AMX_TARGET void merge_block(const float* blk, float* c, int64_t cs, int64_t i0,
                                   int64_t j0, int64_t M, int64_t N, float alpha, float beta,
                                   bool accumulate) {
    const __m512 va = _mm512_set1_ps(alpha), vb = _mm512_set1_ps(beta);
    const int64_t rows = M - i0 < kBlock ? M - i0 : kBlock;
    for (int64_t r = 0; r < rows; ++r) {
        float* dst = c + (i0 + r) * cs + j0;
        for (int64_t h = 0; h < kBlock; h += 16) {
            if (j0 + h >= N) break;
            const __mmask16 m = tail_mask(N - j0 - h);
            __m512 x = _mm512_mul_ps(va, _mm512_load_ps(blk + r * kBlock + h));
            if (accumulate) {
                x = beta == 1.0f ? _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, dst + h))
                                 : _mm512_fmadd_ps(vb, _mm512_maskz_loadu_ps(m, dst + h), x);
            }
            _mm512_mask_storeu_ps(dst + h, m, x);
        }
    }
}

MEMOPT_AMX_TARGET void load_tile_config() {
    TileConfig cfg;
    for (int t = 0; t < 8; ++t) {
        cfg.rows[t] = 16;
        cfg.colsb[t] = 64;
    }
    // GCC's _tile_loadconfig tells the compiler it reads 8 bytes of the config, so without
    // this barrier the stores of rows and colsb above are dropped as dead.
    __asm__ __volatile__("" : : "r"(&cfg) : "memory");
    _tile_loadconfig(&cfg);
}

MEMOPT_AMX_TARGET void release_tiles() { _tile_release(); }

// Software prefetch of the next strip's fp32 source into L2 while the tiles work on this
// one: `rows` rows of `span` bytes, `stride` bytes apart, `per_step` lines per K step.
struct Prefetch {
    const char* p = nullptr;
    int64_t stride = 0, span = 0, rows = 0, off = 0, per_step = 0;
    void step() {
        for (int64_t q = 0; q < per_step && rows > 0; ++q) {
            _mm_prefetch(p + off, _MM_HINT_T1);
            off += 64;
            if (off >= span) {
                off = 0;
                p += stride;
                --rows;
            }
        }
    }
};

// Finished blocks wait here one block long: each block's merge into C (AVX-512, bound by
// C's memory traffic when beta is used) runs while the tiles work on the next block.
struct Pending {
    alignas(64) float buf[2][kBlock * kBlock];
    int cur = 0;
    bool has = false;
    int64_t i0 = 0, j0 = 0;
};
// One 32 x 32 output block from a 32-row strip pair of packed A (at) and a 32-column strip
// pair of packed B (bt), each strip Kp * 16 elements; merged into C at (i0, j0) after the
// next block's products are issued (or by flush()).
MEMOPT_AMX_TARGET void block(const uint16_t* at, const uint16_t* bt, int64_t Kp, float* c,
                             int64_t cs, int64_t i0, int64_t j0, int64_t M, int64_t N,
                             float alpha, float beta, bool accumulate, Prefetch& pf,
                             Prefetch pc, Pending& pend) {
    float* out = pend.buf[pend.cur];
    const int64_t strip = Kp * 16;
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t k = 0; k < Kp; k += kBlock, at += 512, bt += 512) {
        _tile_loadd(4, at, 64);
        _tile_loadd(5, at + strip, 64);
        _tile_loadd(6, bt, 64);
        _tile_loadd(7, bt + strip, 64);
        _tile_dpbf16ps(0, 4, 6);
        _tile_dpbf16ps(1, 4, 7);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
        pf.step();
        pc.step();
    }
    if (pend.has)
        merge_block(pend.buf[pend.cur ^ 1], c, cs, pend.i0, pend.j0, M, N, alpha, beta,
                    accumulate);
    _tile_stored(0, out, kBlock * 4);
    _tile_stored(1, out + 16, kBlock * 4);
    _tile_stored(2, out + 16 * kBlock, kBlock * 4);
    _tile_stored(3, out + 16 * kBlock + 16, kBlock * 4);
    pend.i0 = i0;
    pend.j0 = j0;
    pend.has = true;
    pend.cur ^= 1;
}
MEMOPT_AMX_TARGET void flush(Pending& pend, float* c, int64_t cs, int64_t M, int64_t N,
                             float alpha, float beta, bool accumulate) {
    if (pend.has)
        merge_block(pend.buf[pend.cur ^ 1], c, cs, pend.i0, pend.j0, M, N, alpha, beta,
                    accumulate);
    pend.has = false;
}

// Growable scratch per thread (scratch.h), kept between calls up to kKeep.
thread_local memopt::Scratch operand_scratch;  // the calling thread's: the operand packed whole
thread_local memopt::Scratch strip_scratch;    // every team thread's: its streamed strip
constexpr size_t kKeep = size_t{64} << 20;

int64_t share(int64_t n, int t, int nt) { return n * t / nt; }

#endif  // MEMOPT_HAVE_AMX

}  // namespace

extern "C" {

// 1 when the CPU has AMX-BF16 and the kernel granted this process the tile state.
MEMOPT_API int memopt_bf16_gemm_available(void) {
#ifdef MEMOPT_HAVE_AMX
    return amx_ready() ? 1 : 0;
#else
    return 0;
#endif
}

// C (M x N, row stride cs, unit column stride) = alpha * bf16(A) bf16(B) [+ beta * C when
// accumulate]; A is M x K with element strides (a_is, a_ks), B is K x N with (b_ks, b_js);
// on up to num_threads OpenMP threads.
// Returns 0, or -1 without AMX, -2 for bad sizes, -3 when the scratch cannot be allocated.
MEMOPT_API int memopt_bf16_gemm(const float* a, int64_t a_is, int64_t a_ks, const float* b,
                                int64_t b_ks, int64_t b_js, float* c, int64_t cs, int64_t M,
                                int64_t N, int64_t K, float alpha, float beta, int accumulate,
                                int num_threads) {
#ifdef MEMOPT_HAVE_AMX
    if (!amx_ready()) return -1;
    if (M < 0 || N < 0 || K < 0 || cs < N) return -2;
    if (M == 0 || N == 0) return 0;
    const int64_t Mp = round_up(M, kBlock), Np = round_up(N, kBlock);
    const int64_t Kp = round_up(K > 0 ? K : 1, kBlock);
    // The larger of A's rows and B's columns is streamed: each thread packs 32-wide strips
    // of it into its own small buffer and computes them against the other operand, which
    // the team packs whole first.
    const bool stream_a = Mp >= Np;
    const int64_t strips = (stream_a ? Mp : Np) / kBlock;
    const int64_t whole = stream_a ? Np : Mp;
    const int64_t strip = Kp * 16;
    auto* full = static_cast<uint16_t*>(operand_scratch.get(static_cast<size_t>(whole * Kp) * 2));
    if (full == nullptr) return -3;
    const bool acc = accumulate != 0 && beta != 0.0f;
    const bool a_mmajor = a_is == 1 && a_ks != 1 && M > 1;
    const bool b_kmajor = b_ks == 1 && b_js != 1 && N > 1;
    auto pack_a = [&](uint16_t* out, int64_t i0, int64_t i1, int64_t base) {
        if (a_mmajor) pack_rows_mmajor(a, a_ks, M, K, Kp, out, i0, i1, base);
        else pack_rows(a, a_is, a_ks, M, K, Kp, out, i0, i1, base);
    };
    auto pack_b = [&](uint16_t* out, int64_t j0, int64_t j1, int64_t base) {
        if (b_kmajor) pack_pairs_kmajor(b, b_js, K, N, Kp, out, j0, j1, base);
        else pack_pairs(b, b_ks, b_js, K, N, Kp, out, j0, j1, base);
    };
    // With accumulate, the next block's rows of C are prefetched while this one computes.
    auto c_ahead = [&](int64_t i0, int64_t j0) {
        Prefetch pc;
        if (acc && i0 < M && j0 < N) {
            pc = {reinterpret_cast<const char*>(c + i0 * cs + j0), cs * 4,
                  std::min<int64_t>(kBlock, N - j0) * 4, std::min<int64_t>(kBlock, M - i0), 0,
                  0};
            pc.per_step = (pc.rows * ((pc.span + 63) / 64) + Kp / kBlock - 1) / (Kp / kBlock);
        }
        return pc;
    };
    // A small product (APOLLO-Mini's rank 1, a small layer) stays on the calling thread.
    const int64_t work = Mp * Np * Kp;
    const int threads = work < (int64_t{1} << 21) ? 1 : (num_threads > 0 ? num_threads : 1);
    int failed = 0;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = 0, nt = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        nt = omp_get_num_threads();
#endif
        const int64_t g = whole / 16;
        if (stream_a) pack_b(full, share(g, t, nt) * 16, share(g, t + 1, nt) * 16, 0);
        else pack_a(full, share(g, t, nt) * 16, share(g, t + 1, nt) * 16, 0);
        auto* local = static_cast<uint16_t*>(strip_scratch.get(static_cast<size_t>(strip) * 4));
        if (local == nullptr) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        int any_failed;
#pragma omp atomic read
        any_failed = failed;
        if (!any_failed) {  // nothing is written to C unless every thread can run
            load_tile_config();
            Pending pend;
            for (int64_t s = share(strips, t, nt); s < share(strips, t + 1, nt); ++s) {
                const int64_t x0 = s * kBlock;
                Prefetch pf;  // the next strip's source, when its rows are contiguous
                const int64_t next = x0 + kBlock, nblocks = (stream_a ? Np : Mp) / kBlock;
                if (stream_a && a_ks == 1 && next < M) {
                    pf = {reinterpret_cast<const char*>(a + next * a_is), a_is * 4, K * 4,
                          std::min<int64_t>(kBlock, M - next), 0, 0};
                } else if (!stream_a && b_js == 1 && next < N) {
                    pf = {reinterpret_cast<const char*>(b + next), b_ks * 4,
                          std::min<int64_t>(kBlock, N - next) * 4, K, 0, 0};
                }
                pf.per_step = (pf.rows * ((pf.span + 63) / 64) + nblocks * (Kp / kBlock) - 1) /
                              (nblocks * (Kp / kBlock));
                if (stream_a) {
                    pack_a(local, x0, x0 + kBlock, x0);
                    for (int64_t j0 = 0; j0 < Np; j0 += kBlock)
                        block(local, full + (j0 / 16) * strip, Kp, c, cs, x0, j0, M, N, alpha,
                              beta, acc, pf, c_ahead(x0, j0 + kBlock), pend);
                } else {
                    pack_b(local, x0, x0 + kBlock, x0);
                    for (int64_t i0 = 0; i0 < Mp; i0 += kBlock)
                        block(full + (i0 / 16) * strip, local, Kp, c, cs, i0, x0, M, N, alpha,
                              beta, acc, pf, c_ahead(i0 + kBlock, x0), pend);
                }
            }
            flush(pend, c, cs, M, N, alpha, beta, acc);
            release_tiles();
        }
    }
    operand_scratch.trim(kKeep);
    if (failed) return -3;
    return 0;
#else
    (void)a, (void)a_is, (void)a_ks, (void)b, (void)b_ks, (void)b_js, (void)c, (void)cs;
    (void)M, (void)N, (void)K, (void)alpha, (void)beta, (void)accumulate, (void)num_threads;
    return -1;
#endif
}

}  // extern "C"
