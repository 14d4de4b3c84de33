// A mutex inside a file that many processes map: process-shared, and robust,
// so that a holder killed while holding it leaves it EOWNERDEAD for the next
// locker instead of locked forever. Header-only: the shared state
// (csrc/state) and the simulated GPU's shared file (csrc/sim/cuda) both use
// it, and the simulated GPU links no fracgpu code.
#pragma once

#include <pthread.h>

namespace fracgpu {

// pthread_mutex_init's result: 0, or an errno value.
inline int init_shared_mutex(pthread_mutex_t *m) {
    pthread_mutexattr_t a;
    pthread_mutexattr_init(&a);
    pthread_mutexattr_setpshared(&a, PTHREAD_PROCESS_SHARED);
    pthread_mutexattr_setrobust(&a, PTHREAD_MUTEX_ROBUST);
    int rc = pthread_mutex_init(m, &a);
    pthread_mutexattr_destroy(&a);
    return rc;
}

}  // namespace fracgpu
