// Arrays (textures and surfaces): cuArrayCreate, cuArray3DCreate and
// mipmapped arrays, charged what their extent and format take, given back at
// destroy or with their context.
#include "quota.h"

namespace {

uint64_t array_bytes(size_t w, size_t h, size_t d, unsigned channels, CUarray_format f) {
    size_t elem;
    switch (f) {
    case CU_AD_FORMAT_UNSIGNED_INT8:
    case CU_AD_FORMAT_SIGNED_INT8: elem = 1; break;
    case CU_AD_FORMAT_UNSIGNED_INT16:
    case CU_AD_FORMAT_SIGNED_INT16:
    case CU_AD_FORMAT_HALF: elem = 2; break;
    default: elem = 4; break;
    }
    return (uint64_t)w * (h ? h : 1) * (d ? d : 1) * (channels ? channels : 1) * elem;
}


}  // namespace

using namespace shim;

SHIM_API CUresult cuArrayCreate_v2(CUarray *h, const CUDA_ARRAY_DESCRIPTOR *d) {
    REAL_OR_RETURN(real, cuArrayCreate_v2);
    if (!h || !d) return real(h, d);
    uint64_t bytes = array_bytes(d->Width, d->Height, 1, d->NumChannels, d->Format);
    return alloc_counted(bytes, current(), [&] { return real(h, d); }, kArray, h);
}

SHIM_API CUresult cuArray3DCreate_v2(CUarray *h, const CUDA_ARRAY3D_DESCRIPTOR *d) {
    REAL_OR_RETURN(real, cuArray3DCreate_v2);
    if (!h || !d) return real(h, d);
    uint64_t bytes = array_bytes(d->Width, d->Height, d->Depth, d->NumChannels, d->Format);
    return alloc_counted(bytes, current(), [&] { return real(h, d); }, kArray, h);
}

SHIM_API CUresult cuArrayDestroy(CUarray h) {
    REAL_OR_RETURN(real, cuArrayDestroy);
    CUresult rc = real(h);
    if (rc == CUDA_SUCCESS) release(kArray, reinterpret_cast<uint64_t>(h));
    return rc;
}

SHIM_API CUresult cuMipmappedArrayCreate(CUmipmappedArray *h, const CUDA_ARRAY3D_DESCRIPTOR *d,
                                         unsigned int levels) {
    REAL_OR_RETURN(real, cuMipmappedArrayCreate);
    if (!h || !d) return real(h, d, levels);
    uint64_t bytes = 0;
    size_t w = d->Width, hh = d->Height, dd = d->Depth;
    for (unsigned l = 0; l < (levels ? levels : 1); l++) {
        bytes += array_bytes(w, hh, dd, d->NumChannels, d->Format);
        w = w > 1 ? w / 2 : 1;
        hh = hh > 1 ? hh / 2 : hh;
        dd = dd > 1 ? dd / 2 : dd;
    }
    return alloc_counted(bytes, current(), [&] { return real(h, d, levels); }, kArray, h);
}

SHIM_API CUresult cuMipmappedArrayDestroy(CUmipmappedArray h) {
    REAL_OR_RETURN(real, cuMipmappedArrayDestroy);
    CUresult rc = real(h);
    if (rc == CUDA_SUCCESS) release(kArray, reinterpret_cast<uint64_t>(h));
    return rc;
}

