// Copies (the cuMemcpy family) and sets (the cuMemset family) on the
// simulated GPU: each one resolves its endpoints through the allocation table
// (memory.cpp) under g_mu and runs in stream order on the engine (engine.cpp),
// as a real copy engine would; the synchronous ones wait for it.
#include "sim.h"

#include <algorithm>
#include <cstring>
#include <functional>

using namespace sim;

namespace {

// Resolve a copy endpoint: device/managed/pinned memory through the allocation
// table, anything else is taken as ordinary host memory (unified addressing).
void *resolve(uint64_t addr, uint64_t len, bool must_be_device) {
    void *p = translate(addr, len);
    if (p) return p;
    if (must_be_device) return nullptr;
    return reinterpret_cast<void *>(addr);
}

// Every copy and set: in the current context, `prepare` (called under g_mu)
// checks and resolves its memory into the host action it sets (none: nothing
// to do), which then runs in stream order on stream h; a synchronous one
// (wait) waits for it and returns the context's sticky error.
template <typename Prepare>
CUresult in_stream_order(CUstream h, bool per_thread, bool wait, Prepare prepare) {
    std::unique_lock<std::mutex> lk(g_mu);
    Context *c;
    CUresult rc = get_context(&c);
    if (rc != CUDA_SUCCESS) return rc;
    std::function<void()> action;
    rc = prepare(&action);
    if (rc != CUDA_SUCCESS || !action) return rc;
    Stream *st;
    rc = resolve_stream(h, per_thread, &st);
    if (rc == CUDA_SUCCESS) rc = wait ? capture_refuse(st) : capture_check(st);
    if (rc != CUDA_SUCCESS) return rc;
    engine_run_ordered(lk, st, std::move(action), wait);
    return wait ? c->sticky : CUDA_SUCCESS;
}

CUresult copy(uint64_t dst, uint64_t src, size_t n, bool dst_dev, bool src_dev, CUstream h, bool per_thread,
              bool wait) {
    return in_stream_order(h, per_thread, wait, [&](std::function<void()> *action) {
        if (n == 0) return CUDA_SUCCESS;
        void *d = resolve(dst, n, dst_dev), *s = resolve(src, n, src_dev);
        if (!d || !s) return CUDA_ERROR_INVALID_VALUE;
        *action = [d, s, n] { memmove(d, s, n); };
        return CUDA_SUCCESS;
    });
}

template <typename T>
CUresult memset_n(uint64_t dst, T value, size_t n, size_t pitch, size_t height, CUstream h, bool per_thread,
                  bool wait) {
    return in_stream_order(h, per_thread, wait, [&](std::function<void()> *action) {
        if (n == 0 || height == 0) return CUDA_SUCCESS;
        if (pitch == 0) pitch = n * sizeof(T);
        size_t span = pitch * (height - 1) + n * sizeof(T);
        char *p = static_cast<char *>(translate(dst, span));
        if (!p) return CUDA_ERROR_INVALID_VALUE;
        *action = [p, value, n, pitch, height] {
            for (size_t row = 0; row < height; row++) {
                T *q = reinterpret_cast<T *>(p + row * pitch);
                if (sizeof(T) == 1) memset(q, (int)value, n);
                else std::fill(q, q + n, value);
            }
        };
        return CUDA_SUCCESS;
    });
}

// 2D/3D copies: each endpoint is host, device, array or unified memory.
struct Endpoint {
    CUmemorytype type;
    const void *host;
    CUdeviceptr dev;
    CUarray array;
    size_t x, y, z, pitch, height;
};

char *endpoint_base(const Endpoint &e, size_t span) {
    uint64_t off = e.x + e.y * e.pitch + e.z * e.pitch * e.height;
    switch (e.type) {
    case CU_MEMORYTYPE_HOST: return static_cast<char *>(const_cast<void *>(e.host)) + off;
    case CU_MEMORYTYPE_DEVICE: return static_cast<char *>(translate(e.dev + off, span));
    case CU_MEMORYTYPE_UNIFIED: return static_cast<char *>(resolve(e.dev + off, span, false));
    case CU_MEMORYTYPE_ARRAY: {
        Alloc *a = as_array(e.array);
        if (!a || off + span > a->size) return nullptr;
        return static_cast<char *>(a->host) + off;
    }
    }
    return nullptr;
}

CUresult copy3d(Endpoint s, Endpoint d, size_t width, size_t height, size_t depth, CUstream h, bool per_thread,
                bool wait) {
    return in_stream_order(h, per_thread, wait, [&](std::function<void()> *action) {
        if (width == 0 || height == 0 || depth == 0) return CUDA_SUCCESS;
        if (s.pitch == 0) s.pitch = width;
        if (d.pitch == 0) d.pitch = width;
        if (s.pitch < width || d.pitch < width) return CUDA_ERROR_INVALID_VALUE;
        if (s.height == 0) s.height = height;
        if (d.height == 0) d.height = height;
        size_t sspan = s.pitch * s.height * (depth - 1) + s.pitch * (height - 1) + width;
        size_t dspan = d.pitch * d.height * (depth - 1) + d.pitch * (height - 1) + width;
        char *sp = endpoint_base(s, sspan), *dp = endpoint_base(d, dspan);
        if (!sp || !dp) return CUDA_ERROR_INVALID_VALUE;
        *action = [=] {
            for (size_t z = 0; z < depth; z++)
                for (size_t y = 0; y < height; y++)
                    memmove(dp + z * d.pitch * d.height + y * d.pitch, sp + z * s.pitch * s.height + y * s.pitch,
                            width);
        };
        return CUDA_SUCCESS;
    });
}

CUresult copy2d(const CUDA_MEMCPY2D *p, CUstream h, bool per_thread, bool wait) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    Endpoint s{p->srcMemoryType, p->srcHost, p->srcDevice, p->srcArray, p->srcXInBytes, p->srcY, 0, p->srcPitch, 0};
    Endpoint d{p->dstMemoryType, p->dstHost, p->dstDevice, p->dstArray, p->dstXInBytes, p->dstY, 0, p->dstPitch, 0};
    return copy3d(s, d, p->WidthInBytes, p->Height, 1, h, per_thread, wait);
}

