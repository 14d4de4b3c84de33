/* Values people write: parsing and printing (see fracgpu/units.h).
 *
 * Numbers are parsed digit by digit into an integer part and a decimal
 * fraction instead of with strtod: strtod follows the locale's decimal point
 * and accepts hex, exponents, "inf" and "nan", none of which a quota should
 * silently take. Keeping the digits also lets "1.5GiB" come out exact.
 */
#include "fracgpu/units.h"

#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

#define MAX_BYTES ((uint64_t)INT64_MAX) /* fits every signed 64-bit consumer */
#define MAX_FRACTION_DIGITS 15          /* 10^15 * 1024 still fits in uint64 */

typedef struct {
  uint64_t whole;      /* integer part, valid unless too_big */
  bool too_big;        /* integer part >= 2^63 */
  uint64_t frac;       /* fraction digits as an integer ... */
  uint64_t frac_scale; /* ... over this power of ten (1 when none) */
  bool frac_dropped;   /* a nonzero digit past MAX_FRACTION_DIGITS */
  const char *unit;    /* first character of the unit, or of the end */
  size_t unit_len;
} number;

static bool is_space(char c) {
  return c == ' ' || c == '\t' || c == '\n' || c == '\r' || c == '\v' || c == '\f';
}

static bool is_digit(char c) { return c >= '0' && c <= '9'; }

static char lower(char c) { return (c >= 'A' && c <= 'Z') ? (char)(c - 'A' + 'a') : c; }

static bool same_word(const char *s, size_t n, const char *word) {
  if (strlen(word) != n) return false;
  for (size_t i = 0; i < n; i++)
    if (lower(s[i]) != word[i]) return false;
  return true;
}

/* The first n characters of the user's text as they may appear inside a
 * one-line message: at most 40, control and non-ASCII bytes shown as '?'. */
static void quote_input(const char *text, size_t n, char out[48]) {
  size_t i = 0;
  for (; i < n && i < 40; i++) out[i] = (text[i] >= 0x20 && text[i] < 0x7f) ? text[i] : '?';
  strcpy(out + i, i < n ? "..." : "");
}

static int fail(char *err, size_t errlen, const char *what, const char *text,
                const char *forms, const char *fmt, ...) {
  if (!err || errlen == 0) return -1;
  char shown[48];
  quote_input(text ? text : "", text ? strlen(text) : 0, shown);
  int n = snprintf(err, errlen, "invalid %s '%s': ", what, shown);
  if (n < 0 || (size_t)n >= errlen) return -1;
  va_list ap;
  va_start(ap, fmt);
  int m = vsnprintf(err + n, errlen - (size_t)n, fmt, ap);
  va_end(ap);
  if (m < 0 || (size_t)(n + m) >= errlen || !forms) return -1;
  snprintf(err + n + m, errlen - (size_t)(n + m), "; %s", forms);
  return -1;
}

/* Splits text into number and unit. Returns NULL or a description of the problem. */
static const char *scan(const char *text, number *num) {
  const char *p = text;
  memset(num, 0, sizeof *num);
  num->frac_scale = 1;
  while (is_space(*p)) p++;
  if (*p == '\0') return "it is empty";
  if (*p == '-') return "it is negative";
  if (!is_digit(*p)) return "it does not start with a number";
  if (p[0] == '0' && (p[1] == 'x' || p[1] == 'X')) return "hexadecimal is not accepted";
  for (; is_digit(*p); p++) {
    unsigned d = (unsigned)(*p - '0');
    if (num->whole > (MAX_BYTES - d) / 10)
      num->too_big = true;
    else
      num->whole = num->whole * 10 + d;
  }
  if (*p == '.') {
    p++;
    if (!is_digit(*p)) return "a decimal point must be followed by digits";
    for (int k = 0; is_digit(*p); p++, k++) {
      if (k < MAX_FRACTION_DIGITS) {
        num->frac = num->frac * 10 + (uint64_t)(*p - '0');
        num->frac_scale *= 10;
      } else if (*p != '0') {
        num->frac_dropped = true;
      }
    }
  }
  while (is_space(*p)) p++;
  num->unit = p;
  while (*p && !is_space(*p)) p++;
  num->unit_len = (size_t)(p - num->unit);
  while (is_space(*p)) p++;
  if (*p != '\0') return "there is text after the unit";
  return NULL;
}

static int unknown_unit(char *err, size_t errlen, const char *what, const char *text,
                        const number *num, const char *forms) {
  char shown[48];
  quote_input(num->unit, num->unit_len, shown);
  return fail(err, errlen, what, text, forms, "unknown unit '%s'", shown);
}

