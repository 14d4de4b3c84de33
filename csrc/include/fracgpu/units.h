/* Values in the forms people write: sizes ("4GiB", "512MiB", "25%"), shares
 * ("25%", "0.25"), priority classes, counts, seconds and flags. These are the
 * grammars of every FRACGPU_* setting (fracgpu/settings.h) and of the command
 * line's options.
 *
 * Shared by the Python module, both shims and the simulated driver, which
 * parse FRACGPU_* variables inside every job before anything else runs: so
 * this is plain C, allocates nothing, keeps no state, and never depends on the
 * locale.
 */
#ifndef FRACGPU_UNITS_H
#define FRACGPU_UNITS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* The accepted forms, as error messages spell them out. */
#define FRACGPU_SIZE_FORMS                                                    \
  "write a byte count like 1048576, a size like 512MiB, 4GiB or 4GB "       \
  "(K/Ki/KiB, M/Mi/MiB, G/Gi/GiB, T/Ti/TiB are powers of 1024; KB, MB, GB, "  \
  "TB powers of 1000; B is bytes; any case), or a percentage of the device "  \
  "like 25%"
#define FRACGPU_SHARE_FORMS "write a percentage like 25% or a fraction like 0.25"
#define FRACGPU_PRIORITY_FORMS "write high, normal or low"
#define FRACGPU_COUNT_FORMS "write a whole number like 4"
#define FRACGPU_SECONDS_FORMS "give seconds, a number >= 0 like 30 or 2.5"
#define FRACGPU_FLAG_FORMS "write 1 (on) or 0 (off)"

/* Priority classes of the launch gate, in the order they are served. */
enum { FRACGPU_PRIORITY_LOW = 0, FRACGPU_PRIORITY_NORMAL = 1, FRACGPU_PRIORITY_HIGH = 2 };

/* Parses a memory size. Success (0): either *bytes > 0 and *fraction == 0, or,
 * for "N%", *bytes == 0 and *fraction in (0, 1]. Sizes round down to a whole
 * byte, must come to at least one byte and stay below 2^63. Digits past the
 * 15th after the decimal point only tell zero and the limits apart; they do
 * not change the value. Failure (-1): err holds one line
 * naming the problem and the accepted forms. Any pointer argument but text
 * may be NULL (to only validate, or to skip the message). */
int fracgpu_parse_size(const char *text, uint64_t *bytes, double *fraction,
                       char *err, size_t errlen);

/* Parses a size in bytes in [low, high] (high 0: up to the grammar's 2^63),
 * as fracgpu_parse_size reads it but with no percentage. Zero, written in any
 * unit ("0", "0B", "0 MiB"), is accepted exactly when low is 0. */
int fracgpu_parse_bytes(const char *text, uint64_t low, uint64_t high, uint64_t *bytes, char *err,
                        size_t errlen);

/* Whether text is zero in the size grammar ("0", "0.0", "0 MiB"): the one
 * rule for the sizes where zero means none (fracgpu_parse_bytes with low 0). */
int fracgpu_size_is_zero(const char *text);

/* Parses a whole number in [low, high] (high 0: below 2^63): digits only, no
 * sign, fraction, exponent or unit. */
int fracgpu_parse_count(const char *text, uint64_t low, uint64_t high, uint64_t *count, char *err,
                        size_t errlen);

/* Parses seconds: a decimal number >= 0 ("30", "2.5"), no sign, exponent,
 * hexadecimal, "inf" or unit. */
int fracgpu_parse_seconds(const char *text, double *seconds, char *err, size_t errlen);

/* Parses a flag: "1" (on, *on = 1) or "0" (off). */
int fracgpu_parse_flag(const char *text, int *on, char *err, size_t errlen);

/* Parses text of at most max_bytes bytes (0: any length); empty is refused. */
int fracgpu_parse_text(const char *text, uint64_t max_bytes, char *err, size_t errlen);

/* Parses a compute share: "25%" or "0.25", with 0 < *share <= 1. */
int fracgpu_parse_share(const char *text, double *share, char *err, size_t errlen);

/* Parses a priority class: "high", "normal" or "low" (exactly, lower case). */
int fracgpu_parse_priority(const char *text, int *priority, char *err, size_t errlen);

/* "high", "normal" or "low"; "normal" for anything else. */
const char *fracgpu_priority_name(int priority);

/* Writes bytes in the largest binary unit (B, KiB, MiB, GiB, TiB) giving a
 * value >= 1, with at most two decimals: "256MiB", "1.5GiB", "1000B".
 * Returns the length of the full text, as snprintf does (>= len: truncated). */
size_t fracgpu_format_size(uint64_t bytes, char *buf, size_t len);

/* Writes a share as a percentage with at most two decimals: "25%", "12.5%".
 * Returns the length of the full text, or 0 (and writes "") when share is
 * negative, not finite, or too large to print. */
size_t fracgpu_format_share(double share, char *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* FRACGPU_UNITS_H */
