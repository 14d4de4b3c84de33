// See fracgpu/support.h.
#include "fracgpu/support.h"

#include <unistd.h>

#include <cstdarg>
#include <cstdio>
#include <cstring>
#include <ctime>

#include "fracgpu/settings.h"
#include "fracgpu/units.h"

namespace fracgpu {

namespace {

// FRACGPU_LOG_FORMAT, read at the first message: json or text (anything else is text: a message
// must still be said, and settings' errors are reported where the job's settings are read).
bool json_wanted() {
    static const bool json = [] {
        const char *v = fracgpu_setting(FRACGPU_SETTING_LOG_FORMAT);
        return v && strcmp(v, "json") == 0;
    }();
    return json;
}

// `text` as a JSON string's contents: quotes, backslashes and control characters escaped.
void append_json_text(std::string &out, const char *text) {
    for (const unsigned char *p = reinterpret_cast<const unsigned char *>(text); *p; p++) {
        if (*p == '"' || *p == '\\') {
            out += '\\';
            out += (char)*p;
        } else if (*p < 0x20) {
            char esc[8];
            snprintf(esc, sizeof esc, "\\u%04x", *p);
            out += esc;
        } else {
            out += (char)*p;
        }
    }
}

void append_field(std::string &out, const char *name, const char *text) {
    out += ",\"";
    out += name;
    out += "\":";
    if (!text) {
        out += "null";
        return;
    }
    out += '"';
    append_json_text(out, text);
    out += '"';
}

void vlog_event(const LogEvent &e, const char *fmt, va_list ap) {
    if (!json_wanted()) {
        print_line("fracgpu", fmt, ap);
        return;
    }
    char message[1024];
    vsnprintf(message, sizeof message, fmt, ap);
    struct timespec now;
    clock_gettime(CLOCK_REALTIME, &now);
    struct tm utc;
    gmtime_r(&now.tv_sec, &utc);
    char stamp[48];
    size_t n = strftime(stamp, sizeof stamp, "%Y-%m-%dT%H:%M:%S", &utc);
    snprintf(stamp + n, sizeof stamp - n, ".%03u+00:00", (unsigned)(now.tv_nsec / 1000000) % 1000u);
    std::string line = "{\"time\":\"";
    line += stamp;
    line += '"';
    append_field(line, "level", e.level);
    append_field(line, "component", "shim");
    append_field(line, "gpu", e.gpu);
    append_field(line, "partition", e.partition ? e.partition : fracgpu_setting(FRACGPU_SETTING_PARTITION));
    const char *holder = fracgpu_setting(FRACGPU_SETTING_JOB_HOLDER);
    line += ",\"job\":";
    line += holder && strspn(holder, "0123456789") == strlen(holder) ? holder : "null";
    line += ",\"pid\":" + std::to_string((long)getpid());
    append_field(line, "event", e.event);
    append_field(line, "message", message);
    line += ",\"figures\":{";
    for (size_t i = 0; i < e.figure_count; i++) {
        if (i) line += ',';
        line += '"';
        append_json_text(line, e.figures[i].name);
        line += "\":" + std::to_string((unsigned long long)e.figures[i].value);
    }
    line += "}}\n";
    fputs(line.c_str(), stderr);
}

}  // namespace

void log_event(const LogEvent &event, const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vlog_event(event, fmt, ap);
    va_end(ap);
}

void log(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    vlog_event(LogEvent{}, fmt, ap);
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
