/* The grammars of csrc/common (sizes, shares, counts, seconds, flags) and the
 * settings table's reading by them, run natively (and under the sanitizers in
 * CI): exact values, limits, and that bad input is refused with a message.
 * Exits non-zero on the first failure, naming it. */
#include "fracgpu/settings.h"
#include "fracgpu/units.h"

#include "expect.h"

#include <stdio.h>
#include <string.h>

static int failures;

static void size_ok(const char *text, uint64_t want) {
    uint64_t bytes = 1;
    double fraction = 1;
    char err[256] = "";
    int rc = fracgpu_parse_size(text, &bytes, &fraction, err, sizeof err);
    if (rc != 0 || bytes != want || fraction != 0) {
        fprintf(stderr, "parse_size(%s): rc %d bytes %llu (want %llu) %s\n", text, rc,
                (unsigned long long)bytes, (unsigned long long)want, err);
        failures++;
    }
}

static void size_bad(const char *text, const char *needle) {
    char err[512] = "";
    uint64_t bytes = 0;
    if (fracgpu_parse_size(text, &bytes, NULL, err, sizeof err) != -1 || !strstr(err, needle)) {
        fprintf(stderr, "parse_size(%s) should fail with '%s', got '%s'\n", text, needle, err);
        failures++;
    }
}

