/* Every FRACGPU_* environment setting, one row each (in the manner of
 * mimalloc's options.c): the one table of them, in C and, through _native, in
 * Python (fracgpu.settings) and the README (tools/settings_table.py).
 *
 * FRACGPU_SETTINGS(X) calls X(id, name, grammar, default, low, high, role,
 * reader, meaning) once per setting:
 * - grammar: how its text is read (fracgpu_grammar; one parser each, in
 *   fracgpu/units.h, applied by fracgpu_setting_parse in every reader);
 * - default: a value (FRACGPU_DEFAULT_NUMBER/_REAL/_TEXT), or, where what
 *   applies when it is unset is a rule and not a value, that rule in words
 *   (FRACGPU_DEFAULT_RULE);
 * - low, high: bounds of a count or a size (a size may be zero only when low
 *   is 0), the longest text in bytes (0: no bound beyond the grammar's);
 * - role: who must not inherit it: "partition" (which partition a process is
 *   in, and what a private one is made with), "job" (set for one job),
 *   "host" (where things are on this machine), "sim" (the simulated GPU);
 * - reader: who reads it (shim: the driver shim, nvml-shim: the NVML shim,
 *   sim: the simulated GPU, python: the package).
 *
 * Adding a setting is adding its row here. The table is header-only and plain
 * C, so every native part may include it: both shims, the simulated GPU and
 * the Python module. */
#ifndef FRACGPU_SETTINGS_H
#define FRACGPU_SETTINGS_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "fracgpu/units.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The simulated GPU's limits, which its shared file is sized by. */
#define FRACGPU_SIM_MAX_DEVICES 16
#define FRACGPU_SIM_MAX_MEMORY (64ull << 40)
/* What each simulated context reserves unless FRACGPU_SIM_CONTEXT_MEMORY says:
 * 1/256 of the device, as a real context takes 300-600 MiB of an 80-141 GiB GPU. */
#define FRACGPU_SIM_CONTEXT_SHARE 256
#define FRACGPU_SETTINGS_WORDS_(x) #x
#define FRACGPU_SETTINGS_WORDS(x) FRACGPU_SETTINGS_WORDS_(x)

#define FRACGPU_DEFAULT_NUMBER(v) 1, {(uint64_t)(v), 0.0, NULL}, NULL
#define FRACGPU_DEFAULT_REAL(v) 1, {0, (v), NULL}, NULL
#define FRACGPU_DEFAULT_TEXT(v) 1, {0, 0.0, (v)}, NULL
#define FRACGPU_DEFAULT_RULE(words) 0, {0, 0.0, NULL}, (words)