static bool has_fraction(const number *num) { return num->frac > 0 || num->frac_dropped; }

static bool is_zero(const number *num) {
  return !num->too_big && num->whole == 0 && !has_fraction(num);
}

/* num / 100 in (0, 1], or a negative value when num is above 100. */
static double percent_fraction(const number *num) {
  if (num->too_big || num->whole > 100 || (num->whole == 100 && has_fraction(num))) return -1.0;
  /* One correctly rounded division when the numerator is exact in a double
   * (always, for 13 or fewer fraction digits), so "10%" is exactly 0.1. */
  uint64_t numerator = num->whole * num->frac_scale + num->frac;
  return (double)numerator / ((double)num->frac_scale * 100.0);
}

typedef struct {
  const char *name;
  unsigned base, power;
} unit_def;

static size_t put(char *buf, size_t len, int n);

static const unit_def SIZE_UNITS[] = {
    {"", 1, 0},      {"b", 1, 0},      {"k", 1024, 1},  {"kib", 1024, 1}, {"m", 1024, 2},
    {"mib", 1024, 2}, {"g", 1024, 3},  {"gib", 1024, 3}, {"t", 1024, 4},  {"tib", 1024, 4},
    /* Kubernetes' binary suffixes (Ki, Mi, Gi, Ti), as a pod's resources are written. */
    {"ki", 1024, 1},  {"mi", 1024, 2},  {"gi", 1024, 3},  {"ti", 1024, 4},
    {"kb", 1000, 1}, {"mb", 1000, 2}, {"gb", 1000, 3}, {"tb", 1000, 4},
};

static const unit_def *size_unit(const number *num) {
  for (size_t i = 0; i < sizeof SIZE_UNITS / sizeof SIZE_UNITS[0]; i++)
    if (same_word(num->unit, num->unit_len, SIZE_UNITS[i].name)) return &SIZE_UNITS[i];
  return NULL;
}

static bool is_percent(const number *num) { return num->unit_len == 1 && num->unit[0] == '%'; }

/* whole.frac * base^power, one factor at a time, carrying the fraction's
 * overflow into the whole part: exact, and rounds down only at the end.
 * Returns NULL or a description of the problem. */
static const char *size_bytes(const number *num, const unit_def *unit, uint64_t *bytes) {
  bool overflow = num->too_big;
  uint64_t whole = num->whole, frac = num->frac;
  for (unsigned i = 0; i < unit->power && !overflow; i++) {
    frac *= unit->base;
    uint64_t carry = frac / num->frac_scale;
    frac %= num->frac_scale;
    if (whole > MAX_BYTES / unit->base) overflow = true;
    whole *= unit->base;
    if (whole > MAX_BYTES - carry) overflow = true;
    whole += carry;
  }
  if (overflow) return "it is too large (the limit is 2^63 bytes)";
  if (whole == 0) return "it rounds down to 0 bytes";
  *bytes = whole;
  return NULL;
}

int fracgpu_parse_size(const char *text, uint64_t *bytes, double *fraction, char *err,
                       size_t errlen) {
  const char *what = "size";
  number num;
  const char *problem = text ? scan(text, &num) : "it is empty";
  if (problem) return fail(err, errlen, what, text, FRACGPU_SIZE_FORMS, "%s", problem);

  if (is_percent(&num)) {
    if (is_zero(&num)) return fail(err, errlen, what, text, FRACGPU_SIZE_FORMS, "it is zero");
    double f = percent_fraction(&num);
    if (f < 0) return fail(err, errlen, what, text, FRACGPU_SIZE_FORMS, "it is more than 100%%");
    if (f == 0) return fail(err, errlen, what, text, FRACGPU_SIZE_FORMS, "it is too small");
    if (bytes) *bytes = 0;
    if (fraction) *fraction = f;
    return 0;
  }

  const unit_def *unit = size_unit(&num);
  if (!unit)
    return unknown_unit(err, errlen, what, text, &num, FRACGPU_SIZE_FORMS);
  if (is_zero(&num)) return fail(err, errlen, what, text, FRACGPU_SIZE_FORMS, "it is zero");
  uint64_t whole = 0;
  if ((problem = size_bytes(&num, unit, &whole)))
    return fail(err, errlen, what, text, FRACGPU_SIZE_FORMS, "%s", problem);
  if (bytes) *bytes = whole;
  if (fraction) *fraction = 0.0;
  return 0;
}

int fracgpu_size_is_zero(const char *text) {
  number num;
  return text && !scan(text, &num) && !is_percent(&num) && size_unit(&num) && is_zero(&num);
}