CUresult copy3d_desc(const CUDA_MEMCPY3D *p, CUstream h, bool per_thread, bool wait) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    Endpoint s{p->srcMemoryType, p->srcHost, p->srcDevice, p->srcArray, p->srcXInBytes, p->srcY, p->srcZ,
               p->srcPitch, p->srcHeight};
    Endpoint d{p->dstMemoryType, p->dstHost, p->dstDevice, p->dstArray, p->dstXInBytes, p->dstY, p->dstZ,
               p->dstPitch, p->dstHeight};
    return copy3d(s, d, p->WidthInBytes, p->Height, p->Depth, h, per_thread, wait);
}

}  // namespace

// --- copies and sets -------------------------------------------------------------

#define HOST(p) reinterpret_cast<uint64_t>(p)

SIM_API CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void *src, size_t n) {
    return copy(dst, HOST(src), n, true, false, nullptr, false, true);
}
SIM_API CUresult cuMemcpyHtoD_v2_ptds(CUdeviceptr dst, const void *src, size_t n) {
    return copy(dst, HOST(src), n, true, false, nullptr, true, true);
}
SIM_API CUresult cuMemcpyHtoD(CUdeviceptr_v1 dst, const void *src, unsigned int n) {
    return copy(dst, HOST(src), n, true, false, nullptr, false, true);
}
SIM_API CUresult cuMemcpyDtoH_v2(void *dst, CUdeviceptr src, size_t n) {
    return copy(HOST(dst), src, n, false, true, nullptr, false, true);
}
SIM_API CUresult cuMemcpyDtoH_v2_ptds(void *dst, CUdeviceptr src, size_t n) {
    return copy(HOST(dst), src, n, false, true, nullptr, true, true);
}
SIM_API CUresult cuMemcpyDtoH(void *dst, CUdeviceptr_v1 src, unsigned int n) {
    return copy(HOST(dst), src, n, false, true, nullptr, false, true);
}
SIM_API CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy(dst, src, n, true, true, nullptr, false, true);
}
SIM_API CUresult cuMemcpyDtoD_v2_ptds(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy(dst, src, n, true, true, nullptr, true, true);
}
SIM_API CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy(dst, src, n, false, false, nullptr, false, true);
}
SIM_API CUresult cuMemcpy_ptds(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy(dst, src, n, false, false, nullptr, true, true);
}
SIM_API CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
    return copy(dst, HOST(src), n, true, false, s, false, false);
}
SIM_API CUresult cuMemcpyHtoDAsync_v2_ptsz(CUdeviceptr dst, const void *src, size_t n, CUstream s) {
    return copy(dst, HOST(src), n, true, false, s, true, false);
}
SIM_API CUresult cuMemcpyDtoHAsync_v2(void *dst, CUdeviceptr src, size_t n, CUstream s) {
    return copy(HOST(dst), src, n, false, true, s, false, false);
}
SIM_API CUresult cuMemcpyDtoHAsync_v2_ptsz(void *dst, CUdeviceptr src, size_t n, CUstream s) {
    return copy(HOST(dst), src, n, false, true, s, true, false);
}
SIM_API CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return copy(dst, src, n, true, true, s, false, false);
}
SIM_API CUresult cuMemcpyDtoDAsync_v2_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return copy(dst, src, n, true, true, s, true, false);
}
SIM_API CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return copy(dst, src, n, false, false, s, false, false);
}
SIM_API CUresult cuMemcpyAsync_ptsz(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream s) {
    return copy(dst, src, n, false, false, s, true, false);
}
SIM_API CUresult cuMemcpyPeer(CUdeviceptr dst, CUcontext dc, CUdeviceptr src, CUcontext sc, size_t n) {
    return copy(dst, src, n, true, true, nullptr, false, true);
}
SIM_API CUresult cuMemcpyPeerAsync(CUdeviceptr dst, CUcontext dc, CUdeviceptr src, CUcontext sc, size_t n,
                                   CUstream s) {
    return copy(dst, src, n, true, true, s, false, false);
}
SIM_API CUresult cuMemcpy2D_v2(const CUDA_MEMCPY2D *p) { return copy2d(p, nullptr, false, true); }
SIM_API CUresult cuMemcpy2D_v2_ptds(const CUDA_MEMCPY2D *p) { return copy2d(p, nullptr, true, true); }
SIM_API CUresult cuMemcpy2DUnaligned_v2(const CUDA_MEMCPY2D *p) { return copy2d(p, nullptr, false, true); }
SIM_API CUresult cuMemcpy2DUnaligned_v2_ptds(const CUDA_MEMCPY2D *p) { return copy2d(p, nullptr, true, true); }
SIM_API CUresult cuMemcpy2DAsync_v2(const CUDA_MEMCPY2D *p, CUstream s) { return copy2d(p, s, false, false); }
SIM_API CUresult cuMemcpy2DAsync_v2_ptsz(const CUDA_MEMCPY2D *p, CUstream s) { return copy2d(p, s, true, false); }
SIM_API CUresult cuMemcpy3D_v2(const CUDA_MEMCPY3D *p) { return copy3d_desc(p, nullptr, false, true); }
SIM_API CUresult cuMemcpy3D_v2_ptds(const CUDA_MEMCPY3D *p) { return copy3d_desc(p, nullptr, true, true); }
SIM_API CUresult cuMemcpy3DAsync_v2(const CUDA_MEMCPY3D *p, CUstream s) { return copy3d_desc(p, s, false, false); }
SIM_API CUresult cuMemcpy3DAsync_v2_ptsz(const CUDA_MEMCPY3D *p, CUstream s) {
    return copy3d_desc(p, s, true, false);
}