#define FRACGPU_SETTINGS(X)                                                                                      \
    X(PARTITION, "FRACGPU_PARTITION", TEXT, FRACGPU_DEFAULT_RULE("none"), 0, 0, "partition",                       \
      "shim, nvml-shim, python", "The partition the process belongs to. Unset: the shim enforces nothing.")        \
    X(MEMORY, "FRACGPU_MEMORY", MEMORY, FRACGPU_DEFAULT_RULE("none"), 0, 0, "partition", "shim, nvml-shim, python", \
      "Make partition NAME for this job (private, removed with its last process) with this limit; a percentage "  \
      "is of each GPU. Unset: NAME must exist.")                                                                   \
    X(COMPUTE, "FRACGPU_COMPUTE", SHARE, FRACGPU_DEFAULT_RULE("none"), 0, 0, "partition", "shim, python",          \
      "Make partition NAME for this job with this share of the GPU's time (`25%` or `0.25`).")                     \
    X(COMPUTE_CAP, "FRACGPU_COMPUTE_CAP", FLAG, FRACGPU_DEFAULT_NUMBER(0), 0, 0, "partition", "shim, python",      \
      "`1`: the `FRACGPU_COMPUTE` share is also a ceiling.")                                                       \
    X(PRIORITY, "FRACGPU_PRIORITY", PRIORITY, FRACGPU_DEFAULT_NUMBER(FRACGPU_PRIORITY_NORMAL), 0, 0, "partition", \
      "shim, python",                                                                                              \
      "Make partition NAME for this job in this priority class: `high` (served first; its share, if any, holds " \
      "it back only while others are busy), `normal`, or `low` (only what the others leave).")                   \
    X(OVERCOMMIT, "FRACGPU_OVERCOMMIT", FLAG, FRACGPU_DEFAULT_NUMBER(0), 0, 0, "partition", "shim, python",        \
      "`1`: a `FRACGPU_MEMORY` limit or `FRACGPU_COMPUTE` share that does not fit beside what the GPU has "        \
      "promised is accepted, and is best effort in the job's partition.")                                        \
    X(OOM_WAIT, "FRACGPU_OOM_WAIT", SECONDS, FRACGPU_DEFAULT_REAL(0.0), 0, 0, "job", "shim, python",               \
      "An allocation over the quota waits up to this many seconds for memory to free before it fails.")            \
    X(CONTEXT_MEMORY, "FRACGPU_CONTEXT_MEMORY", SIZE, FRACGPU_DEFAULT_RULE("measured"), 0, 0, "job", "shim, python", \
      "What each CUDA context is charged for its own reservation, instead of what the shim measures (what the "    \
      "device reports the process holds, before and after its first context on it).")                               \
    X(RECONCILE_INTERVAL, "FRACGPU_RECONCILE_INTERVAL", SECONDS, FRACGPU_DEFAULT_REAL(1.0), 0, 0, "job",          \
      "shim, python",                                                                                              \
      "Every this many seconds a process with a context checks its books against what the device reports it "     \
      "holds (NVML), and charges its partition what the books missed; `0` turns this off.")                       \
    X(STATE_DIR, "FRACGPU_STATE_DIR", TEXT, FRACGPU_DEFAULT_RULE("$XDG_RUNTIME_DIR/fracgpu, else /tmp/fracgpu-$UID"), \
      0, 0, "host", "shim, nvml-shim, python",                                                                     \
      "The state folder: one file per GPU, holding its partitions and processes; it must be yours and not "       \
      "writable by others.")                                                                                       \
    X(STATE_GROUP, "FRACGPU_STATE_GROUP", TEXT, FRACGPU_DEFAULT_RULE("none"), 0, 0, "host", "shim, nvml-shim, python", \
      "On a shared host: the state folder and files belong to this group (folder `2770`, files `0660`) so its "   \
      "members' jobs share one GPU's state; only the folder's owner may create, change or remove partitions.")    \
    X(JOB_HOLDER, "FRACGPU_JOB_HOLDER", COUNT, FRACGPU_DEFAULT_RULE("none"), 1, INT32_MAX, "job", "shim, python",  \
      "Set by `fracgpu run` and `fracgpu.init()`: the process recording the job, which keeps the slots of its "   \
      "ended processes until it has read them.")                                                                   \
    X(REAL_LIBCUDA, "FRACGPU_REAL_LIBCUDA", TEXT, FRACGPU_DEFAULT_RULE("searched"), 0, 0, "host", "shim",           \
      "The real driver the shim forwards to (found on `LD_LIBRARY_PATH`, in the loader cache or the usual "       \
      "driver folders when unset).")                                                                               \
    X(REAL_LIBNVML, "FRACGPU_REAL_LIBNVML", TEXT, FRACGPU_DEFAULT_RULE("searched"), 0, 0, "host", "shim, nvml-shim", \
      "The real NVML the NVML shim (`libfracgpu-nvml.so`, preloaded beside the driver shim) forwards to; it "     \
      "shows the quota in `nvmlDeviceGetMemoryInfo`/`_v2` as the driver shim does. The driver shim asks it what "  \
      "each process holds on the device.")                                                                          \
    X(LEDGER, "FRACGPU_LEDGER", TEXT, FRACGPU_DEFAULT_RULE("$XDG_STATE_HOME/fracgpu/ledger.sqlite"), 0, 0, "host", \
      "python", "The ledger jobs are recorded in (see [Accounting](#accounting)).")                                \
    X(LOG_FORMAT, "FRACGPU_LOG_FORMAT", LOG_FORMAT, FRACGPU_DEFAULT_TEXT("text"), 0, 0, "host", "shim, python",    \
      "How the shim's one-line messages and the services (`fracgpu exporter`, `fracgpu slurm-prolog`) write "      \
      "to stderr: `text`, or `json`, one object a line with `time`, `level`, `component`, `gpu`, "                 \
      "`partition`, `job`, `pid`, `event`, `message` and `figures`.")                                              \
    X(CONFIG, "FRACGPU_CONFIG", TEXT, FRACGPU_DEFAULT_RULE("none"), 0, 0, "host", "shim, nvml-shim, python",        \
      "The node's configuration file, read when `/etc/fracgpu/fracgpu.conf` does not exist (see [One set of "     \
      "books per node](#one-set-of-books-per-node)); what it says wins over these variables.")                    \
    X(SIM_DIR, "FRACGPU_SIM_DIR", TEXT, FRACGPU_DEFAULT_RULE("$XDG_RUNTIME_DIR/fracgpu-sim, else /tmp/fracgpu-sim-$UID"), \
      0, 0, "sim", "sim, python",                                                                                  \
      "The simulated GPU's shared file's folder; two folders are two independent simulated GPUs.")                 \
    X(SIM_MEMORY, "FRACGPU_SIM_MEMORY", SIZE, FRACGPU_DEFAULT_NUMBER(16ull << 30), 1, FRACGPU_SIM_MAX_MEMORY, "sim", \
      "sim, python", "Memory of each simulated device.")                                                           \
    X(SIM_SMS, "FRACGPU_SIM_SMS", COUNT, FRACGPU_DEFAULT_NUMBER(132), 1, 1024, "sim", "sim, python",               \
      "Streaming multiprocessors of each simulated device.")                                                       \
    X(SIM_DEVICES, "FRACGPU_SIM_DEVICES", COUNT, FRACGPU_DEFAULT_NUMBER(1), 1, FRACGPU_SIM_MAX_DEVICES, "sim",     \
      "sim, python", "Number of simulated devices.")                                                               \
    X(SIM_NAME, "FRACGPU_SIM_NAME", TEXT, FRACGPU_DEFAULT_TEXT("fracgpu simulated GPU"), 0, 200, "sim",            \
      "sim, python", "The simulated devices' name.")                                                               \
    X(SIM_CONTEXT_MEMORY, "FRACGPU_SIM_CONTEXT_MEMORY", SIZE, FRACGPU_DEFAULT_RULE("1/" FRACGPU_SETTINGS_WORDS(FRACGPU_SIM_CONTEXT_SHARE) " of the memory"), 0, 0,    \
      "sim", "sim, python",                                                                                        \
      "What each simulated context reserves on its device, less than its memory (a real one takes 300-600 MiB "   \
      "of an 80-141 GiB GPU); `0` reserves nothing.")                                                             \
    X(SIM_CALL_COUNTS, "FRACGPU_SIM_CALL_COUNTS", FLAG, FRACGPU_DEFAULT_NUMBER(0), 0, 0, "sim", "sim",             \
      "`1`: each process using the simulated driver prints, at exit, the driver calls it made by kind "           \
      "(launches, event records and queries, synchronisations) on stderr.")

