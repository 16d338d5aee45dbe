// Fused AdamW step over fp32 master weights on the CPU, for memopt.offload.cpu_adam.
//
// One pass per element: read p, g, m, v; write p, m, v (and, optionally, a bf16/fp16 copy
// of the updated p). Adam on the CPU is memory-bound (28 B/element for fp32), so the kernel
// aims at streaming bandwidth: OpenMP over fixed-size chunks (dynamic schedule, so a core
// slowed by another process does not hold the others back), one SIMD loop per chunk.
//
// Update (both eps placements and decoupled decay in one form; Python computes constants):
//   m = b1 m + (1 - b1) g ;  v = b2 v + (1 - b2) g^2
//   p = (p * pre - step_size * m / (sqrt(v) * c2 + eps)) * post
// "torch" (torch.optim.AdamW): c2 = 1/sqrt(bc2), step_size = lr/bc1, pre = 1 - lr wd, post = 1.
// "galore": c2 = 1, step_size = lr sqrt(bc2)/bc1, pre = 1, post = 1 - lr wd.
//
// ISA: scalar, AVX2 (+FMA, F16C) and AVX-512 (F+BW) bodies are compiled in this one file
// with target pragmas, so the library is built without -march flags and runs anywhere; the
// caller picks the body at run time from memopt_cpu_adam_isa_mask() (cpuid + xgetbv).
// bf16 stores round to nearest even (NaN stays a quiet NaN), fp16 stores use F16C's
// round-to-nearest-even, matching torch's .to(dtype).
//
// Plain C ABI (no torch, no Python headers): loaded with ctypes, so the build needs only a
// C++ compiler and, optionally, OpenMP.

#include <cmath>
#include <cstdint>
#include <cstring>

#include "lowp_scalar.h"

#if defined(__x86_64__) || defined(_M_X64)
#define MEMOPT_X86 1
#include <cpuid.h>
#include <immintrin.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

// The build hides every symbol (-fvisibility=hidden); only the C entry points are exported.
#define MEMOPT_API __attribute__((visibility("default")))

namespace {

enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };
enum Dtype { DT_NONE = 0, DT_F32 = 1, DT_BF16 = 2, DT_F16 = 3 };

struct Hyper {
    float b1, b2, eps, c2, step_size, pre, post;
    bool stream_out;  // non-temporal stores for the low-precision copy (large calls)
    // 1 - b1 and 1 - b2, taken in double before rounding: 1.0f - float(0.999) is 1.3e-5 off
    // 0.001 in relative terms, a bias on every second moment the torch path does not have.
    float a1, a2;
};

// Calls moving at least this many elements write the low-precision copy with streaming
// stores: 4 Mi elements is 8 MiB of bf16, past what L2 holds and a fair share of L3.
constexpr int64_t kStreamMin = int64_t(1) << 22;

struct Span {  // one chunk of one tensor
    float* p;
    const void* g;
    float* m;
    float* v;
    void* out;
    int64_t n;
};

// ---------------------------------------------------------------- scalar helpers
using memopt_native::bf16_to_f32;
using memopt_native::f16_to_f32;
using memopt_native::f32_to_bf16;
using memopt_native::f32_to_f16;

inline float load_grad(const void* g, int dt, int64_t i) {
    if (dt == DT_BF16) return bf16_to_f32(static_cast<const uint16_t*>(g)[i]);
    if (dt == DT_F16) return f16_to_f32(static_cast<const uint16_t*>(g)[i]);
    return static_cast<const float*>(g)[i];
}

inline void scalar_range(const Span& s, int64_t lo, const Hyper& h, int gdt, int odt) {
    for (int64_t i = lo; i < s.n; ++i) {
        float g = load_grad(s.g, gdt, i);
        float m = h.b1 * s.m[i] + h.a1 * g;
        float v = h.b2 * s.v[i] + h.a2 * g * g;
        float p = (s.p[i] * h.pre - h.step_size * (m / (std::sqrt(v) * h.c2 + h.eps))) * h.post;
        s.m[i] = m;
        s.v[i] = v;
        s.p[i] = p;
        if (odt == DT_BF16) static_cast<uint16_t*>(s.out)[i] = f32_to_bf16(p);
        if (odt == DT_F16) static_cast<uint16_t*>(s.out)[i] = f32_to_f16(p);
    }
}

}  // namespace

#include "cpu_adam_simd.h"

namespace {

void run_span(const Span& s, const Hyper& h, int gdt, int odt, int isa) {
    int64_t done = 0;
#ifdef MEMOPT_X86
    if (isa == ISA_AVX512) done = avx512_span(s, h, gdt, odt);
    else if (isa == ISA_AVX2) done = avx2_span(s, h, gdt, odt);
#else
    (void)isa;
#endif
    scalar_range(s, done, h, gdt, odt);
}

}  // namespace

