// Adam on a projected (low-rank) gradient, one pass, for memopt.optim.kernels on the CPU.
//
// The low-rank optimizers (GaLore, FRUGAL, Natural GaLore, APOLLO) run Adam on R, the
// gradient projected to rank r, and use the normalized direction, not a parameter update:
//   m = b1 m + (1 - b1) R ;  v = b2 v + (1 - b2) R^2
//   d = m / (sqrt(v) * c2 + eps)      c2 = 1/sqrt(bc2) ("torch" eps), 1 ("galore" eps)
// and APOLLO also needs, per channel (a row or a column of R), the squared norms of d and of
// R. torch does this in about eight full passes over r x n tensors (mul_, add_, addcmul_,
// sqrt, div_, add_, div, square + sum twice); here it is one pass reading R, m, v and writing
// m, v, d, with the channel sums accumulated on the way.
//
// Work split: with row channels (or none) OpenMP takes whole rows, each thread owning the
// sums of its rows; with column channels it takes blocks of columns over all rows, each
// thread owning the sums of its columns, so no reduction between threads is needed either
// way. Each thread gets one contiguous range (static schedule): with dynamic 4-row chunks
// the two threads interleaved rows, wrote the same cache lines of the per-row sums and paid
// a dispatch per 2 KiB, and a 60M block's seven calls took 0.85 ms on 2 threads against
// 0.49 on one (now 0.27-0.29). The element loops are plain C++ compiled once per ISA
// (target_clones: AVX-512, AVX2, baseline; the loader picks the best at load time), so the
// library still runs anywhere.
// Small matrices stay on the calling thread (see the grain below).
//
// Plain C ABI: loaded with ctypes from memopt/offload/cpu_adam.py (same library, same ABI
// version as the AdamW step).

#include <algorithm>
#include <cmath>
#include <cstdint>

#ifdef _OPENMP
#include <omp.h>
#endif

#include "clones.h"

namespace {

struct LowRankHyper {
    // a1 = 1 - b1 and a2 = 1 - b2 come from the caller, computed in double as torch does
    // (1.0f - float(0.999) is 1.3e-5 away from 0.001 in relative terms).
    float b1, a1, b2, a2, eps, c2;
};

// One element: moments in place, the direction returned.
inline float adam_elem(float x, float& m, float& v, const LowRankHyper& h) {
    m = h.b1 * m + h.a1 * x;
    v = h.b2 * v + h.a2 * x * x;
    return m / (std::sqrt(v) * h.c2 + h.eps);
}

// One row segment [c0, c1): moments and direction; with `sums`, the row's squared norms of
// the direction and of the gradient added into num[0] / den[0].
MEMOPT_CLONES
void row_segment(const float* __restrict g, float* __restrict m, float* __restrict v,
                 float* __restrict d, int64_t c0, int64_t c1, LowRankHyper h,
                 float* __restrict num, float* __restrict den, bool sums) {
    if (sums) {  // lane-wise partials the compiler can vectorize
        constexpr int L = 16;
        float sn[L] = {0}, sd[L] = {0};
        int64_t c = c0;
        for (; c + L <= c1; c += L) {
            for (int k = 0; k < L; ++k) {
                const float x = g[c + k];
                const float dd = adam_elem(x, m[c + k], v[c + k], h);
                d[c + k] = dd;
                sn[k] += dd * dd;
                sd[k] += x * x;
            }
        }
        float tn = 0.0f, td = 0.0f;
        for (; c < c1; ++c) {
            const float x = g[c];
            const float dd = adam_elem(x, m[c], v[c], h);
            d[c] = dd;
            tn += dd * dd;
            td += x * x;
        }
        for (int k = 0; k < L; ++k) {
            tn += sn[k];
            td += sd[k];
        }
        num[0] += tn;
        den[0] += td;
        return;
    }
    for (int64_t c = c0; c < c1; ++c) d[c] = adam_elem(g[c], m[c], v[c], h);
}

// Column channels: one block of at most kColBlock columns over all rows, the column sums
// kept in local arrays (no aliasing with the streams, so the loop vectorizes) and stored once.
constexpr int64_t kColBlock = 64;

MEMOPT_CLONES
void col_block(const float* __restrict g, float* __restrict m, float* __restrict v,
               float* __restrict d, int64_t rows, int64_t cols, int64_t c0, int64_t c1,
               LowRankHyper h, float* __restrict num, float* __restrict den) {
    float sn[kColBlock] = {0}, sd[kColBlock] = {0};
    const int64_t w = c1 - c0;
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * cols + c0;
        for (int64_t k = 0; k < w; ++k) {
            const float x = g[o + k];
            const float dd = adam_elem(x, m[o + k], v[o + k], h);
            d[o + k] = dd;
            sn[k] += dd * dd;
            sd[k] += x * x;
        }
    }
    for (int64_t k = 0; k < w; ++k) {
        num[c0 + k] = sn[k];
        den[c0 + k] = sd[k];
    }
}

}  // namespace

// norms: -1 none, 1 per row (num/den hold `rows` floats), 0 per column (`cols` floats).
// Returns 0, or -1 on bad arguments.
extern "C" MEMOPT_API int memopt_lowrank_adam(const float* g, float* m, float* v, float* d,
                                              int64_t rows, int64_t cols, float b1, float a1,
                                              float b2, float a2, float eps, float c2,
                                              int norms, float* num, float* den) {
    if (rows < 0 || cols < 0 || norms < -1 || norms > 1) return -1;
    const int64_t n_sums = norms == 1 ? rows : (norms == 0 ? cols : 0);
    if (n_sums > 0 && (num == nullptr || den == nullptr)) return -1;  // null is fine if empty
    const LowRankHyper h{b1, a1, b2, a2, eps, c2};
    // Threads only for work worth waking them for (torch's grain: 32 Ki elements per
    // thread); a small matrix (APOLLO-Mini's 1 x n, a small rank) runs on the caller's
    // thread, where an OpenMP region on a busy machine can cost more than the work.
    const int64_t n = rows * cols;
    int threads = 1;
#ifdef _OPENMP
    threads = static_cast<int>(std::max<int64_t>(
        1, std::min<int64_t>(omp_get_max_threads(), n / (int64_t(1) << 15))));
#endif
    if (norms == 0) {
        const int64_t nblocks = (cols + kColBlock - 1) / kColBlock;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
        for (int64_t b = 0; b < nblocks; ++b) {
            const int64_t c0 = b * kColBlock, c1 = std::min(cols, c0 + kColBlock);
            col_block(g, m, v, d, rows, cols, c0, c1, h, num, den);
        }
        return 0;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int64_t r = 0; r < rows; ++r) {
        const int64_t o = r * cols;
        float dummy[2] = {0.0f, 0.0f};
        float* rn = norms == 1 ? num + r : dummy;
        float* rd = norms == 1 ? den + r : dummy + 1;
        if (norms == 1) {
            *rn = 0.0f;
            *rd = 0.0f;
        }
        row_segment(g + o, m + o, v + o, d + o, 0, cols, h, rn, rd, norms == 1);
    }
    return 0;
}
