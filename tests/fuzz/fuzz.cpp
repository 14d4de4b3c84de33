// Coverage-guided fuzzing of the native input readers: the size and share
// parsers (csrc/common/units.c) and the state file reader (csrc/state).
//
// libFuzzer needs clang's coverage instrumentation, and this project builds
// with GCC; GCC's -fsanitize-coverage=trace-pc calls __sanitizer_cov_trace_pc()
// at every basic block of the code under test, which is all a coverage-guided
// loop needs. So the loop is here: edges (previous block, this block) are
// counted in a map; an input that reaches an edge (or an edge's hit-count
// bucket) not seen before joins the corpus; inputs are mutated from the corpus.
// Everything runs under ASan + UBSan: a memory error or undefined behaviour
// aborts, and the input that caused it is written out first.
//
//   fuzz TARGET CORPUS_DIR [--seconds N] [--runs N] [--save]   fuzz (new inputs saved with --save)
//   fuzz TARGET CORPUS_DIR --replay                            run every corpus file once
//
// TARGET: size (fracgpu_parse_size / _share, round trips), state (a valid
// region file patched by the input, then opened and read), config (the input
// as a node configuration file, parsed, and what it gave written back and
// parsed again).
#include "fracgpu/node_config.h"
#include "fracgpu/state.h"
#include "fracgpu/units.h"

#include <algorithm>
#include <cctype>
#include <chrono>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <random>
#include <string>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

// ---------------------------------------------------------------------------
// Coverage
// ---------------------------------------------------------------------------
namespace {
constexpr size_t kMapSize = 1 << 16;
uint8_t g_hits[kMapSize];
uintptr_t g_prev = 0;
bool g_tracing = false;
}  // namespace

extern "C" void __sanitizer_cov_trace_pc(void) {
    if (!g_tracing) return;
    uintptr_t pc = (uintptr_t)__builtin_return_address(0);
    size_t edge = (pc ^ g_prev) & (kMapSize - 1);
    g_prev = pc >> 1;
    if (g_hits[edge] != 255) g_hits[edge]++;
}

// From the sanitizer runtime (absent in a build without sanitizers).
extern "C" void __sanitizer_set_death_callback(void (*)(void)) __attribute__((weak));