static CUresult array_copy(CUarray arr, size_t off, uint64_t other, size_t n, bool to_array, bool other_dev,
                           CUstream s, bool wait) {
    uint64_t abase;
    {
        std::lock_guard<std::mutex> lk(g_mu);
        Alloc *a = as_array(arr);
        if (!a || off + n > a->size) return CUDA_ERROR_INVALID_VALUE;
        abase = reinterpret_cast<uint64_t>(a->host) + off;
    }
    // The array's backing is host memory: copy as unified memory.
    return to_array ? copy(abase, other, n, false, other_dev, s, false, wait)
                    : copy(other, abase, n, other_dev, false, s, false, wait);
}

SIM_API CUresult cuMemcpyHtoA_v2(CUarray dst, size_t off, const void *src, size_t n) {
    return array_copy(dst, off, HOST(src), n, true, false, nullptr, true);
}
SIM_API CUresult cuMemcpyAtoH_v2(void *dst, CUarray src, size_t off, size_t n) {
    return array_copy(src, off, HOST(dst), n, false, false, nullptr, true);
}
SIM_API CUresult cuMemcpyDtoA_v2(CUarray dst, size_t off, CUdeviceptr src, size_t n) {
    return array_copy(dst, off, src, n, true, true, nullptr, true);
}
SIM_API CUresult cuMemcpyAtoD_v2(CUdeviceptr dst, CUarray src, size_t off, size_t n) {
    return array_copy(src, off, dst, n, false, true, nullptr, true);
}
SIM_API CUresult cuMemcpyHtoAAsync_v2(CUarray dst, size_t off, const void *src, size_t n, CUstream s) {
    return array_copy(dst, off, HOST(src), n, true, false, s, false);
}
SIM_API CUresult cuMemcpyAtoHAsync_v2(void *dst, CUarray src, size_t off, size_t n, CUstream s) {
    return array_copy(src, off, HOST(dst), n, false, false, s, false);
}

