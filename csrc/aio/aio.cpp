// Asynchronous positional file I/O for memopt's NVMe tier: Linux AIO through raw syscalls.
//
// io_setup / io_submit / io_getevents / io_destroy are called with syscall(2), so there is no
// libaio dependency (a fresh machine has no libaio-dev). An engine owns one AIO context and
// one worker thread. Callers enqueue requests (pread or pwrite of a caller buffer at a file
// offset, each with a 64-bit tag); the engine splits each request into pieces of at most
// `block` bytes and keeps up to `depth` pieces in the kernel. The worker sleeps in poll(2) on
// an eventfd the kernel signals at each completion (IOCB_FLAG_RESFD) and on a second eventfd
// that enqueue signals, reaps with io_getevents, resubmits the rest of a short transfer at
// once and refills the queue with one io_submit per batch, all without touching Python: the
// queue never waits for the GIL.
//
// One completion per request, not per piece: a request finishes when its last piece does,
// with status 0 (every byte moved), errno of its first failed piece, or -1 when a piece came
// back short with nothing more to move (a read past the end of the file); the failed piece's
// file offset and length come with it, for the error message. So Python resolves one future
// per request (a 64 MiB tensor at 1 MiB blocks is 1 future instead of 64).
// Plain C ABI (no torch or Python headers), loaded with ctypes.
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
#include <vector>

#define MEMOPT_API extern "C" __attribute__((visibility("default")))

namespace {

struct Request {
    int op, fd;
    uint64_t buf, tag;
    int64_t nbytes, offset, block;
    int64_t next = 0;     // bytes of the request already cut into pieces
    int64_t pieces = 0;   // pieces cut and not yet finished
    int status = 0;       // 0, errno of the first failed piece, or -1 (short transfer)
    int64_t fail_off = 0, fail_len = 0;
};

struct Piece {  // one slot of the in-flight table; its index is the iocb's aio_data
    Request* req = nullptr;
    int64_t off = 0, len = 0, done = 0;  // within the request
};

struct Done {
    uint64_t tag;
    int64_t status, offset, nbytes;
};

struct Engine {
    aio_context_t ctx = 0;
    int depth = 0;
    int done_fd = -1;  // signalled by the kernel at each completion
    int wake_fd = -1;  // signalled by enqueue and destroy
    std::mutex m;
    std::condition_variable cv_done;
    std::deque<Request*> pending;  // requests with pieces left to cut (enqueue order)
    std::deque<Done> finished;
    bool stop = false;
    // Worker thread only:
    std::vector<Piece> slots;
    std::vector<int> free_slots;
    std::deque<int> retry;  // slots to (re)submit first: rest of a short transfer, EAGAIN
    int inflight = 0;
    std::thread worker;
};

void piece_failed(Piece& p, int status) {
    Request* r = p.req;
    if (r->status == 0) {
        r->status = status;
        r->fail_off = r->offset + p.off;
        r->fail_len = p.len;
    }
}

// Release a finished slot; a request whose last piece this was goes to `out`.
void release(Engine* e, int slot, std::vector<Done>& out) {
    Request* r = e->slots[slot].req;
    e->slots[slot].req = nullptr;
    e->free_slots.push_back(slot);
    if (--r->pieces == 0 && r->next == r->nbytes) {
        out.push_back({r->tag, r->status, r->fail_off, r->fail_len});
        delete r;
    }
}

void finish(Engine* e, std::vector<Done>& out) {
    if (out.empty()) return;
    {
        std::lock_guard<std::mutex> g(e->m);
        for (auto& f : out) e->finished.push_back(f);
    }
    e->cv_done.notify_all();
    out.clear();
}

// Slots to submit now: retries first, then new pieces cut from the pending requests.
void take_work(Engine* e, std::vector<int>& batch, std::vector<Done>& out) {
    while (!e->retry.empty()) {
        batch.push_back(e->retry.front());
        e->retry.pop_front();
    }
    std::lock_guard<std::mutex> g(e->m);
    while (!e->pending.empty() && !e->free_slots.empty()) {
        Request* r = e->pending.front();
        if (r->nbytes == 0) {  // nothing to move: done at once
            e->pending.pop_front();
            out.push_back({r->tag, 0, r->offset, 0});
            delete r;
            continue;
        }
        int s = e->free_slots.back();
        e->free_slots.pop_back();
        int64_t len = r->nbytes - r->next < r->block ? r->nbytes - r->next : r->block;
        e->slots[s] = {r, r->next, len, 0};
        r->next += len;
        r->pieces += 1;
        if (r->next == r->nbytes) e->pending.pop_front();
        batch.push_back(s);
    }
}

void submit_some(Engine* e, std::vector<Done>& out) {
    std::vector<int> batch;
    take_work(e, batch, out);
    if (batch.empty()) return;
    std::vector<iocb> cbs(batch.size());
    std::vector<iocb*> ptrs(batch.size());
    for (size_t i = 0; i < batch.size(); ++i) {
        const Piece& p = e->slots[batch[i]];
        const Request* r = p.req;
        std::memset(&cbs[i], 0, sizeof(iocb));
        cbs[i].aio_lio_opcode = r->op ? IOCB_CMD_PWRITE : IOCB_CMD_PREAD;
        cbs[i].aio_fildes = static_cast<uint32_t>(r->fd);
        cbs[i].aio_buf = r->buf + p.off + p.done;
        cbs[i].aio_nbytes = static_cast<uint64_t>(p.len - p.done);
        cbs[i].aio_offset = r->offset + p.off + p.done;
        cbs[i].aio_data = static_cast<uint64_t>(batch[i]);
        cbs[i].aio_flags = IOCB_FLAG_RESFD;
        cbs[i].aio_resfd = static_cast<uint32_t>(e->done_fd);
        ptrs[i] = &cbs[i];
    }
    size_t done = 0;
    while (done < batch.size()) {
        long r = syscall(SYS_io_submit, e->ctx, (long)(batch.size() - done), ptrs.data() + done);
        if (r < 0 && errno == EINTR) continue;
        if (r < 0 && errno == EAGAIN) {  // kernel ring full: retry these after a completion
            for (size_t i = done; i < batch.size(); ++i) e->retry.push_back(batch[i]);
            return;
        }
        if (r < 0) {  // this piece is refused (EBADF, EINVAL, ...): fail it, go on
            piece_failed(e->slots[batch[done]], errno);
            release(e, batch[done], out);
            ++done;
            continue;
        }
        e->inflight += static_cast<int>(r);
        done += static_cast<size_t>(r);
    }
}

void reap(Engine* e, std::vector<Done>& out) {
    io_event events[256];
    timespec zero = {0, 0};
    for (;;) {
        long n = syscall(SYS_io_getevents, e->ctx, 0, 256, events, &zero);
        if (n <= 0) return;
        e->inflight -= static_cast<int>(n);
        for (long i = 0; i < n; ++i) {
            int s = static_cast<int>(events[i].data);
            Piece& p = e->slots[s];
            int64_t res = events[i].res;
            if (res > 0 && p.done + res < p.len) {  // short transfer: resubmit the rest
                p.done += res;
                e->retry.push_back(s);
                continue;
            }
            if (res < 0) piece_failed(p, static_cast<int>(-res));
            else if (p.done + res < p.len) piece_failed(p, -1);  // nothing more (end of file)
            release(e, s, out);
        }
    }
}

bool idle(Engine* e) {
    std::lock_guard<std::mutex> g(e->m);
    return e->stop && e->pending.empty() && e->retry.empty() && e->inflight == 0;
}

void run(Engine* e) {
    std::vector<Done> out;
    for (;;) {
        submit_some(e, out);
        finish(e, out);
        if (idle(e)) return;
        pollfd fds[2] = {{e->done_fd, POLLIN, 0}, {e->wake_fd, POLLIN, 0}};
        if (poll(fds, 2, 100) < 0 && errno != EINTR) std::this_thread::yield();
        uint64_t v;
        if (fds[1].revents & POLLIN) (void)!read(e->wake_fd, &v, sizeof v);
        if (fds[0].revents & POLLIN) (void)!read(e->done_fd, &v, sizeof v);
        reap(e, out);
    }
}

}  // namespace

