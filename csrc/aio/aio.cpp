// Asynchronous positional file I/O for memopt's NVMe tier: Linux AIO through raw syscalls.
//
// io_setup / io_submit / io_getevents / io_destroy are called with syscall(2), so there is no
// libaio dependency (a fresh machine has no libaio-dev). Each request is one IOCB_CMD_PREAD or
// IOCB_CMD_PWRITE of a caller buffer at a file offset; with O_DIRECT the kernel runs it
// asynchronously and io_getevents reaps it. The caller (memopt/offload/native_aio.py) keeps at
// most `depth` requests in flight, tags each with a 64-bit id, and sees for each one the byte
// count or -errno. Plain C ABI (no torch or Python headers), loaded with ctypes.
#include <cerrno>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <linux/aio_abi.h>
#include <sys/syscall.h>
#include <unistd.h>

#define MEMOPT_API extern "C" __attribute__((visibility("default")))

namespace {

struct Ctx {
    aio_context_t ctx;
    int depth;
};

}  // namespace

MEMOPT_API int memopt_aio_abi_version() { return 1; }

// A context able to hold `depth` requests in flight; NULL with *err = errno on failure.
MEMOPT_API void* memopt_aio_create(int depth, int* err) {
    Ctx* c = static_cast<Ctx*>(std::calloc(1, sizeof(Ctx)));
    if (c == nullptr) {
        *err = ENOMEM;
        return nullptr;
    }
    c->depth = depth;
    if (syscall(SYS_io_setup, depth, &c->ctx) < 0) {
        *err = errno;
        std::free(c);
        return nullptr;
    }
    *err = 0;
    return c;
}

MEMOPT_API void memopt_aio_destroy(void* handle) {
    Ctx* c = static_cast<Ctx*>(handle);
    if (c == nullptr) return;
    syscall(SYS_io_destroy, c->ctx);  // cancels / waits for requests still in flight
    std::free(c);
}

// Submit n requests (op 0 = read, 1 = write). status[i] is 0 when request i was queued, or
// -errno when the kernel refused it (EBADF, EINVAL, EAGAIN: the caller retries EAGAIN later).
// Returns the number queued.
MEMOPT_API int memopt_aio_submit(void* handle, int n, const int* ops, const int* fds,
                                 const uint64_t* bufs, const int64_t* nbytes,
                                 const int64_t* offsets, const uint64_t* tags, int* status) {
    Ctx* c = static_cast<Ctx*>(handle);
    iocb cbs[256];
    iocb* ptrs[256];
    int queued = 0;
    for (int base = 0; base < n; base += 256) {
        int m = n - base < 256 ? n - base : 256;
        for (int i = 0; i < m; ++i) {
            int k = base + i;
            std::memset(&cbs[i], 0, sizeof(iocb));
            cbs[i].aio_lio_opcode = ops[k] ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
            cbs[i].aio_fildes = static_cast<uint32_t>(fds[k]);
            cbs[i].aio_buf = bufs[k];
            cbs[i].aio_nbytes = static_cast<uint64_t>(nbytes[k]);
            cbs[i].aio_offset = offsets[k];
            cbs[i].aio_data = tags[k];
            ptrs[i] = &cbs[i];
        }
        int done = 0;
        while (done < m) {
            long r = syscall(SYS_io_submit, c->ctx, m - done, ptrs + done);
            if (r < 0) {
                int e = errno;
                if (e == EINTR) continue;
                if (e == EAGAIN) {  // ring full: report the rest as not queued
                    for (int i = done; i < m; ++i) status[base + i] = -EAGAIN;
                    for (int k = base + m; k < n; ++k) status[k] = -EAGAIN;
                    return queued;
                }
                status[base + done] = -e;  // this request is refused; go on with the next
                ++done;
                continue;
            }
            for (long i = 0; i < r; ++i) status[base + done + i] = 0;
            done += static_cast<int>(r);
            queued += static_cast<int>(r);
        }
    }
    return queued;
}

// Reap between min_nr and max_nr completions, waiting at most timeout_ns (< 0: no limit).
// tags[i] / results[i]: the request's tag and its byte count or -errno. Returns the number
// reaped, or -errno.
MEMOPT_API int memopt_aio_wait(void* handle, int min_nr, int max_nr, int64_t timeout_ns,
                               uint64_t* tags, int64_t* results) {
    Ctx* c = static_cast<Ctx*>(handle);
    io_event events[256];
    if (max_nr > 256) max_nr = 256;
    if (min_nr > max_nr) min_nr = max_nr;
    timespec ts;
    timespec* tp = nullptr;
    if (timeout_ns >= 0) {
        ts.tv_sec = timeout_ns / 1000000000LL;
        ts.tv_nsec = timeout_ns % 1000000000LL;
        tp = &ts;
    }
    long r;
    do {
        r = syscall(SYS_io_getevents, c->ctx, min_nr, max_nr, events, tp);
    } while (r < 0 && errno == EINTR && tp == nullptr);
    if (r < 0) return errno == EINTR ? 0 : -errno;
    for (long i = 0; i < r; ++i) {
        tags[i] = events[i].data;
        results[i] = events[i].res;
    }
    return static_cast<int>(r);
}
