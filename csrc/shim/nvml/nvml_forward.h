/* What the generated NVML forwarders (nvml_forwarders.c) call: every NVML
 * function the shim does not hook goes straight to the real NVML's. */
#ifndef FRACGPU_NVML_FORWARD_H
#define FRACGPU_NVML_FORWARD_H

#ifndef NVML_NO_UNVERSIONED_FUNC_DEFS
#define NVML_NO_UNVERSIONED_FUNC_DEFS
#endif
#include <nvml.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The real NVML's function number idx (loading the library on first use), or
 * NULL when the library is not found or lacks it. */
void *fg_nvml_resolve(unsigned idx);
/* What a forwarder returns when fg_nvml_resolve gave NULL:
 * NVML_ERROR_LIBRARY_NOT_FOUND or NVML_ERROR_FUNCTION_NOT_FOUND. */
nvmlReturn_t fg_nvml_missing(unsigned idx);
/* The same, for the functions returning text (nvmlErrorString). */
const char *fg_nvml_missing_text(unsigned idx);

extern const char *const fg_nvml_names[];
extern const unsigned fg_nvml_count;

#ifdef __cplusplus
}
#endif

#endif