namespace {

using Input = std::vector<uint8_t>;

// ---------------------------------------------------------------------------
// Targets
// ---------------------------------------------------------------------------
void fail(const char *what) {
    fprintf(stderr, "fuzz: invariant broken: %s\n", what);
    abort();
}

void target_size(const Input &in) {
    std::string text(in.begin(), in.end());
    text = text.c_str();   // the parsers take C strings: up to the first NUL
    uint64_t bytes = 0;
    double fraction = 0, share = 0;
    char err[256];
    if (fracgpu_parse_size(text.c_str(), &bytes, &fraction, err, sizeof err) == 0) {
        if (fraction != 0 && !(fraction > 0 && fraction <= 1)) fail("a size's fraction outside (0, 1]");
        if (fraction == 0) {
            // What format_size writes (three significant digits) parse_size reads back, within
            // its rounding.
            char out[64];
            fracgpu_format_size(bytes, out, sizeof out);
            uint64_t again = 0;
            double f = 0;
            if (fracgpu_parse_size(out, &again, &f, err, sizeof err) != 0 || f != 0)
                fail("format_size writes what parse_size refuses");
            double off = again > bytes ? (double)(again - bytes) : (double)(bytes - again);
            if (off > (double)bytes * 0.005 + 1) fail("format_size does not read back within its rounding");
        }
    } else if (!err[0]) {
        fail("a refused size without a message");
    }
    if (fracgpu_parse_share(text.c_str(), &share, err, sizeof err) == 0) {
        if (!(share > 0 && share <= 1)) fail("a share outside (0, 1]");
    } else if (!err[0]) {
        fail("a refused share without a message");
    }
}

std::string g_dir;
std::vector<uint8_t> g_base;   // a valid region file: partitions and process slots in use

void make_base() {
    char tmpl[] = "/tmp/fracgpu-fuzz-XXXXXX";
    if (!mkdtemp(tmpl)) abort();
    g_dir = tmpl;
    fracgpu::Region r;
    std::string err;
    if (!r.open(g_dir, "GPU-00000000-0000-4000-8000-00000000f022", "fuzz GPU", 1ull << 30, true, &err)) {
        fprintf(stderr, "fuzz: %s\n", err.c_str());
        exit(2);
    }
    uint64_t limit = 1 << 20;
    r.create_partition("team", 1 << 28, 0.25, fracgpu::kPartitionCap, &err);
    r.join("job", getpid(), "fuzz", &limit, &err, 0.5, 0, getpid());
    std::string path = r.path();
    r.close();
    FILE *f = fopen(path.c_str(), "rb");
    if (!f) abort();
    int c;
    while ((c = fgetc(f)) != EOF) g_base.push_back((uint8_t)c);
    fclose(f);
    unlink(path.c_str());
}

// Input: 4 bytes of truncation (little endian, taken modulo the file size + 1;
// 0xffffffff: whole), then patches of 4 bytes: a 24-bit offset into the first
// 16 MiB (taken modulo the file size) and the byte to write there.
void target_state(const Input &in) {
    std::vector<uint8_t> file = g_base;
    size_t i = 0;
    if (in.size() >= 4) {
        uint32_t cut;
        memcpy(&cut, in.data(), 4);
        if (cut != 0xffffffffu) file.resize(cut % (file.size() + 1));
        i = 4;
    }
    for (; i + 4 <= in.size() && !file.empty(); i += 4) {
        uint32_t at = (uint32_t)in[i] | (uint32_t)in[i + 1] << 8 | (uint32_t)in[i + 2] << 16;
        file[at % file.size()] = in[i + 3];
    }
    std::string path = g_dir + "/gpu-fuzz.state";
    int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (fd < 0 || write(fd, file.data(), file.size()) != (ssize_t)file.size()) abort();
    close(fd);
    fracgpu::Region r;
    std::string err;
    if (r.open_file(path, &err)) {
        for (auto &p : r.partitions())
            if (p.name.size() >= fracgpu::kNameBytes) fail("a partition name longer than its field");
        for (auto &p : r.processes())
            if (p.command.size() >= fracgpu::kCommandBytes) fail("a command longer than its field");
        r.find_partition("team");
    } else if (err.empty()) {
        fail("a refused state file without a message");
    }
}

// The input as a node configuration file: a refusal names the file; what is
// accepted has non-empty values without a line break or a comment, and reads
// back the same when written out as key = value lines.
std::string g_config_dir;

void target_config(const Input &in) {
    std::string path = g_config_dir + "/fracgpu.conf";
    int fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (fd < 0 || (!in.empty() && write(fd, in.data(), in.size()) != (ssize_t)in.size())) abort();
    close(fd);
    fracgpu::NodeConfig config, again;
    std::string err;
    if (!fracgpu::parse_node_config(path, &config, &err)) {
        if (err.find(path) == std::string::npos) fail("a refused node file without its name in the message");
        return;
    }
    std::string text;
    for (int id = 0; id < FRACGPU_SETTING_COUNT; id++) {
        const std::string &v = config.values[id];
        if (v.empty()) continue;
        if (v.find_first_of("#\n") != std::string::npos || v.front() == ' ' || v.back() == ' ')
            fail("a node file value with a comment, a line break or spaces around it");
        std::string key = fracgpu_setting_name((fracgpu_setting_id)id) + strlen("FRACGPU_");
        for (char &c : key) c = (char)tolower((unsigned char)c);
        text += key + " = " + v + "\n";
    }
    fd = open(path.c_str(), O_CREAT | O_TRUNC | O_WRONLY, 0600);
    if (fd < 0 || write(fd, text.data(), text.size()) != (ssize_t)text.size()) abort();
    close(fd);
    if (!fracgpu::parse_node_config(path, &again, &err)) fail("a node file's own values, written back, are refused");
    for (int id = 0; id < FRACGPU_SETTING_COUNT; id++)
        if (config.values[id] != again.values[id]) fail("a node file's values do not read back the same");
}

// ---------------------------------------------------------------------------
// The loop
// ---------------------------------------------------------------------------
void (*g_target)(const Input &) = nullptr;
const Input *g_current = nullptr;
std::string g_crash_dir;

void write_file(const std::string &path, const Input &in) {
    FILE *f = fopen(path.c_str(), "wb");
    if (!f) return;
    if (!in.empty()) fwrite(in.data(), 1, in.size(), f);
    fclose(f);
}

uint64_t hash(const Input &in) {
    uint64_t h = 1469598103934665603ull;
    for (uint8_t b : in) h = (h ^ b) * 1099511628211ull;
    return h;
}

void save_crash() {
    if (!g_current) return;
    char name[64];
    snprintf(name, sizeof name, "/crash-%016llx", (unsigned long long)hash(*g_current));
    std::string path = g_crash_dir + name;
    write_file(path, *g_current);
    fprintf(stderr, "fuzz: the input is in %s (add it to the corpus once fixed: a regression test)\n", path.c_str());
}

void on_signal(int sig) {
    save_crash();
    signal(sig, SIG_DFL);
    raise(sig);
}

uint8_t bucket(uint8_t n) {
    return n == 0 ? 0 : n == 1 ? 1 : n == 2 ? 2 : n == 3 ? 3 : n < 8 ? 4 : n < 16 ? 5 : n < 32 ? 6 : n < 128 ? 7 : 8;
}

std::vector<uint16_t> g_seen(kMapSize, 0);   // bit b set: bucket b of that edge seen

// Runs one input; true when it reached something new.
bool run(const Input &in) {
    memset(g_hits, 0, sizeof g_hits);
    g_prev = 0;
    g_current = &in;
    g_tracing = true;
    g_target(in);
    g_tracing = false;
    g_current = nullptr;
    bool fresh = false;
    for (size_t e = 0; e < kMapSize; e++) {
        if (!g_hits[e]) continue;
        uint16_t bit = (uint16_t)(1u << bucket(g_hits[e]));
        if (!(g_seen[e] & bit)) {
            g_seen[e] |= bit;
            fresh = true;
        }
    }
    return fresh;
}

size_t edges() {
    size_t n = 0;
    for (uint16_t s : g_seen) n += s != 0;
    return n;
}

Input mutate(const std::vector<Input> &corpus, std::mt19937_64 &rng) {
    Input in = corpus[rng() % corpus.size()];
    static const uint8_t interesting[] = {0, 1, 0x7f, 0x80, 0xff, '0', '9', '.', '%', 'e', 'E', 'i', 'B', 'K',
                                          'M', 'G', 'T', 'P', '-', '+', ' '};
    int rounds = 1 + (int)(rng() % 4);
    for (int k = 0; k < rounds; k++) {
        switch (rng() % 7) {
        case 0:
            if (!in.empty()) in[rng() % in.size()] ^= (uint8_t)(1u << (rng() % 8));
            break;
        case 1:
            if (!in.empty()) in[rng() % in.size()] = (uint8_t)rng();
            break;
        case 2:
            if (!in.empty()) in[rng() % in.size()] = interesting[rng() % sizeof interesting];
            break;
        case 3:
            if (in.size() < 4096) in.insert(in.begin() + (long)(rng() % (in.size() + 1)), interesting[rng() % sizeof interesting]);
            break;
        case 4:
            if (!in.empty()) in.erase(in.begin() + (long)(rng() % in.size()));
            break;
        case 5: {   // splice a piece of another input in
            const Input &other = corpus[rng() % corpus.size()];
            if (!other.empty() && in.size() < 4096) {
                size_t from = rng() % other.size(), len = 1 + rng() % std::min<size_t>(16, other.size() - from);
                in.insert(in.begin() + (long)(rng() % (in.size() + 1)), other.begin() + (long)from,
                          other.begin() + (long)(from + len));
            }
            break;
        }
        default:
            if (in.size() < 4096)
                for (int j = 0; j < 4; j++) in.push_back((uint8_t)rng());
        }
    }
    return in;
}

std::vector<std::pair<std::string, Input>> load(const std::string &dir) {
    std::vector<std::pair<std::string, Input>> out;
    DIR *d = opendir(dir.c_str());
    if (!d) return out;
    while (dirent *e = readdir(d)) {
        if (e->d_name[0] == '.') continue;
        std::string path = dir + "/" + e->d_name;
        FILE *f = fopen(path.c_str(), "rb");
        if (!f) continue;
        Input in;
        int c;
        while ((c = fgetc(f)) != EOF) in.push_back((uint8_t)c);
        fclose(f);
        out.emplace_back(path, in);
    }
    closedir(d);
    std::sort(out.begin(), out.end());
    return out;
}

}  // namespace

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s size|state CORPUS_DIR [--seconds N] [--runs N] [--save] [--replay]\n", argv[0]);
        return 2;
    }
    std::string target = argv[1], dir = argv[2];
    double seconds = 10;
    long max_runs = -1;
    bool save = false, replay = false;
    for (int i = 3; i < argc; i++) {
        std::string a = argv[i];
        if (a == "--seconds" && i + 1 < argc) seconds = atof(argv[++i]);
        else if (a == "--runs" && i + 1 < argc) max_runs = atol(argv[++i]);
        else if (a == "--save") save = true;
        else if (a == "--replay") replay = true;
        else {
            fprintf(stderr, "fuzz: unknown option %s\n", a.c_str());
            return 2;
        }
    }
    if (target == "size") {
        g_target = target_size;
    } else if (target == "state") {
        make_base();
        g_target = target_state;
    } else if (target == "config") {
        char tmpl[] = "/tmp/fracgpu-fuzz-config-XXXXXX";
        if (!mkdtemp(tmpl)) abort();
        g_config_dir = tmpl;
        atexit([] {
            unlink((g_config_dir + "/fracgpu.conf").c_str());
            rmdir(g_config_dir.c_str());
        });
        g_target = target_config;
    } else {
        fprintf(stderr, "fuzz: unknown target %s (size, state, config)\n", target.c_str());
        return 2;
    }
    const char *crash_dir = getenv("FRACGPU_FUZZ_CRASH_DIR");
    g_crash_dir = crash_dir && *crash_dir ? crash_dir : ".";
    if (__sanitizer_set_death_callback) __sanitizer_set_death_callback(save_crash);
    signal(SIGSEGV, on_signal);
    signal(SIGABRT, on_signal);
    signal(SIGBUS, on_signal);
    signal(SIGFPE, on_signal);

    auto files = load(dir);
    std::vector<Input> corpus;
    for (auto &f : files) {
        run(f.second);
        corpus.push_back(f.second);
    }
    if (replay) {
        printf("fuzz %s: replayed %zu corpus inputs, %zu edges, 0 crashes\n", target.c_str(), files.size(), edges());
        return 0;
    }
    if (corpus.empty()) corpus.push_back(Input{});
    std::mt19937_64 rng(getpid() ^ (uint64_t)time(nullptr));
    auto start = std::chrono::steady_clock::now();
    long runs = 0, added = 0;
    while (max_runs < 0 || runs < max_runs) {
        if ((runs & 255) == 0 &&
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() >= seconds)
            break;
        Input in = mutate(corpus, rng);
        runs++;
        if (run(in)) {
            corpus.push_back(in);
            added++;
            if (save) {
                char name[64];
                snprintf(name, sizeof name, "/%016llx", (unsigned long long)hash(in));
                write_file(dir + name, in);
            }
        }
    }
    double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    printf("fuzz %s: %ld executions in %.1f s, corpus %zu (+%ld new), %zu edges, 0 crashes\n", target.c_str(), runs,
           took, corpus.size(), added, edges());
    if (target == "state") {
        std::string cmd = "rm -rf " + g_dir;
        if (system(cmd.c_str()) != 0) return 1;
    }
    return 0;
}
