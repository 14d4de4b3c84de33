/* What the generated forwarders (cuda_forwarders.c) call: every driver entry
 * point the shim does not hook goes straight to the real driver's. */
#ifndef FRACGPU_SHIM_FORWARD_H
#define FRACGPU_SHIM_FORWARD_H

#include <cuda.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The real driver's entry point number idx (loading the driver on first use),
 * or NULL when the driver is not loaded or lacks it. */
void *fg_forward_resolve(unsigned idx);
/* What a forwarder returns when fg_forward_resolve gave NULL. */
CUresult fg_forward_missing(unsigned idx);

extern const char *const fg_forward_names[];
extern const unsigned fg_forward_count;

#ifdef __cplusplus
}
#endif

#endif
