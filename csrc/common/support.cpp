// See fracgpu/support.h.
#include "fracgpu/support.h"

#include <cstdarg>
#include <cstdio>

#include "fracgpu/units.h"

namespace fracgpu {

void log(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    print_line("fracgpu", fmt, ap);
    va_end(ap);
}

std::string size_text(uint64_t bytes) {
    char buf[32];
    fracgpu_format_size(bytes, buf, sizeof buf);
    return buf;
}

std::string uuid_text(const char bytes[16]) {
    const unsigned char *b = reinterpret_cast<const unsigned char *>(bytes);
    char s[48];
    snprintf(s, sizeof s, "GPU-%02x%02x%02x%02x-%02x%02x-%02x%02x-%02x%02x-%02x%02x%02x%02x%02x%02x", b[0], b[1],
             b[2], b[3], b[4], b[5], b[6], b[7], b[8], b[9], b[10], b[11], b[12], b[13], b[14], b[15]);
    return s;
}

}  // namespace fracgpu
