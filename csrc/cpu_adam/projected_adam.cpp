// GaLore's whole steady step for one matrix in one native call (no refresh):
//
//   R = G P^T (right: P is r x N, R is M x r)    or    R = P^T G (left: P is M x r, R is r x N)
//   m, v, D = Adam(R)                            (memopt_lowrank_adam, moments in place)
//   W = beta W + alpha (D P)    (right)          or    W = beta W + alpha (P D)   (left)
//
// with both products in bf16 arithmetic on the AMX tiles (memopt_bf16_gemm): the
// matmul_dtype="bfloat16" route on AMX CPUs. The same three kernels run when the optimizer
// calls them one by one from Python, with the same arguments, so the results are bitwise
// those of that path; what this saves is the host work between them (on a LLaMA-60M block,
// ~0.5 ms of a ~3 ms step: route and state lookups, two allocations and three ctypes calls
// per matrix). R and D live in per-thread scratch (scratch.h) that grows to the largest
// matrix seen (kept up to 64 MiB between calls).
//
// Plain C ABI, loaded with ctypes from memopt/offload/cpu_adam.py (same library and ABI).

#include <cstdint>
#include <cstdlib>

#include "clones.h"
#include "scratch.h"

extern "C" {
int memopt_bf16_gemm(const float* a, int64_t a_is, int64_t a_ks, const float* b, int64_t b_ks,
                     int64_t b_js, float* c, int64_t cs, int64_t M, int64_t N, int64_t K,
                     float alpha, float beta, int accumulate, int num_threads);
int memopt_lowrank_adam(const float* g, float* m, float* v, float* d, int64_t rows,
                        int64_t cols, float b1, float a1, float b2, float a2, float eps,
                        float c2, int norms, float* num, float* den);
}

namespace {

thread_local memopt::Scratch scratch;  // R and D, two fp32 buffers of R's size
constexpr size_t kKeep = size_t{64} << 20;  // kept between calls up to 64 MiB

int step(const float* g, int64_t g_rs, int64_t g_cs, const float* p, int64_t p_rs,
         int64_t p_cs, float* w, int64_t w_rs, float* m, float* v, int64_t M, int64_t N,
         int64_t r, int right, float b1, float a1, float b2, float a2, float eps, float c2,
         float alpha, float beta, int num_threads) {
    const int64_t rows = right ? M : r, cols = right ? r : N;
    auto* low = static_cast<float*>(scratch.get(static_cast<size_t>(2 * rows * cols) * 4));
    if (low == nullptr) return -3;
    float* dir = low + rows * cols;
    int rc;
    // P^T is P with its two strides swapped.
    if (right)  // R (M x r) = G (M x N) @ P^T
        rc = memopt_bf16_gemm(g, g_rs, g_cs, p, p_cs, p_rs, low, r, M, r, N, 1.0f, 0.0f, 0,
                              num_threads);
    else  // R (r x N) = P^T (r x M) @ G
        rc = memopt_bf16_gemm(p, p_cs, p_rs, g, g_rs, g_cs, low, N, r, N, M, 1.0f, 0.0f, 0,
                              num_threads);
    if (rc != 0) return rc;
    rc = memopt_lowrank_adam(low, m, v, dir, rows, cols, b1, a1, b2, a2, eps, c2, -1, nullptr,
                             nullptr);
    if (rc != 0) return rc;
    if (right)  // W (M x N) = beta W + alpha D (M x r) @ P (r x N)
        return memopt_bf16_gemm(dir, r, 1, p, p_rs, p_cs, w, w_rs, M, N, r, alpha, beta, 1,
                                num_threads);
    // W = beta W + alpha P (M x r) @ D (r x N)
    return memopt_bf16_gemm(p, p_rs, p_cs, dir, N, 1, w, w_rs, M, N, r, alpha, beta, 1,
                            num_threads);
}

}  // namespace

// g: M x N with element strides (g_rs, g_cs); p: the basis (right: r x N, left: M x r) with
// element strides (p_rs, p_cs) (a right basis from an SVD is often column-major); w: M x N,
// row stride w_rs, unit column stride; m, v: contiguous, R's shape.
// b1..c2 as memopt_lowrank_adam; alpha, beta as memopt_bf16_gemm's write-back.
// Returns 0; -2 bad sizes, -3 no scratch; otherwise the first failing kernel's code (-1 no
// AMX). On an error before the write-back W is untouched; the moments are updated only once
// the projection has succeeded.
extern "C" MEMOPT_API int memopt_projected_adam(const float* g, int64_t g_rs, int64_t g_cs,
                                                const float* p, int64_t p_rs, int64_t p_cs,
                                                float* w, int64_t w_rs,
                                                float* m, float* v, int64_t M, int64_t N,
                                                int64_t r, int right, float b1, float a1,
                                                float b2, float a2, float eps, float c2,
                                                float alpha, float beta, int num_threads) {
    if (M <= 0 || N <= 0 || r <= 0 || w_rs < N) return -2;
    const int rc = step(g, g_rs, g_cs, p, p_rs, p_cs, w, w_rs, m, v, M, N, r, right, b1, a1,
                        b2, a2, eps, c2, alpha, beta, num_threads);
    scratch.trim(kKeep);
    return rc;
}
