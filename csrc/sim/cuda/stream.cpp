// Streams and events over the engine.
#include "sim.h"

#include <algorithm>
#include <set>
#include <unordered_map>

namespace sim {

namespace {

std::set<Stream *> &g_streams = *new std::set<Stream *>;            // created streams, for handle validation
std::set<Event *> &g_events = *new std::set<Event *>;
unsigned long long g_next_stream_id = 100;

// One per-thread default stream per (thread, context).
thread_local std::unordered_map<Context *, Stream *> t_per_thread;

Stream *per_thread_stream(Context *c) {
    Stream *&s = t_per_thread[c];
    if (!s || !g_streams.count(s)) {
        s = new Stream();
        s->ctx = c;
        s->per_thread = true;
        s->id = g_next_stream_id++;
        c->streams.push_back(s);
        g_streams.insert(s);
    }
    return s;
}

}  // namespace

void stream_forget(Stream *s) { g_streams.erase(s); }

CUresult resolve_stream(CUstream h, bool per_thread_api, Stream **out) {
    Context *c = current_context();
    if (h == nullptr || h == CU_STREAM_LEGACY || h == CU_STREAM_PER_THREAD) {
        if (!c) return CUDA_ERROR_INVALID_CONTEXT;
        bool pt = h == CU_STREAM_PER_THREAD || (h == nullptr && per_thread_api);
        *out = pt ? per_thread_stream(c) : c->null_stream;
        return CUDA_SUCCESS;
    }
    Stream *s = reinterpret_cast<Stream *>(h);
    if (!g_streams.count(s) || !s->alive || !valid_context(s->ctx)) return CUDA_ERROR_INVALID_HANDLE;
    *out = s;
    return CUDA_SUCCESS;
}

}  // namespace sim

using namespace sim;

