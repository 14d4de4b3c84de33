/* Every FRACGPU_* environment setting, one row each (in the manner of
 * mimalloc's options.c): the one place in C that names them.
 *
 * FRACGPU_SETTINGS(X) calls X(id, name, default, reader, meaning) once per
 * setting. The strings are the same as the Python table's and the README's
 * (a test compares them through _native.settings()): `default` says in words
 * what applies when the variable is unset, `reader` who reads it (shim: the
 * driver shim, nvml-shim: the NVML shim, sim: the simulated GPU, python: the
 * package).
 *
 * Header-only and plain C, so every native part may include it: both shims,
 * the simulated GPU (which shares no code with them) and the Python module.
 * Each reader parses its own values (the shims through fracgpu/job_settings.h);
 * this table says which variables exist and reads their raw text. */
#ifndef FRACGPU_SETTINGS_H
#define FRACGPU_SETTINGS_H

#include <stdlib.h>

#define FRACGPU_SETTINGS(X)                                                                                       \
    X(PARTITION, "FRACGPU_PARTITION", "(unset)", "shim, nvml-shim, python",                                        \
      "The partition the process belongs to. Unset: the shim enforces nothing.")                                  \
    X(MEMORY, "FRACGPU_MEMORY", "(unset)", "shim, nvml-shim, python",                                              \
      "Make partition NAME for this job (private, removed with its last process) with this limit; a percentage "  \
      "is of each GPU. Unset: NAME must exist.")                                                                   \
    X(COMPUTE, "FRACGPU_COMPUTE", "(unset)", "shim, python",                                                       \
      "Make partition NAME for this job with this share of the GPU's time (`25%` or `0.25`).")                     \
    X(COMPUTE_CAP, "FRACGPU_COMPUTE_CAP", "0", "shim, python",                                                     \
      "`1`: the `FRACGPU_COMPUTE` share is also a ceiling.")                                                       \
    X(PRIORITY, "FRACGPU_PRIORITY", "normal", "shim, python",                                                    \
      "Make partition NAME for this job in this priority class: `high` (served first; its share, if any, holds " \
      "it back only while others are busy), `normal`, or `low` (only what the others leave).")                   \
    X(OVERCOMMIT, "FRACGPU_OVERCOMMIT", "0", "shim, python",                                                       \
      "`1`: a `FRACGPU_MEMORY` limit or `FRACGPU_COMPUTE` share that does not fit beside what the GPU has "        \
      "promised is accepted, and is best effort in the job's partition.")                                        \
    X(OOM_WAIT, "FRACGPU_OOM_WAIT", "0", "shim, python",                                                           \
      "An allocation over the quota waits up to this many seconds for memory to free before it fails.")            \
    X(CONTEXT_MEMORY, "FRACGPU_CONTEXT_MEMORY", "(measured)", "shim, python",                                      \
      "What each CUDA context is charged for its own reservation, instead of what the shim measures (what the "    \
      "device reports the process holds, before and after its first context on it).")                               \
    X(RECONCILE_INTERVAL, "FRACGPU_RECONCILE_INTERVAL", "1", "shim, python",                                     \
      "Every this many seconds a process with a context checks its books against what the device reports it "     \
      "holds (NVML), and charges its partition what the books missed; `0` turns this off.")                       \
    X(STATE_DIR, "FRACGPU_STATE_DIR", "$XDG_RUNTIME_DIR/fracgpu, else /tmp/fracgpu-$UID", "shim, nvml-shim, python", \
      "The state folder: one file per GPU, holding its partitions and processes; it must be yours and not "       \
      "writable by others.")                                                                                       \
    X(STATE_GROUP, "FRACGPU_STATE_GROUP", "(unset)", "shim, nvml-shim, python",                                    \
      "On a shared host: the state folder and files belong to this group (folder `2770`, files `0660`) so its "   \
      "members' jobs share one GPU's state; only the folder's owner may create, change or remove partitions.")    \
    X(JOB_HOLDER, "FRACGPU_JOB_HOLDER", "(unset)", "shim, python",                                                 \
      "Set by `fracgpu run` and `fracgpu.init()`: the process recording the job, which keeps the slots of its "   \
      "ended processes until it has read them.")                                                                   \
    X(REAL_LIBCUDA, "FRACGPU_REAL_LIBCUDA", "(searched)", "shim",                                                  \
      "The real driver the shim forwards to (found on `LD_LIBRARY_PATH`, in the loader cache or the usual "       \
      "driver folders when unset).")                                                                               \
    X(REAL_LIBNVML, "FRACGPU_REAL_LIBNVML", "(searched)", "shim, nvml-shim",                                       \
      "The real NVML the NVML shim (`libfracgpu-nvml.so`, preloaded beside the driver shim) forwards to; it "     \
      "shows the quota in `nvmlDeviceGetMemoryInfo`/`_v2` as the driver shim does. The driver shim asks it what "  \
      "each process holds on the device.")                                                                          \
    X(LEDGER, "FRACGPU_LEDGER", "$XDG_STATE_HOME/fracgpu/ledger.sqlite", "python",                                 \
      "The ledger jobs are recorded in (see [Accounting](#accounting)).")                                          \
    X(LOG_FORMAT, "FRACGPU_LOG_FORMAT", "text", "shim, python",                                                    \
      "How the shim's one-line messages and the services (`fracgpu exporter`, `fracgpu slurm-prolog`) write "      \
      "to stderr: `text`, or `json`, one object a line with `time`, `level`, `component`, `gpu`, "                 \
      "`partition`, `job`, `pid`, `event`, `message` and `figures`.")                                              \
    X(CONFIG, "FRACGPU_CONFIG", "(unset)", "shim, nvml-shim, python",                                              \
      "The node's configuration file, read when `/etc/fracgpu/fracgpu.conf` does not exist (see [One set of "     \
      "books per node](#one-set-of-books-per-node)); what it says wins over these variables.")                    \
    X(SIM_DIR, "FRACGPU_SIM_DIR", "$XDG_RUNTIME_DIR/fracgpu-sim, else /tmp/fracgpu-sim-$UID", "sim, python",       \
      "The simulated GPU's shared file's folder; two folders are two independent simulated GPUs.")                 \
    X(SIM_MEMORY, "FRACGPU_SIM_MEMORY", "16GiB", "sim, python", "Memory of each simulated device, in bytes.")      \
    X(SIM_SMS, "FRACGPU_SIM_SMS", "132", "sim, python", "Streaming multiprocessors of each simulated device.")      \
    X(SIM_DEVICES, "FRACGPU_SIM_DEVICES", "1", "sim, python", "Number of simulated devices.")                      \
    X(SIM_NAME, "FRACGPU_SIM_NAME", "fracgpu simulated GPU", "sim, python", "The simulated devices' name.")        \
    X(SIM_CONTEXT_MEMORY, "FRACGPU_SIM_CONTEXT_MEMORY", "(1/256 of the memory)", "sim, python",                    \
      "What each simulated context reserves on its device, in bytes (a real one takes 300-600 MiB of an "          \
      "80-141 GiB GPU); `0` reserves nothing.")                                                                   \
    X(SIM_CALL_COUNTS, "FRACGPU_SIM_CALL_COUNTS", "0", "sim",                                                      \
      "`1`: each process using the simulated driver prints, at exit, the driver calls it made by kind "           \
      "(launches, event records and queries, synchronisations) on stderr.")

