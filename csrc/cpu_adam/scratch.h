// A growable 64-byte-aligned buffer kept between calls (its users make it thread_local):
// bf16_gemm.cpp's packing buffers and projected_adam.cpp's projected gradient and direction.
#pragma once

#include <cstddef>
#include <cstdlib>

namespace memopt {

struct Scratch {
    void* p = nullptr;
    size_t n = 0;
    ~Scratch() { std::free(p); }
    // At least `bytes` (rounded up to whole pages); nullptr if it cannot be allocated.
    void* get(size_t bytes) {
        if (bytes <= n) return p;
        std::free(p);
        n = 0;
        const size_t size = (bytes + 4095) / 4096 * 4096;
        p = std::aligned_alloc(64, size);
        if (p != nullptr) n = size;
        return p;
    }
    // Frees a buffer grown past `keep` bytes (a very large call does not pin it).
    void trim(size_t keep) {
        if (n > keep) {
            std::free(p);
            p = nullptr;
            n = 0;
        }
    }
};

}  // namespace memopt