int main(void) {
    size_ok("1048576", 1048576);
    size_ok("512MiB", 512ull << 20);
    size_ok("4GiB", 4ull << 30);
    size_ok("4G", 4ull << 30);
    size_ok("4GB", 4000000000ull);
    size_ok("4gb", 4000000000ull);
    size_ok("4Gi", 4ull << 30);   /* Kubernetes' binary suffixes */
    size_ok("512Mi", 512ull << 20);
    size_ok("1.5GiB", 3ull << 29);
    size_ok(" 64 KiB ", 64ull << 10);
    size_ok("9223372036854775807", 9223372036854775807ull);

    uint64_t bytes = 7;
    double fraction = 0;
    EXPECT(fracgpu_parse_size("25%", &bytes, &fraction, NULL, 0) == 0 && bytes == 0 && fraction == 0.25);

    size_bad("", "");
    size_bad("abc", "");
    size_bad("0", "");
    size_bad("-1GiB", "");
    size_bad("12XB", "XB");
    size_bad("8EiB", "");
    size_bad("9223372036854775808", "");
    size_bad("150%", "");
    EXPECT(fracgpu_parse_size(NULL, &bytes, NULL, NULL, 0) == -1);

    double share = 0;
    EXPECT(fracgpu_parse_share("25%", &share, NULL, 0) == 0 && share == 0.25);
    EXPECT(fracgpu_parse_share("0.75", &share, NULL, 0) == 0 && share == 0.75);
    EXPECT(fracgpu_parse_share("0", &share, NULL, 0) == -1);
    EXPECT(fracgpu_parse_share("101%", &share, NULL, 0) == -1);

    int priority = -1;
    char err[160];
    EXPECT(fracgpu_parse_priority("high", &priority, NULL, 0) == 0 && priority == FRACGPU_PRIORITY_HIGH);
    EXPECT(fracgpu_parse_priority("low", &priority, NULL, 0) == 0 && priority == FRACGPU_PRIORITY_LOW);
    EXPECT(fracgpu_parse_priority("normal", &priority, NULL, 0) == 0 && priority == FRACGPU_PRIORITY_NORMAL);
    EXPECT(fracgpu_parse_priority("urgent", &priority, err, sizeof err) == -1 &&
           !strcmp(err, "invalid priority 'urgent': it is not a priority class; write high, normal or low"));
    EXPECT(fracgpu_parse_priority("High", NULL, NULL, 0) == -1 && fracgpu_parse_priority("", NULL, NULL, 0) == -1);
    EXPECT(fracgpu_parse_priority(NULL, NULL, NULL, 0) == -1);
    EXPECT(!strcmp(fracgpu_priority_name(FRACGPU_PRIORITY_HIGH), "high"));
    EXPECT(!strcmp(fracgpu_priority_name(7), "normal"));

    /* A size where zero means none: zero in any unit the grammar reads, never a percentage. */
    EXPECT(fracgpu_parse_bytes("0", 0, 0, &bytes, NULL, 0) == 0 && bytes == 0);
    EXPECT(fracgpu_parse_bytes("0 MiB", 0, 0, &bytes, NULL, 0) == 0 && bytes == 0);
    EXPECT(fracgpu_parse_bytes("0", 1, 0, &bytes, NULL, 0) == -1);
    EXPECT(fracgpu_parse_bytes("16GB", 1, 0, &bytes, NULL, 0) == 0 && bytes == 16000000000ull);
    EXPECT(fracgpu_parse_bytes("25%", 0, 0, &bytes, err, sizeof err) == -1 && strstr(err, "percentage"));
    EXPECT(fracgpu_parse_bytes("65TiB", 1, 64ull << 40, &bytes, err, sizeof err) == -1 &&
           strstr(err, "it must be from 1B to 64TiB"));
    EXPECT(fracgpu_size_is_zero("0.0 GiB") && !fracgpu_size_is_zero("0%") && !fracgpu_size_is_zero("0 QB") &&
           !fracgpu_size_is_zero("-0") && !fracgpu_size_is_zero(NULL));

    uint64_t count = 0;
    EXPECT(fracgpu_parse_count("132", 1, 1024, &count, NULL, 0) == 0 && count == 132);
    EXPECT(fracgpu_parse_count("0", 1, 1024, &count, err, sizeof err) == -1 && strstr(err, "from 1 to 1024"));
    EXPECT(fracgpu_parse_count("4.0", 1, 0, &count, NULL, 0) == -1);
    EXPECT(fracgpu_parse_count("0x10", 1, 0, &count, NULL, 0) == -1);
    EXPECT(fracgpu_parse_count("4K", 1, 0, &count, NULL, 0) == -1);

    double seconds = -1;
    EXPECT(fracgpu_parse_seconds("2.5", &seconds, NULL, 0) == 0 && seconds == 2.5);
    EXPECT(fracgpu_parse_seconds("0", &seconds, NULL, 0) == 0 && seconds == 0);
    EXPECT(fracgpu_parse_seconds("0x10", &seconds, err, sizeof err) == -1 && strstr(err, "hexadecimal"));
    EXPECT(fracgpu_parse_seconds("1e3", &seconds, NULL, 0) == -1);
    EXPECT(fracgpu_parse_seconds("inf", &seconds, NULL, 0) == -1);
    EXPECT(fracgpu_parse_seconds("-1", &seconds, NULL, 0) == -1);

    int on = -1;
    EXPECT(fracgpu_parse_flag("1", &on, NULL, 0) == 0 && on == 1);
    EXPECT(fracgpu_parse_flag("0", &on, NULL, 0) == 0 && on == 0);
    EXPECT(fracgpu_parse_flag("yes", &on, NULL, 0) == -1 && fracgpu_parse_flag("01", &on, NULL, 0) == -1);

    /* The table's rows read by their grammar and bounds, the message naming the variable. */
    fracgpu_setting_value value;
    EXPECT(fracgpu_setting_parse(FRACGPU_SETTING_SIM_MEMORY, "16GB", &value, NULL, 0) == 0 &&
           value.number == 16000000000ull);
    EXPECT(fracgpu_setting_parse(FRACGPU_SETTING_SIM_MEMORY, "0", &value, err, sizeof err) == -1 &&
           !strncmp(err, "FRACGPU_SIM_MEMORY: invalid size '0': it is zero", 48));
    EXPECT(fracgpu_setting_parse(FRACGPU_SETTING_CONTEXT_MEMORY, "0MiB", &value, NULL, 0) == 0 && value.number == 0);
    EXPECT(fracgpu_setting_parse(FRACGPU_SETTING_SIM_DEVICES, "17", &value, NULL, 0) == -1);
    EXPECT(fracgpu_setting_parse(FRACGPU_SETTING_MEMORY, "25%", &value, NULL, 0) == 0 && value.real == 0.25);
    EXPECT(fracgpu_setting_parse(FRACGPU_SETTING_PRIORITY, "high", &value, NULL, 0) == 0 &&
           value.number == FRACGPU_PRIORITY_HIGH);
    char long_name[256];
    memset(long_name, 'x', 201);
    long_name[201] = '\0';
    EXPECT(fracgpu_setting_parse(FRACGPU_SETTING_SIM_NAME, long_name, &value, NULL, 0) == -1);
    EXPECT(fracgpu_setting_default(FRACGPU_SETTING_SIM_MEMORY).number == 16ull << 30);
    EXPECT(!fracgpu_setting_row(FRACGPU_SETTING_CONTEXT_MEMORY)->has_default);

    char buf[32];
    EXPECT(fracgpu_format_size(256ull << 20, buf, sizeof buf) == 6 && !strcmp(buf, "256MiB"));
    EXPECT(fracgpu_format_size(3ull << 29, buf, sizeof buf) && !strcmp(buf, "1.5GiB"));
    EXPECT(fracgpu_format_size(1000, buf, sizeof buf) && !strcmp(buf, "1000B"));
    char tiny[4];
    EXPECT(fracgpu_format_size(256ull << 20, tiny, sizeof tiny) == 6 && strlen(tiny) == 3);

    if (failures) fprintf(stderr, "%d failure(s)\n", failures);
    else printf("units: all passed\n");
    return failures != 0;
}
