// Stream work: one worker thread per process executes every stream's queue in
// order, and places kernels on the simulated GPU's shared device timeline.
//
// Timing is arithmetic, not observed: a kernel starts at the later of (its
// launch, the end of earlier work on its stream, the end of everything already
// placed on the device by any process) and lasts exactly its simulated
// duration; events take the time their stream's work ended. The worker only
// sleeps until those ends, so its wake-up latency never shows in measured
// times. Each stream places one kernel at a time and the next only once the
// previous has ended, so the kernels of several processes interleave on the
// device at kernel granularity, as contexts time-slice a GPU without MPS.
#include "sim.h"

#include <algorithm>
#include <chrono>
#include <thread>

namespace sim {

void worker_main();

namespace {

// Never destroyed: the detached worker waits on them while the process exits
// (destroying a condition variable that has a waiter blocks forever).
std::condition_variable &g_cv_work = *new std::condition_variable;  // the worker: new work
std::condition_variable &g_cv_done = *new std::condition_variable;  // callers: a record completed
std::vector<Stream *> &g_active = *new std::vector<Stream *>;      // streams with work pending
bool g_worker_started = false;
int g_space_waiters = 0;   // threads blocked on a full launch queue

void activate(Stream *s) {
    if (std::find(g_active.begin(), g_active.end(), s) == g_active.end()) g_active.push_back(s);
    if (!g_worker_started) {
        g_worker_started = true;
        std::thread(worker_main).detach();
    }
    g_cv_work.notify_one();
}

bool blocking(const Stream *s) { return !(s->flags & CU_STREAM_NON_BLOCKING); }

// The legacy default stream waits for all blocking streams of its context, and
// they wait for it: expressed as internal records and waits.
void add_implicit_waits(Stream *s) {
    Context *c = s->ctx;
    auto wait_on = [s](Stream *o) {
        if (o == s || engine_stream_idle(o)) return;
        std::shared_ptr<Record> r = engine_mark(o);
        s->q.push_back(Op{Op::Wait, now_ns(), 0, nullptr, r});
    };
    if (s->is_null) {
        for (Stream *o : c->streams)
            if (o->alive && blocking(o)) wait_on(o);
    } else if (blocking(s) && c->null_stream) {
        wait_on(c->null_stream);
    }
}

}  // namespace

void worker_main() {
    std::unique_lock<std::mutex> lk(g_mu);
    for (;;) {
        uint64_t now = now_ns();
        uint64_t wake = UINT64_MAX;
        bool changed = false, waited_for = false;
        for (size_t i = 0; i < g_active.size();) {
            Stream *s = g_active[i];
            for (;;) {
                if (s->inflight) {
                    if (now < s->last_end) {
                        wake = std::min(wake, s->last_end);
                        break;
                    }
                    s->inflight = false;
                    changed = true;
                }
                if (s->q.empty()) break;
                Op &op = s->q.front();
                if (op.kind == Op::Wait && !op.rec->done) break;
                Op cur = std::move(op);
                s->q.pop_front();
                changed = true;
                switch (cur.kind) {
                case Op::Kernel: {
                    uint64_t start = timeline_reserve(g_devices[s->ctx->dev].phys,
                                                      std::max(cur.enqueued, s->last_end), cur.dur);
                    if (cur.action) cur.action();
                    s->last_end = start + cur.dur;
                    s->inflight = true;
                    break;
                }
                case Op::Host:       // copies, sets, stream-ordered frees
                    if (cur.action) cur.action();
                    s->last_end = std::max(s->last_end, cur.enqueued);
                    now = now_ns();
                    break;
                case Op::Callback:   // client code: free to call into the driver
                    lk.unlock();
                    if (cur.action) cur.action();
                    lk.lock();
                    s->last_end = std::max(s->last_end, cur.enqueued);
                    now = now_ns();
                    break;
                case Op::RecordEv:
                    cur.rec->ts = std::max(s->last_end, cur.enqueued);
                    cur.rec->done = true;
                    waited_for = waited_for || cur.rec->waiters > 0;
                    break;
                case Op::Wait:
                    s->last_end = std::max(s->last_end, cur.rec->ts);
                    break;
                }
            }
            if (s->q.empty() && !s->inflight) {
                g_active[i] = g_active.back();
                g_active.pop_back();
                if (!s->alive) delete s;
                continue;
            }
            i++;
        }
        if (changed) {
            // Only threads blocked on what just happened are woken, as a real
            // driver wakes a blocking-sync waiter for its own event, not for
            // every kernel that ends.
            if (waited_for || g_space_waiters > 0) g_cv_done.notify_all();
            continue;   // a completed record may unblock a wait on another stream
        }
        if (wake == UINT64_MAX) {
            g_cv_work.wait(lk);
        } else {
            auto tp = std::chrono::steady_clock::time_point(std::chrono::nanoseconds(wake));
            g_cv_work.wait_until(lk, tp);
        }
    }
}

bool engine_stream_idle(Stream *s) {
    return s->q.empty() && (!s->inflight || now_ns() >= s->last_end);
}

std::shared_ptr<Record> engine_mark(Stream *s) {
    auto r = std::make_shared<Record>();
    if (engine_stream_idle(s)) {
        r->ts = std::max(s->last_end, now_ns());
        r->done = true;
        return r;
    }
    s->q.push_back(Op{Op::RecordEv, now_ns(), 0, nullptr, r});
    activate(s);
    return r;
}

void engine_enqueue(std::unique_lock<std::mutex> &lk, Stream *s, Op op) {
    if (s->capture) {   // recorded into the capture's graph, run at each launch of it
        capture_record(s, std::move(op));
        return;
    }
    // A full launch queue blocks the launching thread, as a full pushbuffer does.
    if (s->q.size() >= kMaxPendingOps) {
        g_space_waiters++;
        while (s->q.size() >= kMaxPendingOps) g_cv_done.wait(lk);
        g_space_waiters--;
    }
    add_implicit_waits(s);
    op.enqueued = now_ns();
    s->q.push_back(std::move(op));
    activate(s);
}

void engine_run_ordered(std::unique_lock<std::mutex> &lk, Stream *s, std::function<void()> action,
                        bool wait) {
    if (s->capture) {   // callers refuse a synchronous call on a capturing stream first
        capture_record(s, Op{Op::Host, 0, 0, std::move(action), nullptr});
        return;
    }
    add_implicit_waits(s);
    if (engine_stream_idle(s)) {
        action();
        return;
    }
    s->q.push_back(Op{Op::Host, now_ns(), 0, std::move(action), nullptr});
    activate(s);
    if (wait) engine_wait(lk, engine_mark(s));
}

void engine_release_stream(Stream *s) {
    s->alive = false;
    if (std::find(g_active.begin(), g_active.end(), s) == g_active.end()) delete s;
    else g_cv_work.notify_one();   // the worker frees it once its work is done
}

void engine_wait(std::unique_lock<std::mutex> &lk, const std::shared_ptr<Record> &r) {
    if (!r->done) {
        r->waiters++;
        while (!r->done) g_cv_done.wait(lk);
        r->waiters--;
    }
    uint64_t now = now_ns();
    if (r->ts > now) {
        lk.unlock();
        std::this_thread::sleep_for(std::chrono::nanoseconds(r->ts - now));
        lk.lock();
    }
}

void engine_sync_context(std::unique_lock<std::mutex> &lk, Context *c) {
    std::vector<std::shared_ptr<Record>> marks;
    if (c->null_stream) marks.push_back(engine_mark(c->null_stream));
    for (Stream *s : c->streams) marks.push_back(engine_mark(s));
    for (auto &r : marks) engine_wait(lk, r);
}

void engine_drop_context(Context *c) {
    auto drop = [](Stream *s) {
        s->q.clear();
        s->inflight = false;
    };
    if (c->null_stream) drop(c->null_stream);
    for (Stream *s : c->streams) drop(s);
    g_cv_done.notify_all();
}

}  // namespace sim
