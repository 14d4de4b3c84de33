/* A FRACGPU_* setting's text read by its row's grammar and bounds (see
 * fracgpu/settings.h): the one reading of each setting, for both shims, the
 * simulated driver and the Python module. */
#include "fracgpu/settings.h"

#include <stdio.h>
#include <string.h>

#include "fracgpu/units.h"

int fracgpu_setting_parse(fracgpu_setting_id id, const char *text, fracgpu_setting_value *value, char *err,
                          size_t errlen) {
  const fracgpu_setting_info *row = fracgpu_setting_row(id);
  fracgpu_setting_value v = {0, 0.0, NULL};
  char why[400] = "";
  int on = 0, priority = 0, rc = -1;
  switch (row->grammar) {
    case FRACGPU_GRAMMAR_TEXT:
      rc = fracgpu_parse_text(text, row->high, why, sizeof why);
      v.text = text;
      break;
    case FRACGPU_GRAMMAR_FLAG:
      rc = fracgpu_parse_flag(text, &on, why, sizeof why);
      v.number = (uint64_t)on;
      break;
    case FRACGPU_GRAMMAR_COUNT:
      rc = fracgpu_parse_count(text, row->low, row->high, &v.number, why, sizeof why);
      break;
    case FRACGPU_GRAMMAR_SIZE:
      rc = fracgpu_parse_bytes(text, row->low, row->high, &v.number, why, sizeof why);
      break;
    case FRACGPU_GRAMMAR_MEMORY:
      rc = fracgpu_parse_size(text, &v.number, &v.real, why, sizeof why);
      break;
    case FRACGPU_GRAMMAR_SHARE:
      rc = fracgpu_parse_share(text, &v.real, why, sizeof why);
      break;
    case FRACGPU_GRAMMAR_PRIORITY:
      rc = fracgpu_parse_priority(text, &priority, why, sizeof why);
      v.number = (uint64_t)priority;
      break;
    case FRACGPU_GRAMMAR_SECONDS:
      rc = fracgpu_parse_seconds(text, &v.real, why, sizeof why);
      break;
  }
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