/* "it must be from A to B" for a value outside [low, high], each bound as show() writes it. */
static int out_of_bounds(char *err, size_t errlen, const char *what, const char *text, const char *forms,
                         uint64_t low, uint64_t high, size_t (*show)(uint64_t, char *, size_t)) {
  char lo[32], hi[32];
  show(low, lo, sizeof lo);
  show(high, hi, sizeof hi);
  return fail(err, errlen, what, text, forms, "it must be from %s to %s", lo, hi);
}

static size_t show_count(uint64_t n, char *buf, size_t len) {
  return put(buf, len, snprintf(buf, len, "%llu", (unsigned long long)n));
}

int fracgpu_parse_bytes(const char *text, uint64_t low, uint64_t high, uint64_t *bytes, char *err,
                        size_t errlen) {
  const char *what = "size";
  number num;
  const char *problem = text ? scan(text, &num) : "it is empty";
  if (problem) return fail(err, errlen, what, text, FRACGPU_SIZE_FORMS, "%s", problem);
  if (is_percent(&num))
    return fail(err, errlen, what, text, NULL, "a percentage is not accepted here; give a size like 512MiB");
  const unit_def *unit = size_unit(&num);
  if (!unit) return unknown_unit(err, errlen, what, text, &num, FRACGPU_SIZE_FORMS);
  if (high == 0 || high > MAX_BYTES) high = MAX_BYTES;
  uint64_t value = 0;
  if (is_zero(&num)) {
    if (low > 0) return fail(err, errlen, what, text, FRACGPU_SIZE_FORMS, "it is zero");
  } else if ((problem = size_bytes(&num, unit, &value))) {
    return fail(err, errlen, what, text, FRACGPU_SIZE_FORMS, "%s", problem);
  }
  if (value < low || value > high)
    return out_of_bounds(err, errlen, what, text, NULL, low, high, fracgpu_format_size);
  if (bytes) *bytes = value;
  return 0;
}

int fracgpu_parse_count(const char *text, uint64_t low, uint64_t high, uint64_t *count, char *err,
                        size_t errlen) {
  const char *what = "count";
  number num;
  const char *problem = text ? scan(text, &num) : "it is empty";
  if (!problem && num.unit_len > 0) return unknown_unit(err, errlen, what, text, &num, FRACGPU_COUNT_FORMS);
  if (!problem && num.frac_scale > 1) problem = "it is not a whole number";   /* "4.0" too */
  if (problem) return fail(err, errlen, what, text, FRACGPU_COUNT_FORMS, "%s", problem);
  if (high == 0 || high > MAX_BYTES) high = MAX_BYTES;
  if (num.too_big || num.whole < low || num.whole > high)
    return out_of_bounds(err, errlen, what, text, NULL, low, high, show_count);
  if (count) *count = num.whole;
  return 0;
}

int fracgpu_parse_seconds(const char *text, double *seconds, char *err, size_t errlen) {
  const char *what = "seconds";
  number num;
  const char *problem = text ? scan(text, &num) : "it is empty";
  if (!problem && num.unit_len > 0) return unknown_unit(err, errlen, what, text, &num, FRACGPU_SECONDS_FORMS);
  if (!problem && num.too_big) problem = "it is too large";
  if (problem) return fail(err, errlen, what, text, FRACGPU_SECONDS_FORMS, "%s", problem);
  if (seconds) *seconds = (double)num.whole + (double)num.frac / (double)num.frac_scale;
  return 0;
}

int fracgpu_parse_flag(const char *text, int *on, char *err, size_t errlen) {
  if (!text || (strcmp(text, "0") != 0 && strcmp(text, "1") != 0))
    return fail(err, errlen, "flag", text, FRACGPU_FLAG_FORMS, "it is neither 1 nor 0");
  if (on) *on = text[0] == '1';
  return 0;
}

int fracgpu_parse_text(const char *text, uint64_t max_bytes, char *err, size_t errlen) {
  if (!text || !*text) return fail(err, errlen, "text", text, NULL, "it is empty; leave the variable unset instead");
  size_t n = strlen(text);
  if (max_bytes > 0 && n > max_bytes)
    return fail(err, errlen, "text", text, NULL, "it is %zu bytes long, more than %llu", n,
                (unsigned long long)max_bytes);
  return 0;
}

