// Asynchronous positional file I/O for memopt's NVMe tier: Linux AIO through raw syscalls.
//
// io_setup / io_submit / io_getevents / io_destroy are called with syscall(2), so there is no
// libaio dependency (a fresh machine has no libaio-dev). An engine owns one AIO context and
// one worker thread. Callers enqueue requests (pread or pwrite of a caller buffer at a file
// offset, each with a 64-bit tag); the worker keeps up to `depth` of them in the kernel,
// sleeps in poll(2) on an eventfd the kernel signals at each completion (IOCB_FLAG_RESFD) and
// on a second eventfd that enqueue signals, reaps with io_getevents, resubmits the rest of a
// short transfer at once and refills the queue, all without touching Python: the queue never
// waits for the GIL. Finished requests (tag, bytes moved or -errno) are collected by
// memopt_aio_poll. Plain C ABI (no torch or Python headers), loaded with ctypes.
#include <poll.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <linux/aio_abi.h>

#include <cerrno>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <utility>
#include <vector>

#define MEMOPT_API extern "C" __attribute__((visibility("default")))

namespace {

struct Req {
    int op, fd;
    uint64_t buf;
    int64_t nbytes, offset, done;
    uint64_t tag;
};

struct Engine {
    aio_context_t ctx = 0;
    int depth = 0;
    int done_fd = -1;  // signalled by the kernel at each completion
    int wake_fd = -1;  // signalled by enqueue and destroy
    std::mutex m;
    std::condition_variable cv_done;
    std::deque<Req> pending;
    std::deque<std::pair<uint64_t, int64_t>> finished;
    bool stop = false;
    std::unordered_map<uint64_t, Req> inflight;  // worker thread only
    std::thread worker;
};

void finish(Engine* e, std::vector<std::pair<uint64_t, int64_t>>& out) {
    if (out.empty()) return;
    {
        std::lock_guard<std::mutex> g(e->m);
        for (auto& f : out) e->finished.push_back(f);
    }
    e->cv_done.notify_all();
    out.clear();
}

void submit_some(Engine* e, std::vector<std::pair<uint64_t, int64_t>>& out) {
    std::vector<Req> batch;
    {
        std::lock_guard<std::mutex> g(e->m);
        while (!e->pending.empty() && (int)(e->inflight.size() + batch.size()) < e->depth) {
            batch.push_back(e->pending.front());
            e->pending.pop_front();
        }
    }
    if (batch.empty()) return;
    std::vector<iocb> cbs(batch.size());
    std::vector<iocb*> ptrs(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
        const Req& r = batch[i];
        std::memset(&cbs[i], 0, sizeof(iocb));
        cbs[i].aio_lio_opcode = r.op ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cbs[i].aio_fildes = static_cast<uint32_t>(r.fd);
        cbs[i].aio_buf = r.buf + r.done;
        cbs[i].aio_nbytes = static_cast<uint64_t>(r.nbytes - r.done);
        cbs[i].aio_offset = r.offset + r.done;
        cbs[i].aio_data = r.tag;
        cbs[i].aio_flags = IOCB_FLAG_RESFD;
        cbs[i].aio_resfd = static_cast<uint32_t>(e->done_fd);
        ptrs[i] = &cbs[i];
        e->inflight[r.tag] = r;
    }
    size_t done = 0;
    while (done < batch.size()) {
        long r = syscall(SYS_io_submit, e->ctx, (long)(batch.size() - done), ptrs.data() + done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) {  // kernel ring full: retry these after a completion
            std::lock_guard<std::mutex> g(e->m);
            for (size_t i = batch.size(); i-- > done;) {
                e->inflight.erase(batch[i].tag);
                e->pending.push_front(batch[i]);
            }
            return;
        }
        if (r < 0) {  // this request is refused (EBADF, EINVAL, ...): report it, go on
            out.emplace_back(batch[done].tag, -(int64_t)errno);
            e->inflight.erase(batch[done].tag);
            ++done;
            continue;
        }
        done += static_cast<size_t>(r);
    }
}

void reap(Engine* e, std::vector<std::pair<uint64_t, int64_t>>& out) {
    io_event events[256];
    timespec zero = {0, 0};
    for (;;) {
        long n = syscall(SYS_io_getevents, e->ctx, 0, 256, events, &zero);
        if (n <= 0) return;
        std::lock_guard<std::mutex> g(e->m);
        for (long i = 0; i < n; ++i) {
            auto it = e->inflight.find(events[i].data);
            if (it == e->inflight.end()) continue;
            Req r = it->second;
            e->inflight.erase(it);
            int64_t res = events[i].res;
            if (res > 0 && r.done + res < r.nbytes) {  // short transfer: resubmit the rest
                r.done += res;
                e->pending.push_front(r);
            } else {
                out.emplace_back(r.tag, res < 0 ? res : r.done + res);
            }
        }
    }
}

void run(Engine* e) {
    std::vector<std::pair<uint64_t, int64_t>> out;
    for (;;) {
        submit_some(e, out);
        finish(e, out);
        {
            std::lock_guard<std::mutex> g(e->m);
            if (e->stop && e->pending.empty() && e->inflight.empty()) return;
        }
        pollfd fds[2] = {{e->done_fd, POLLIN, 0}, {e->wake_fd, POLLIN, 0}};
        if (poll(fds, 2, 100) < 0 && errno != EINTR) std::this_thread::yield();
        uint64_t v;
        if (fds[1].revents & POLLIN) (void)!read(e->wake_fd, &v, sizeof v);
        if (fds[0].revents & POLLIN) (void)!read(e->done_fd, &v, sizeof v);
        reap(e, out);
    }
}

}  // namespace