namespace {

// Stream h (or the legacy or per-thread stream), once the driver is initialised.
CUresult stream_get(CUstream h, bool pt, Stream **s) {
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    return resolve_stream(h, pt, s);
}

CUresult stream_create(CUstream *ph, unsigned flags, int priority) {
    if (!ph || (flags & ~CU_STREAM_NON_BLOCKING)) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    Stream *s = new Stream();
    s->ctx = c;
    s->flags = flags;
    s->priority = std::max(-5, std::min(0, priority));
    s->id = g_next_stream_id++;
    c->streams.push_back(s);
    g_streams.insert(s);
    *ph = reinterpret_cast<CUstream>(s);
    return CUDA_SUCCESS;
}

CUresult stream_sync(CUstream h, bool pt) {
    count_call(Call::StreamSynchronize);
    std::unique_lock<std::mutex> lk(g_mu);
    Stream *s;
    CUresult rc = stream_get(h, pt, &s);
    if (rc == CUDA_SUCCESS) rc = capture_refuse(s);
    if (rc != CUDA_SUCCESS) return rc;
    Context *c = s->ctx;
    std::shared_ptr<Record> r = s->is_null ? nullptr : engine_mark(s);
    if (s->is_null) {
        // The legacy stream also waits for the blocking streams.
        engine_run_ordered(lk, s, [] {}, true);
    } else {
        engine_wait(lk, r);
    }
    pools_release_over_threshold();
    return c->sticky;
}

CUresult stream_query(CUstream h, bool pt) {
    count_call(Call::StreamQuery);
    std::lock_guard<std::mutex> lk(g_mu);
    Stream *s;
    CUresult rc = stream_get(h, pt, &s);
    if (rc != CUDA_SUCCESS) return rc;
    if (s->ctx->sticky) return s->ctx->sticky;
    return engine_stream_idle(s) ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

CUresult stream_wait_event(CUstream h, CUevent e, unsigned flags, bool pt) {
    count_call(Call::StreamWaitEvent);
    std::unique_lock<std::mutex> lk(g_mu);
    Stream *s;
    CUresult rc = stream_get(h, pt, &s);
    if (rc != CUDA_SUCCESS) return rc;
    Event *ev = reinterpret_cast<Event *>(e);
    if (!g_events.count(ev)) return CUDA_ERROR_INVALID_HANDLE;
    rc = capture_refuse(s);   // cross-stream capture is not simulated
    if (rc != CUDA_SUCCESS) return rc;
    if (!ev->rec) return CUDA_SUCCESS;   // never recorded: nothing to wait for
    engine_enqueue(lk, s, Op{Op::Wait, 0, 0, nullptr, ev->rec});
    return CUDA_SUCCESS;
}

CUresult event_record(CUevent e, CUstream h, bool pt) {
    count_call(Call::EventRecord);
    HostCost cost;   // spun out after the lock is released
    std::unique_lock<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    Event *ev = reinterpret_cast<Event *>(e);
    if (!g_events.count(ev)) return CUDA_ERROR_INVALID_HANDLE;
    cost.charge(ev->flags & CU_EVENT_DISABLE_TIMING ? kEventRecordUntimedNs : kEventRecordNs);
    Stream *s;
    rc = resolve_stream(h, pt, &s);
    if (rc != CUDA_SUCCESS) return rc;
    if (s->ctx != ev->ctx) return CUDA_ERROR_INVALID_HANDLE;
    rc = capture_refuse(s);   // event record nodes are not simulated
    if (rc != CUDA_SUCCESS) return rc;
    auto r = std::make_shared<Record>();
    ev->rec = r;
    engine_enqueue(lk, s, Op{Op::RecordEv, 0, 0, nullptr, r});
    return CUDA_SUCCESS;
}

CUresult host_func(CUstream h, std::function<void()> fn, bool pt) {
    std::unique_lock<std::mutex> lk(g_mu);
    Stream *s;
    CUresult rc = stream_get(h, pt, &s);
    if (rc == CUDA_SUCCESS) rc = capture_check(s);
    if (rc != CUDA_SUCCESS) return rc;
    engine_enqueue(lk, s, Op{Op::Callback, 0, 0, std::move(fn), nullptr});
    return CUDA_SUCCESS;
}

}  // namespace

SIM_API CUresult cuStreamCreate(CUstream *ph, unsigned int flags) { return stream_create(ph, flags, 0); }
SIM_API CUresult cuStreamCreateWithPriority(CUstream *ph, unsigned int flags, int priority) {
    return stream_create(ph, flags, priority);
}

SIM_API CUresult cuStreamDestroy_v2(CUstream h) {
    std::lock_guard<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    Stream *s = reinterpret_cast<Stream *>(h);
    if (!g_streams.count(s) || s->per_thread) return CUDA_ERROR_INVALID_HANDLE;
    g_streams.erase(s);
    if (valid_context(s->ctx)) {
        auto &v = s->ctx->streams;
        v.erase(std::remove(v.begin(), v.end(), s), v.end());
    }
    capture_abandon(s);
    engine_release_stream(s);   // queued work still runs, as with a real driver
    return CUDA_SUCCESS;
}
SIM_API CUresult cuStreamDestroy(CUstream h) { return cuStreamDestroy_v2(h); }

SIM_API CUresult cuStreamSynchronize(CUstream h) { return stream_sync(h, false); }
SIM_API CUresult cuStreamSynchronize_ptsz(CUstream h) { return stream_sync(h, true); }
SIM_API CUresult cuStreamQuery(CUstream h) { return stream_query(h, false); }
SIM_API CUresult cuStreamQuery_ptsz(CUstream h) { return stream_query(h, true); }
SIM_API CUresult cuStreamWaitEvent(CUstream h, CUevent e, unsigned int f) { return stream_wait_event(h, e, f, false); }
SIM_API CUresult cuStreamWaitEvent_ptsz(CUstream h, CUevent e, unsigned int f) {
    return stream_wait_event(h, e, f, true);
}

namespace {
// *out = get(stream h), when h is a stream and out is not null.
template <typename T, typename Get>
CUresult stream_attribute(CUstream h, T *out, Get get) {
    std::lock_guard<std::mutex> lk(g_mu);
    Stream *s;
    CUresult rc = stream_get(h, false, &s);
    if (rc == CUDA_SUCCESS && out) *out = get(s);
    return rc;
}
}  // namespace

SIM_API CUresult cuStreamGetFlags(CUstream h, unsigned int *flags) {
    return stream_attribute(h, flags, [](const Stream *s) { return s->flags; });
}
SIM_API CUresult cuStreamGetPriority(CUstream h, int *priority) {
    return stream_attribute(h, priority, [](const Stream *s) { return s->priority; });
}
SIM_API CUresult cuStreamGetId(CUstream h, unsigned long long *id) {
    return stream_attribute(h, id, [](const Stream *s) { return s->is_null ? 0 : s->id; });
}
SIM_API CUresult cuStreamGetCtx(CUstream h, CUcontext *pctx) {
    return stream_attribute(h, pctx, [](const Stream *s) { return reinterpret_cast<CUcontext>(s->ctx); });
}
SIM_API CUresult cuStreamGetDevice(CUstream h, CUdevice *dev) {
    return stream_attribute(h, dev, [](const Stream *s) { return s->ctx->dev; });
}

SIM_API CUresult cuLaunchHostFunc(CUstream h, CUhostFn fn, void *data) {
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
    return host_func(h, [fn, data] { fn(data); }, false);
}
SIM_API CUresult cuLaunchHostFunc_ptsz(CUstream h, CUhostFn fn, void *data) {
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
    return host_func(h, [fn, data] { fn(data); }, true);
}
SIM_API CUresult cuStreamAddCallback(CUstream h, CUstreamCallback cb, void *data, unsigned int flags) {
    if (!cb || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    return host_func(h, [cb, h, data] { cb(h, CUDA_SUCCESS, data); }, false);
}
SIM_API CUresult cuStreamAddCallback_ptsz(CUstream h, CUstreamCallback cb, void *data, unsigned int flags) {
    if (!cb || flags != 0) return CUDA_ERROR_INVALID_VALUE;
    return host_func(h, [cb, h, data] { cb(h, CUDA_SUCCESS, data); }, true);
}

// --- events --------------------------------------------------------------------------

SIM_API CUresult cuEventCreate(CUevent *ph, unsigned int flags) {
    if (!ph) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    Event *e = new Event();
    e->ctx = c;
    e->flags = flags;
    g_events.insert(e);
    *ph = reinterpret_cast<CUevent>(e);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuEventDestroy_v2(CUevent h) {
    std::lock_guard<std::mutex> lk(g_mu);
    Event *e = reinterpret_cast<Event *>(h);
    if (!g_events.erase(e)) return CUDA_ERROR_INVALID_HANDLE;
    delete e;   // queued records hold their own reference
    return CUDA_SUCCESS;
}
SIM_API CUresult cuEventDestroy(CUevent h) { return cuEventDestroy_v2(h); }

SIM_API CUresult cuEventRecord(CUevent e, CUstream s) { return event_record(e, s, false); }
SIM_API CUresult cuEventRecord_ptsz(CUevent e, CUstream s) { return event_record(e, s, true); }
SIM_API CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned int flags) {
    return event_record(e, s, false);
}
SIM_API CUresult cuEventRecordWithFlags_ptsz(CUevent e, CUstream s, unsigned int flags) {
    return event_record(e, s, true);
}

SIM_API CUresult cuEventQuery(CUevent h) {
    count_call(Call::EventQuery);
    HostCost cost;   // spun out after the lock is released
    std::lock_guard<std::mutex> lk(g_mu);
    Event *e = reinterpret_cast<Event *>(h);
    if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    cost.charge(e->flags & CU_EVENT_DISABLE_TIMING ? kEventQueryUntimedNs : kEventQueryNs);
    if (!e->rec) return CUDA_SUCCESS;
    return e->rec->done && e->rec->ts <= now_ns() ? CUDA_SUCCESS : CUDA_ERROR_NOT_READY;
}

SIM_API CUresult cuEventSynchronize(CUevent h) {
    count_call(Call::EventSynchronize);
    std::unique_lock<std::mutex> lk(g_mu);
    Event *e = reinterpret_cast<Event *>(h);
    if (!g_events.count(e)) return CUDA_ERROR_INVALID_HANDLE;
    if (!e->rec) return CUDA_SUCCESS;
    std::shared_ptr<Record> r = e->rec;
    Context *c = e->ctx;
    engine_wait(lk, r);
    pools_release_over_threshold();
    return valid_context(c) ? c->sticky : CUDA_SUCCESS;
}

SIM_API CUresult cuEventElapsedTime_v2(float *ms, CUevent start, CUevent end) {
    count_call(Call::EventElapsedTime);
    if (!ms) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Event *a = reinterpret_cast<Event *>(start), *b = reinterpret_cast<Event *>(end);
    if (!g_events.count(a) || !g_events.count(b)) return CUDA_ERROR_INVALID_HANDLE;
    if ((a->flags | b->flags) & CU_EVENT_DISABLE_TIMING) return CUDA_ERROR_INVALID_HANDLE;
    if (!a->rec || !b->rec) return CUDA_ERROR_INVALID_HANDLE;
    uint64_t now = now_ns();
    if (!a->rec->done || !b->rec->done || a->rec->ts > now || b->rec->ts > now) return CUDA_ERROR_NOT_READY;
    *ms = (float)(((double)b->rec->ts - (double)a->rec->ts) / 1e6);
    return CUDA_SUCCESS;
}
SIM_API CUresult cuEventElapsedTime(float *ms, CUevent start, CUevent end) {
    return cuEventElapsedTime_v2(ms, start, end);
}