int fracgpu_parse_share(const char *text, double *share, char *err, size_t errlen) {
  const char *what = "share";
  number num;
  const char *problem = text ? scan(text, &num) : "it is empty";
  if (problem) return fail(err, errlen, what, text, FRACGPU_SHARE_FORMS, "%s", problem);
  bool percent = num.unit_len == 1 && num.unit[0] == '%';
  if (!percent && num.unit_len > 0)
    return unknown_unit(err, errlen, what, text, &num, FRACGPU_SHARE_FORMS);
  if (is_zero(&num)) return fail(err, errlen, what, text, FRACGPU_SHARE_FORMS, "it is zero");

  double f = percent_fraction(&num);
  if (percent) {
    if (f < 0) return fail(err, errlen, what, text, FRACGPU_SHARE_FORMS, "it is more than 100%%");
    if (f == 0) return fail(err, errlen, what, text, FRACGPU_SHARE_FORMS, "it is too small");
    if (share) *share = f;
    return 0;
  }
  if (num.too_big || num.whole > 1 || (num.whole == 1 && has_fraction(&num))) {
    /* Most likely a percentage written without its sign: say both ways. */
    if (f < 0) return fail(err, errlen, what, text, FRACGPU_SHARE_FORMS, "a share is at most 1 (100%%)");
    int digits = (int)(num.unit - text); /* the number as typed, spaces trimmed below */
    while (digits > 0 && is_space(text[digits - 1])) digits--;
    const char *start = text;
    while (is_space(*start)) start++, digits--;
    return fail(err, errlen, what, text, NULL,
                "a share without %% is a fraction of at most 1; write %.*s%% or %.15g", digits,
                start, f);
  }
  double value = (double)(num.whole * num.frac_scale + num.frac) / (double)num.frac_scale;
  if (value == 0) return fail(err, errlen, what, text, FRACGPU_SHARE_FORMS, "it is too small");
  if (share) *share = value;
  return 0;
}

static size_t put(char *buf, size_t len, int n) {
  if (n < 0) {
    if (len) buf[0] = '\0';
    return 0;
  }
  return (size_t)n;
}

/* whole + hundredths/100, trailing zeros trimmed, then suffix. */
static size_t put_decimal(char *buf, size_t len, uint64_t whole, unsigned hundredths,
                          const char *suffix) {
  char empty[1];
  if (len == 0) buf = empty, len = 1; /* still report the full length */
  if (hundredths == 0)
    return put(buf, len, snprintf(buf, len, "%llu%s", (unsigned long long)whole, suffix));
  if (hundredths % 10 == 0)
    return put(buf, len,
               snprintf(buf, len, "%llu.%u%s", (unsigned long long)whole, hundredths / 10, suffix));
  return put(buf, len, snprintf(buf, len, "%llu.%02u%s", (unsigned long long)whole, hundredths, suffix));
}

static const char *const kPriorityNames[] = {"low", "normal", "high"};

int fracgpu_parse_priority(const char *text, int *priority, char *err, size_t errlen) {
  if (!text || !*text) return fail(err, errlen, "priority", text, FRACGPU_PRIORITY_FORMS, "it is empty");
  for (int p = FRACGPU_PRIORITY_LOW; p <= FRACGPU_PRIORITY_HIGH; p++) {
    if (strcmp(text, kPriorityNames[p]) == 0) {
      if (priority) *priority = p;
      return 0;
    }
  }
  return fail(err, errlen, "priority", text, FRACGPU_PRIORITY_FORMS, "it is not a priority class");
}

const char *fracgpu_priority_name(int priority) {
  bool known = priority >= FRACGPU_PRIORITY_LOW && priority <= FRACGPU_PRIORITY_HIGH;
  return kPriorityNames[known ? priority : FRACGPU_PRIORITY_NORMAL];
}

size_t fracgpu_format_size(uint64_t bytes, char *buf, size_t len) {
  /* Only units the parser accepts, so what is printed can be read back. */
  static const char *const names[] = {"B", "KiB", "MiB", "GiB", "TiB"};
  unsigned u = 0;
  while (u + 1 < sizeof names / sizeof names[0] && bytes >> (10 * (u + 1)) > 0) u++;
  uint64_t unit = (uint64_t)1 << (10 * u);
  uint64_t whole = bytes / unit;
  uint64_t rest = bytes % unit; /* < 2^40, so rest * 100 cannot overflow */
  uint64_t hundredths = (rest * 100 + unit / 2) / unit;
  if (hundredths == 100) whole++, hundredths = 0;
  if (whole == 1024 && u + 1 < sizeof names / sizeof names[0]) whole = 1, u++;
  return put_decimal(buf, len, whole, (unsigned)hundredths, names[u]);
}

size_t fracgpu_format_share(double share, char *buf, size_t len) {
  if (!(share >= 0.0) || !(share <= 1e12)) { /* also catches NaN */
    if (len) buf[0] = '\0';
    return 0;
  }
  uint64_t basis_points = (uint64_t)(share * 10000.0 + 0.5);
  return put_decimal(buf, len, basis_points / 100, (unsigned)(basis_points % 100), "%");
}