#ifdef __cplusplus
extern "C" {
#endif

typedef enum {
#define FRACGPU_SETTING_ENUM(id, name, default_text, reader, meaning) FRACGPU_SETTING_##id,
    FRACGPU_SETTINGS(FRACGPU_SETTING_ENUM)
#undef FRACGPU_SETTING_ENUM
    FRACGPU_SETTING_COUNT
} fracgpu_setting_id;

typedef struct {
    const char *name;          /* "FRACGPU_MEMORY" */
    const char *default_text;  /* what applies when it is unset, in words */
    const char *reader;        /* who reads it: "shim, nvml-shim, python" */
    const char *meaning;       /* one sentence or two, as the README says it */
} fracgpu_setting_info;

/* The row of setting `id` (id in [0, FRACGPU_SETTING_COUNT)). */
static inline const fracgpu_setting_info *fracgpu_setting_row(fracgpu_setting_id id) {
    static const fracgpu_setting_info rows[FRACGPU_SETTING_COUNT] = {
#define FRACGPU_SETTING_ROW(id, name, default_text, reader, meaning) {name, default_text, reader, meaning},
        FRACGPU_SETTINGS(FRACGPU_SETTING_ROW)
#undef FRACGPU_SETTING_ROW
    };
    return &rows[id];
}

/* "FRACGPU_MEMORY", for messages. */
static inline const char *fracgpu_setting_name(fracgpu_setting_id id) { return fracgpu_setting_row(id)->name; }

/* The value of setting `id` in this process's environment, or NULL when it is
 * unset or empty (an empty value means the default, for every setting). */
static inline const char *fracgpu_setting(fracgpu_setting_id id) {
    const char *v = getenv(fracgpu_setting_name(id));
    return v && *v ? v : NULL;
}

#ifdef __cplusplus
}
#endif

#endif
