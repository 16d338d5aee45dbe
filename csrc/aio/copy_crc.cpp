// Copy a buffer and compute its CRC-32C in one pass (the checkpoint's copy into host staging).
//
// Why: a checkpoint of CPU tensors was copied into staging (one pass reading the source and
// writing staging) and then checksummed (a second pass reading staging). On the 2-core VM of
// docs/benchmarks.md that is 0.18 + 0.09 CPU seconds per 1.2 GB, taken from a training loop
// that needs both cores. Here the source is read from memory once: each 24 KiB block is
// copied, then its CRC is computed from the same bytes while they are still in the L1 cache.
//
// How: the SSE4.2 crc32 instruction has a latency of 3 cycles and a throughput of 1 per
// cycle, so three independent streams (three consecutive blocks of kBlock bytes) keep it busy;
// their CRCs are joined with the "shift" operator: the CRC register of A||B is the register of
// A advanced over |B| zero bytes, XOR the register of B started from 0 (the register update is
// linear over GF(2)), and advancing over n zero bytes is a multiplication by x^(8n) modulo the
// polynomial, done with four 256-entry tables per block length. The copy streams front to
// back with non-temporal 16-byte stores: staging is read next by the disk's DMA, not by the
// CPU, so the copy neither reads the destination lines first nor evicts the cache. (A first
// version stored each stream's words as it read them, three interleaved store streams 8 KiB
// apart; on that VM the disk writes from staging filled that way ran 15-25% slower, with
// regular stores too, for a reason not found. Front-to-back stores do not.) Registers are kept
// in the reflected bit order of CRC-32C (bit 31 is x^0), inverted on entry and exit like every
// CRC-32C API. Without SSE4.2 (another architecture, an old CPU) memopt_copy_crc32c_hw() says
// 0 and the caller keeps its two-pass path; the table-driven fallback here is only for
// completeness.
// Plain C ABI, loaded with ctypes (memopt/checkpoint/copy_crc.py).
#include <cstddef>
#include <cstdint>
#include <cstring>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define MEMOPT_API extern "C" __attribute__((visibility("default")))

