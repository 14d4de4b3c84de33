/* An extra export of the simulated libcuda.so.1: how many driver calls of each
 * kind this process made, so a benchmark or a test can say what a launch path
 * costs in calls (events recorded, queries, synchronisations) and not only in
 * time. Plain C, read with dlsym. */
#ifndef FRACGPU_SIM_CALL_COUNTS_H
#define FRACGPU_SIM_CALL_COUNTS_H

#ifdef __cplusplus
extern "C" {
#endif

/* The calls this process made since it loaded the simulated driver, by kind
 * (every call counts, whether or not it succeeded; all threads together, the
 * shim's own included). Writes at most `cap` counts and their names (each
 * pointer may be NULL; a name is a static string such as "event_record") and
 * returns how many kinds there are. The kinds, in order: launch (every
 * cuLaunchKernel*, cuLaunchCooperativeKernel*), graph_launch, event_record
 * (cuEventRecord, cuEventRecordWithFlags), event_query, event_synchronize,
 * event_elapsed_time, stream_synchronize, stream_query, stream_wait_event,
 * ctx_synchronize. */
int fracgpu_sim_call_counts(unsigned long long *counts, const char **names, int cap);
typedef int (*fracgpu_sim_call_counts_fn)(unsigned long long *, const char **, int);

#ifdef __cplusplus
}
#endif

#endif