MEMOPT_API int memopt_aio_abi_version() { return 2; }

// An engine keeping up to `depth` requests in flight; NULL with *err = errno on failure.
MEMOPT_API void* memopt_aio_create(int depth, int* err) {
    Engine* e = new (std::nothrow) Engine();
    if (e == nullptr) {
        *err = ENOMEM;
        return nullptr;
    }
    e->depth = depth;
    e->done_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    e->wake_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (e->done_fd < 0 || e->wake_fd < 0 || syscall(SYS_io_setup, depth, &e->ctx) < 0) {
        *err = errno;
        if (e->done_fd >= 0) close(e->done_fd);
        if (e->wake_fd >= 0) close(e->wake_fd);
        delete e;
        return nullptr;
    }
    e->worker = std::thread(run, e);
    *err = 0;
    return e;
}

// Queue n requests (op 0 = read, 1 = write); returns at once.
MEMOPT_API void memopt_aio_enqueue(void* handle, int n, const int* ops, const int* fds,
                                   const uint64_t* bufs, const int64_t* nbytes,
                                   const int64_t* offsets, const uint64_t* tags) {
    Engine* e = static_cast<Engine*>(handle);
    {
        std::lock_guard<std::mutex> g(e->m);
        for (int i = 0; i < n; ++i)
            e->pending.push_back({ops[i], fds[i], bufs[i], nbytes[i], offsets[i], 0, tags[i]});
    }
    uint64_t one = 1;
    (void)!write(e->wake_fd, &one, sizeof one);
}

// Collect up to max_nr finished requests, waiting at most timeout_ns for the first one.
// tags[i] / results[i]: the tag and the bytes moved (less than asked: the file ended) or
// -errno. Returns the number collected.
MEMOPT_API int memopt_aio_poll(void* handle, int max_nr, int64_t timeout_ns, uint64_t* tags,
                               int64_t* results) {
    Engine* e = static_cast<Engine*>(handle);
    std::unique_lock<std::mutex> lk(e->m);
    e->cv_done.wait_for(lk, std::chrono::nanoseconds(timeout_ns),
                        [e] { return !e->finished.empty(); });
    int n = 0;
    while (n < max_nr && !e->finished.empty()) {
        tags[n] = e->finished.front().first;
        results[n] = e->finished.front().second;
        e->finished.pop_front();
        ++n;
    }
    return n;
}

// Finish every queued and in-flight request, then release the context and the thread.
MEMOPT_API void memopt_aio_destroy(void* handle) {
    Engine* e = static_cast<Engine*>(handle);
    if (e == nullptr) return;
    {
        std::lock_guard<std::mutex> g(e->m);
        e->stop = true;
    }
    uint64_t one = 1;
    (void)!write(e->wake_fd, &one, sizeof one);
    e->worker.join();
    syscall(SYS_io_destroy, e->ctx);
    close(e->done_fd);
    close(e->wake_fd);
    delete e;
}
