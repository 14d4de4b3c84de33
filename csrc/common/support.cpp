// See fracgpu/support.h.
#include "fracgpu/support.h"

#include <cstdarg>
#include <cstdio>

namespace fracgpu {

void log(const char *fmt, ...) {
    char buf[1024];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    fprintf(stderr, "fracgpu: %s\n", buf);
}

}  // namespace fracgpu
