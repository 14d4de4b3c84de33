// Error names and texts of the CUDA driver and NVML, from the tables the build
// generates from their headers (cuda_errors.inc, nvml_errors.inc): shared by
// the simulated libraries and the shims, which answer with them when the real
// library is absent.
#pragma once

#include <cstddef>

namespace fracgpu {

struct ErrorText {
    int code;
    const char *name;   // "CUDA_ERROR_OUT_OF_MEMORY"
    const char *text;   // "out of memory"
};

// The entry of `code` in `table`, or null.
template <size_t N>
const ErrorText *find_error(const ErrorText (&table)[N], int code) {
    for (const ErrorText &e : table)
        if (e.code == code) return &e;
    return nullptr;
}

// cuGetErrorName / cuGetErrorString from `table`: *out = the `field` (name or
// text) of code's entry; false (and *out null) when the table has no such code.
template <size_t N>
bool describe_error(const ErrorText (&table)[N], int code, const char *ErrorText::*field, const char **out) {
    const ErrorText *e = find_error(table, code);
    *out = e ? e->*field : nullptr;
    return e != nullptr;
}

}  // namespace fracgpu