extern "C" {

// Bit 0: scalar (always), bit 1: AVX2+FMA+F16C usable, bit 2: AVX-512 F+BW usable
// (CPU flags and the OS saving the registers, from xgetbv).
MEMOPT_API int memopt_cpu_adam_isa_mask(void) {
    int mask = 1 << ISA_SCALAR;
#ifdef MEMOPT_X86
    unsigned a, b, c, d;
    if (!__get_cpuid(1, &a, &b, &c, &d)) return mask;
    bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12);
    bool f16c = c & (1u << 29);
    if (!osxsave || !avx) return mask;
    unsigned lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    bool ymm_os = (lo & 0x6u) == 0x6u, zmm_os = (lo & 0xe6u) == 0xe6u;
    if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return mask;
    bool avx2 = b & (1u << 5), avx512f = b & (1u << 16), avx512bw = b & (1u << 30);
    if (ymm_os && avx2 && fma && f16c) mask |= 1 << ISA_AVX2;
    if (zmm_os && avx512f && avx512bw && (mask & (1 << ISA_AVX2))) mask |= 1 << ISA_AVX512;
#endif
    return mask;
}

// Bumped whenever the signature of memopt_cpu_adam_step changes, so a stale build left in
// the source tree is refused (and the torch path used) instead of called wrongly.
// 2: memopt_lowrank_adam (lowrank_adam.cpp) added.
// 3: memopt_adamw_q8 (lowbit_adam.cpp) added.
// 4: memopt_q8_quantize / memopt_q8_dequantize (lowbit_adam.cpp) added.
// 5: memopt_channel_sumsq (channel_sumsq.cpp) added.
MEMOPT_API int memopt_cpu_adam_abi_version(void) { return 7; }

MEMOPT_API int memopt_cpu_adam_has_openmp(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

// One AdamW step over n_tensors tensors. hyper = {b1, b2, eps, c2, step_size, pre, post}.
// outs may be null (no copy-back) or hold one pointer per tensor. Returns 0, or -1 for an
// ISA this CPU cannot run, -2 for a bad dtype code.
MEMOPT_API int memopt_cpu_adam_step(int64_t n_tensors, float* const* params, const void* const* grads,
                         float* const* exp_avgs, float* const* exp_avg_sqs,
                         void* const* outs, const int64_t* numels, int grad_dtype,
                         int out_dtype, const double* hyper, int isa, int n_threads,
                         int64_t chunk) {
    if (isa < 0 || isa > ISA_AVX512 || !(memopt_cpu_adam_isa_mask() & (1 << isa))) return -1;
    if (grad_dtype < DT_F32 || grad_dtype > DT_F16 || out_dtype < 0 || out_dtype > DT_F16)
        return -2;
    if (outs == nullptr) out_dtype = DT_NONE;
    Hyper h{static_cast<float>(hyper[0]), static_cast<float>(hyper[1]),
            static_cast<float>(hyper[2]), static_cast<float>(hyper[3]),
            static_cast<float>(hyper[4]), static_cast<float>(hyper[5]),
            static_cast<float>(hyper[6]), false,
            static_cast<float>(1.0 - hyper[0]), static_cast<float>(1.0 - hyper[1])};
    if (chunk < 64) chunk = 64;
    chunk = (chunk + 63) / 64 * 64;  // whole cache lines per chunk
    int64_t total = 0;
    int64_t elements = 0;
    for (int64_t t = 0; t < n_tensors; ++t) {
        total += (numels[t] + chunk - 1) / chunk;
        elements += numels[t];
    }
    h.stream_out = elements >= kStreamMin;
    const int gsize = grad_dtype == DT_F32 ? 4 : 2;
#pragma omp parallel num_threads(n_threads > 0 ? n_threads : 1)
    {
        int64_t t = 0, first = 0;  // each thread walks the tensors forward: chunks only grow
#pragma omp for schedule(dynamic, 1)
        for (int64_t c = 0; c < total; ++c) {
            while (c >= first + (numels[t] + chunk - 1) / chunk) {
                first += (numels[t] + chunk - 1) / chunk;
                ++t;
            }
            int64_t lo = (c - first) * chunk;
            int64_t n = numels[t] - lo < chunk ? numels[t] - lo : chunk;
            Span s{params[t] + lo,
                   static_cast<const char*>(grads[t]) + lo * gsize,
                   exp_avgs[t] + lo,
                   exp_avg_sqs[t] + lo,
                   out_dtype ? static_cast<char*>(outs[t]) + lo * 2 : nullptr,
                   n};
            run_span(s, h, grad_dtype, out_dtype, isa);
        }
    }
    return 0;
}

}  // extern "C"
