/* A FRACGPU_* setting's text read by its row's grammar and bounds (see
 * fracgpu/settings.h): the one reading of each setting, for both shims, the
 * simulated driver and the Python module. */
#include "fracgpu/settings.h"

#include <stdio.h>
#include <string.h>

#include "fracgpu/units.h"

/* "text" or "json", surrounding spaces allowed as in every grammar; *format is the table's own string. */
static int parse_log_format(const char *text, const char **format, char *err, size_t errlen) {
  static const char *const kFormats[] = {"text", "json"};
  size_t skip = strspn(text, " \t"), len = strlen(text + skip);
  while (len > 0 && (text[skip + len - 1] == ' ' || text[skip + len - 1] == '\t')) len--;
  for (size_t i = 0; i < sizeof kFormats / sizeof kFormats[0]; i++) {
    if (len == strlen(kFormats[i]) && strncmp(text + skip, kFormats[i], len) == 0) {
      *format = kFormats[i];
      return 0;
    }
  }
  snprintf(err, errlen, "invalid log format '%s': write text or json", text);
  return -1;
}

int fracgpu_setting_parse(fracgpu_setting_id id, const char *text, fracgpu_setting_value *value, char *err,
                          size_t errlen) {
  const fracgpu_setting_info *row = fracgpu_setting_row(id);
  fracgpu_setting_value v = {0, 0.0, NULL};
  char why[400] = "";
  int small = 0; /* a flag's or a priority class's value */
  int rc = -1;
  const size_t n = sizeof why;
  switch (row->grammar) {
    case FRACGPU_GRAMMAR_TEXT: rc = fracgpu_parse_text(text, row->high, why, n); break;
    case FRACGPU_GRAMMAR_FLAG: rc = fracgpu_parse_flag(text, &small, why, n); break;
    case FRACGPU_GRAMMAR_COUNT: rc = fracgpu_parse_count(text, row->low, row->high, &v.number, why, n); break;
    case FRACGPU_GRAMMAR_SIZE: rc = fracgpu_parse_bytes(text, row->low, row->high, &v.number, why, n); break;
    case FRACGPU_GRAMMAR_MEMORY: rc = fracgpu_parse_size(text, &v.number, &v.real, why, n); break;
    case FRACGPU_GRAMMAR_SHARE: rc = fracgpu_parse_share(text, &v.real, why, n); break;
    case FRACGPU_GRAMMAR_PRIORITY: rc = fracgpu_parse_priority(text, &small, why, n); break;
    case FRACGPU_GRAMMAR_SECONDS: rc = fracgpu_parse_seconds(text, &v.real, why, n); break;
    case FRACGPU_GRAMMAR_LOG_FORMAT: rc = parse_log_format(text, &v.text, why, n); break;
  }
  if (row->grammar == FRACGPU_GRAMMAR_FLAG || row->grammar == FRACGPU_GRAMMAR_PRIORITY) v.number = (uint64_t)small;
  if (row->grammar == FRACGPU_GRAMMAR_TEXT) v.text = text;
  if (rc != 0) {
    if (err && errlen) snprintf(err, errlen, "%s: %s", row->name, why);
    return -1;
  }
  if (value) *value = v;
  return 0;
}

int fracgpu_setting_read(fracgpu_setting_id id, fracgpu_setting_value *value, char *err, size_t errlen) {
  const char *text = fracgpu_setting(id);
  if (!text) {
    if (value) *value = fracgpu_setting_default(id);
    return 0;
  }
  return fracgpu_setting_parse(id, text, value, err, errlen) == 0 ? 1 : -1;
}