/* How a setting's text is read. */
typedef enum {
    FRACGPU_GRAMMAR_TEXT,      /* any text (an empty value is unset); at most `high` bytes when high > 0 */
    FRACGPU_GRAMMAR_FLAG,      /* 1 or 0 */
    FRACGPU_GRAMMAR_COUNT,     /* a whole number in [low, high] */
    FRACGPU_GRAMMAR_SIZE,      /* bytes in [low, high] ("4GiB"), no percentage */
    FRACGPU_GRAMMAR_MEMORY,    /* a memory limit: bytes, or a percentage of each device */
    FRACGPU_GRAMMAR_SHARE,     /* a share of the device's time: "25%" or "0.25" */
    FRACGPU_GRAMMAR_PRIORITY,  /* high, normal or low */
    FRACGPU_GRAMMAR_SECONDS,   /* seconds >= 0: "30", "2.5" */
    FRACGPU_GRAMMAR_LOG_FORMAT, /* how messages are written: "text" or "json" */
} fracgpu_grammar;

/* A setting's value; which field holds it follows the grammar. */
typedef struct {
    uint64_t number;   /* flag (0/1), count, size or memory in bytes, priority class */
    double real;       /* seconds, share, a memory limit's fraction of each device (then number is 0) */
    const char *text;  /* text: the environment's own string, or the table's default */
} fracgpu_setting_value;