// The cuMemset entry points: four families (1D or 2D, synchronous or on a
// stream), each in three widths (8, 16, 32 bits) and two stream APIs (legacy
// and per-thread), all one memset_n.
#define MEMSET_WIDTHS(FAMILY, ...)                                                                      \
    FAMILY(8, unsigned char, __VA_ARGS__) FAMILY(16, unsigned short, __VA_ARGS__) FAMILY(32, unsigned int, __VA_ARGS__)
#define MEMSET_1D(BITS, T, SUFFIX, PT)                                                                  \
    SIM_API CUresult cuMemsetD##BITS##SUFFIX(CUdeviceptr d, T v, size_t n) {                            \
        return memset_n<T>(d, v, n, 0, 1, nullptr, PT, true);                                           \
    }
#define MEMSET_1D_ASYNC(BITS, T, SUFFIX, PT)                                                            \
    SIM_API CUresult cuMemsetD##BITS##Async##SUFFIX(CUdeviceptr d, T v, size_t n, CUstream s) {         \
        return memset_n<T>(d, v, n, 0, 1, s, PT, false);                                                \
    }
#define MEMSET_2D(BITS, T, SUFFIX, PT)                                                                  \
    SIM_API CUresult cuMemsetD2D##BITS##SUFFIX(CUdeviceptr d, size_t pitch, T v, size_t w, size_t h) {  \
        return memset_n<T>(d, v, w, pitch, h, nullptr, PT, true);                                       \
    }
#define MEMSET_2D_ASYNC(BITS, T, SUFFIX, PT)                                                            \
    SIM_API CUresult cuMemsetD2D##BITS##Async##SUFFIX(CUdeviceptr d, size_t pitch, T v, size_t w, size_t h, \
                                                      CUstream s) {                                     \
        return memset_n<T>(d, v, w, pitch, h, s, PT, false);                                            \
    }
MEMSET_WIDTHS(MEMSET_1D, _v2, false)
MEMSET_WIDTHS(MEMSET_1D, _v2_ptds, true)
MEMSET_WIDTHS(MEMSET_1D_ASYNC, , false)
MEMSET_WIDTHS(MEMSET_1D_ASYNC, _ptsz, true)
MEMSET_WIDTHS(MEMSET_2D, _v2, false)
MEMSET_WIDTHS(MEMSET_2D, _v2_ptds, true)
MEMSET_WIDTHS(MEMSET_2D_ASYNC, , false)
MEMSET_WIDTHS(MEMSET_2D_ASYNC, _ptsz, true)
#undef MEMSET_2D_ASYNC
#undef MEMSET_2D
#undef MEMSET_1D_ASYNC
#undef MEMSET_1D
#undef MEMSET_WIDTHS

