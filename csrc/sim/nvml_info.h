/* The one extra export of the simulated libcuda.so.1: what the simulated NVML
 * (csrc/sim/nvml) reports about the simulated GPU. Plain C, so the simulated
 * NVML needs nothing of the simulator but this. */
#ifndef FRACGPU_SIM_NVML_INFO_H
#define FRACGPU_SIM_NVML_INFO_H

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The PCI bus of simulated device `index` (physical): FRACGPU_SIM_PCI_BUS_BASE + index, domain 0,
 * device 0, as both cuDeviceGetPCIBusId and NVML's nvmlDeviceGetPciInfo report it. */
#define FRACGPU_SIM_PCI_BUS_BASE 0x18

/* Device `index` of the simulated GPU, by physical index: NVML, like the real
 * one, ignores CUDA_VISIBLE_DEVICES. Writes (each pointer may be NULL) its UUID
 * as "GPU-xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx" (lowercase, the text the CUDA
 * shim makes of cuDeviceGetUuid_v2), its name, its memory, and the bytes all
 * processes hold on it now (dead ones reaped).
 *
 * Returns the number of simulated devices (> 0), with nothing written when
 * index is outside [0, count) (index -1 asks for the count only); -1 when the
 * simulated GPU cannot be used (the reason printed once on stderr). Works
 * whether or not this process called cuInit, and never initialises CUDA in it. */
int fracgpu_sim_device_info(int index, char *uuid, size_t uuid_len, char *name, size_t name_len,
                            unsigned long long *total, unsigned long long *used);
typedef int (*fracgpu_sim_device_info_fn)(int, char *, size_t, char *, size_t, unsigned long long *,
                                          unsigned long long *);

/* The processes that hold memory on device `index` of the simulated GPU (by
 * physical index), from the device's own accounting: each process's pid (in
 * the caller's pid namespace) and the bytes it holds there now, contexts
 * included, dead processes reaped; one entry per process. Writes at most `cap`
 * entries (pids and used may be NULL when cap is 0) and returns how many there
 * are (which may be more than cap); -1 when the simulated GPU cannot be used
 * or index is not a device. Never initialises CUDA in the caller. */
int fracgpu_sim_device_processes(int index, unsigned *pids, unsigned long long *used, unsigned cap);
typedef int (*fracgpu_sim_device_processes_fn)(int, unsigned *, unsigned long long *, unsigned);

#ifdef __cplusplus
}
#endif

#endif