typedef enum {
#define FRACGPU_SETTING_ENUM(id, name, grammar, when_unset, low, high, role, reader, meaning) FRACGPU_SETTING_##id,
    FRACGPU_SETTINGS(FRACGPU_SETTING_ENUM)
#undef FRACGPU_SETTING_ENUM
    FRACGPU_SETTING_COUNT
} fracgpu_setting_id;

typedef struct {
    const char *name;               /* "FRACGPU_MEMORY" */
    fracgpu_grammar grammar;
    int has_default;                /* 1: default_value holds when unset; 0: default_rule says what does */
    fracgpu_setting_value default_value;
    const char *default_rule;       /* "measured", "searched", "none", a path built from other variables */
    uint64_t low, high;             /* see FRACGPU_SETTINGS */
    const char *role;               /* partition, job, host or sim */
    const char *reader;             /* "shim, nvml-shim, python" */
    const char *meaning;            /* one sentence or two, as the README says it */
} fracgpu_setting_info;

/* The row of setting `id` (id in [0, FRACGPU_SETTING_COUNT)). */
static inline const fracgpu_setting_info *fracgpu_setting_row(fracgpu_setting_id id) {
    static const fracgpu_setting_info rows[FRACGPU_SETTING_COUNT] = {
#define FRACGPU_SETTING_ROW(id, name, grammar, when_unset, low, high, role, reader, meaning) \
    {name, FRACGPU_GRAMMAR_##grammar, when_unset, (uint64_t)(low), (uint64_t)(high), role, reader, meaning},
        FRACGPU_SETTINGS(FRACGPU_SETTING_ROW)
#undef FRACGPU_SETTING_ROW
    };
    return &rows[id];
}

/* "FRACGPU_MEMORY", for messages. */
static inline const char *fracgpu_setting_name(fracgpu_setting_id id) { return fracgpu_setting_row(id)->name; }

/* The default value of setting `id`, for a setting that has one. */
static inline fracgpu_setting_value fracgpu_setting_default(fracgpu_setting_id id) {
    return fracgpu_setting_row(id)->default_value;
}

/* The value of setting `id` in this process's environment, or NULL when it is
 * unset or empty (an empty value means the default, for every setting). */
static inline const char *fracgpu_setting(fracgpu_setting_id id) {
    const char *v = getenv(fracgpu_setting_name(id));
    return v && *v ? v : NULL;
}

/* Reads `text` as setting `id`'s value, by its grammar and bounds: 0, with
 * *value set; or -1 with err holding one line that names the setting, the
 * problem and the accepted forms ("FRACGPU_SIM_MEMORY: invalid size '16XB':
 * unknown unit 'XB'; write ..."). A text value points into `text`. Allocates
 * nothing; value and err may be NULL. */
int fracgpu_setting_parse(fracgpu_setting_id id, const char *text, fracgpu_setting_value *value, char *err,
                          size_t errlen);

/* This process's setting `id`: 1 when set and valid (*value holds it), 0 when
 * unset or empty (*value holds the default, zero for a rule), -1 when invalid
 * (err says why, as fracgpu_setting_parse). */
int fracgpu_setting_read(fracgpu_setting_id id, fracgpu_setting_value *value, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