namespace {

constexpr uint32_t kPoly = 0x82F63B78u;  // CRC-32C (Castagnoli), reflected
constexpr size_t kBlock = 8192;          // bytes per stream per round of the 3-stream loop

// a * b modulo the polynomial, reflected (bit 31 is x^0)
uint32_t gf_mult(uint32_t a, uint32_t b) {
    uint32_t m = 1u << 31, p = 0;
    while (a) {
        if (a & m) {
            p ^= b;
            a ^= m;
        }
        m >>= 1;
        b = (b & 1) ? (b >> 1) ^ kPoly : b >> 1;
    }
    return p;
}

// x^(8 n) modulo the polynomial
uint32_t x_pow_8n(size_t n) {
    uint32_t result = 1u << 31, power = 1u << 23;  // x^0, x^8
    while (n) {
        if (n & 1) result = gf_mult(power, result);
        power = gf_mult(power, power);
        n >>= 1;
    }
    return result;
}

struct Tables {
    uint32_t bytewise[256];    // one byte at a time (fallback and tails without SSE4.2)
    uint32_t shift[4][256];    // advance a register over kBlock zero bytes, byte by byte
    Tables() {
        for (uint32_t b = 0; b < 256; ++b) {
            uint32_t c = b;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? (c >> 1) ^ kPoly : c >> 1;
            bytewise[b] = c;
        }
        const uint32_t op = x_pow_8n(kBlock);
        for (int k = 0; k < 4; ++k)
            for (uint32_t b = 0; b < 256; ++b) shift[k][b] = gf_mult(op, b << (8 * k));
    }
};

const Tables& tables() {
    static const Tables t;  // thread-safe one-time initialization
    return t;
}

inline uint32_t shift_block(const Tables& t, uint32_t crc) {
    return t.shift[0][crc & 0xff] ^ t.shift[1][(crc >> 8) & 0xff] ^
           t.shift[2][(crc >> 16) & 0xff] ^ t.shift[3][crc >> 24];
}

uint32_t copy_crc_soft(uint8_t* dst, const uint8_t* src, size_t n, uint32_t crc) {
    const Tables& t = tables();
    for (size_t i = 0; i < n; ++i) crc = t.bytewise[(crc ^ src[i]) & 0xff] ^ (crc >> 8);
    std::memcpy(dst, src, n);
    return crc;
}

#if defined(__x86_64__)
__attribute__((target("sse4.2"))) uint32_t copy_crc_hw(uint8_t* dst, const uint8_t* src,
                                                         size_t n, uint32_t crc) {
    const Tables& t = tables();
    const bool stream = (reinterpret_cast<uintptr_t>(dst) & 15) == 0;
    uint64_t c0 = crc;
    while (n >= 3 * kBlock) {
        // the copy first, front to back (see the top: not three interleaved store streams),
        // then the CRC of the same 24 KiB, read again from the L1 cache
        if (stream) {
            for (size_t i = 0; i < 3 * kBlock; i += 16)
                _mm_stream_si128(reinterpret_cast<__m128i*>(dst + i),
                                 _mm_loadu_si128(reinterpret_cast<const __m128i*>(src + i)));
        } else {
            std::memcpy(dst, src, 3 * kBlock);
        }
        uint64_t c1 = 0, c2 = 0;
        for (size_t i = 0; i < kBlock; i += 8) {
            uint64_t va, vb, vc;
            std::memcpy(&va, src + i, 8);
            std::memcpy(&vb, src + kBlock + i, 8);
            std::memcpy(&vc, src + 2 * kBlock + i, 8);
            c0 = _mm_crc32_u64(c0, va);
            c1 = _mm_crc32_u64(c1, vb);
            c2 = _mm_crc32_u64(c2, vc);
        }
        c0 = shift_block(t, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c1);
        c0 = shift_block(t, static_cast<uint32_t>(c0)) ^ static_cast<uint32_t>(c2);
        src += 3 * kBlock;
        dst += 3 * kBlock;
        n -= 3 * kBlock;
    }
    if (stream) _mm_sfence();  // the streamed stores are visible before the caller goes on
    for (; n >= 8; n -= 8, src += 8, dst += 8) {
        uint64_t v;
        std::memcpy(&v, src, 8);
        c0 = _mm_crc32_u64(c0, v);
        std::memcpy(dst, &v, 8);
    }
    uint32_t c = static_cast<uint32_t>(c0);
    for (; n; --n, ++src, ++dst) {
        c = _mm_crc32_u8(c, *src);
        *dst = *src;
    }
    return c;
}
#endif

bool have_hw() {
#if defined(__x86_64__)
    static const bool ok = __builtin_cpu_supports("sse4.2");
    return ok;
#else
    return false;
#endif
}

}  // namespace

// 1 when the fused copy uses the CPU's CRC-32C instruction (else it is table-driven: slow).
MEMOPT_API int memopt_copy_crc32c_hw() { return have_hw() ? 1 : 0; }

// Copy n bytes from src to dst (not overlapping) and return crc32c(src, previous): the
// running CRC-32C of everything checksummed so far, continued over these bytes.
MEMOPT_API uint32_t memopt_copy_crc32c(void* dst, const void* src, int64_t n, uint32_t previous) {
    if (n <= 0) return previous;
    auto* d = static_cast<uint8_t*>(dst);
    const auto* s = static_cast<const uint8_t*>(src);
    uint32_t crc = ~previous;
#if defined(__x86_64__)
    if (have_hw()) return ~copy_crc_hw(d, s, static_cast<size_t>(n), crc);
#endif
    return ~copy_crc_soft(d, s, static_cast<size_t>(n), crc);
}