// 3: requests are split into pieces by the engine, one completion per request.
// 4: memopt_copy_crc32c / memopt_copy_crc32c_hw (copy_crc.cpp).
MEMOPT_API int memopt_aio_abi_version() { return 4; }

// An engine keeping up to `depth` pieces in flight; NULL with *err = errno on failure.
MEMOPT_API void* memopt_aio_create(int depth, int* err) {
    Engine* e = new (std::nothrow) Engine();
    if (e == nullptr || depth < 1) {
        *err = e == nullptr ? ENOMEM : EINVAL;
        delete e;
        return nullptr;
    }
    e->depth = depth;
    e->slots.resize(static_cast<size_t>(depth));
    for (int s = depth - 1; s >= 0; --s) e->free_slots.push_back(s);
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

// Queue n requests (op 0 = read, 1 = write), each cut into pieces of at most `block` bytes;
// returns at once.
MEMOPT_API void memopt_aio_enqueue(void* handle, int n, const int* ops, const int* fds,
                                   const uint64_t* bufs, const int64_t* nbytes,
                                   const int64_t* offsets, const uint64_t* tags, int64_t block) {
    Engine* e = static_cast<Engine*>(handle);
    if (block < 1) block = 1 << 20;
    {
        std::lock_guard<std::mutex> g(e->m);
        for (int i = 0; i < n; ++i) {
            Request* r = new Request();
            r->op = ops[i];
            r->fd = fds[i];
            r->buf = bufs[i];
            r->tag = tags[i];
            r->nbytes = nbytes[i];
            r->offset = offsets[i];
            r->block = block;
            e->pending.push_back(r);
        }
    }
    uint64_t one = 1;
    (void)!write(e->wake_fd, &one, sizeof one);
}

// Collect up to max_nr finished requests, waiting at most timeout_ns for the first one.
// Per request: tags[i], status[i] (0 done, errno, or -1 short transfer) and, on failure,
// the failed piece's file offset and length. Returns the number collected.
MEMOPT_API int memopt_aio_poll(void* handle, int max_nr, int64_t timeout_ns, uint64_t* tags,
                               int64_t* status, int64_t* offsets, int64_t* lengths) {
    Engine* e = static_cast<Engine*>(handle);
    std::unique_lock<std::mutex> lk(e->m);
    e->cv_done.wait_for(lk, std::chrono::nanoseconds(timeout_ns),
                        [e] { return !e->finished.empty(); });
    int n = 0;
    while (n < max_nr && !e->finished.empty()) {
        const Done& d = e->finished.front();
        tags[n] = d.tag;
        status[n] = d.status;
        offsets[n] = d.offset;
        lengths[n] = d.nbytes;
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
