// Modules, libraries and kernel launches.
//
// Any image loads (its bytes are not interpreted): every module and library
// provides the two simulated kernels, under the names and parameters of the
// real ones in cuda/fracgpu_kernels.cu, so one client runs on both GPUs:
//   fracgpu_spin(unsigned long long ns)          occupies the device for ns
//   fracgpu_fill(CUdeviceptr dst, unsigned value, unsigned long long count)
//                                                writes count 32-bit values
// A fill outside any allocation is reported as a real GPU reports a fault:
// later, as a sticky CUDA_ERROR_ILLEGAL_ADDRESS on the context.
//
// Device globals: a PTX image (text, as cuModuleLoadData and .ptx files take
// it) is read for the `.global` variables it defines; they are reserved on
// the device when the module loads (a library: in the current context, if
// any), found by cuModuleGetGlobal, and given back when it unloads or its
// context ends. Binary images (cubin, fatbin) define none here: the
// project's own kernels have no globals.
#include "sim.h"

#include <algorithm>
#include <cctype>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <fcntl.h>
#include <fstream>
#include <iterator>
#include <set>
#include <sstream>
#include <unistd.h>
#include <vector>

namespace sim {
namespace {

constexpr double kFillBytesPerNs = 3000.0;   // ~3 TB/s, an HBM3 device
constexpr uint64_t kFillOverheadNs = 2000;

struct Module;
struct Function {
    Module *mod = nullptr;
    KernelId id = KernelId::Spin;
    const char *name = "";
    int max_dynamic_smem = 0;
};
struct Global {
    std::string name;
    uint64_t size = 0;
    uint64_t base = 0;                 // its device memory (0 until reserved)
};
struct Module {
    Context *ctx = nullptr;            // null for a library (context-independent)
    bool is_library = false;
    Function spin, fill;
    std::vector<Global> globals;
};
std::set<Module *> &g_modules = *new std::set<Module *>;
std::set<Function *> &g_functions = *new std::set<Function *>;

Module *new_module(Context *c, bool library) {
    Module *m = new Module();
    m->ctx = c;
    m->is_library = library;
    m->spin = Function{m, KernelId::Spin, "fracgpu_spin", 0};
    m->fill = Function{m, KernelId::Fill, "fracgpu_fill", 0};
    g_modules.insert(m);
    g_functions.insert(&m->spin);
    g_functions.insert(&m->fill);
    return m;
}

void drop_module(Module *m) {
    for (const Global &g : m->globals)
        if (g.base) free_block(g.base);
    g_functions.erase(&m->spin);
    g_functions.erase(&m->fill);
    g_modules.erase(m);
    delete m;
}

Function *lookup(Module *m, const char *name) {
    if (!name) return nullptr;
    if (!strcmp(name, "fracgpu_spin")) return &m->spin;
    if (!strcmp(name, "fracgpu_fill")) return &m->fill;
    return nullptr;
}

// Bytes of a PTX scalar type (.b8 ... .f64), 0 for anything else.
uint64_t ptx_type_bytes(const std::string &t) {
    if (t.size() < 3 || t[0] != '.' || !strchr("busf", t[1])) return 0;
    int bits = atoi(t.c_str() + 2);
    return bits == 8 || bits == 16 || bits == 32 || bits == 64 ? bits / 8 : 0;
}

// The `.global` variables a PTX text defines (`.extern` ones are declarations).
// false: a definition the simulation cannot size (the load is refused).
bool ptx_globals(const std::string &ptx, std::vector<Global> *out) {
    std::istringstream lines(ptx);
    std::string line;
    while (std::getline(lines, line)) {
        std::istringstream words(line.substr(0, line.find("//")));
        std::string w, type;
        bool global = false, external = false;
        while (words >> w) {
            if (w == ".extern") external = true;
            else if (w == ".global") global = true;
            else if (w == ".align") words >> w;
            else if (w == ".visible" || w == ".weak") continue;
            else break;
        }
        if (!global || external) continue;
        uint64_t size = ptx_type_bytes(w);
        if (!size || !(words >> w)) return false;
        std::string name = w.substr(0, w.find_first_of("[;= "));
        for (size_t at = w.find('['); at != std::string::npos; at = w.find('[', at + 1)) {
            char *end;
            unsigned long long n = strtoull(w.c_str() + at + 1, &end, 10);
            if (*end != ']' || n == 0 || size > (1ull << 40) / n) return false;
            size *= n;
        }
        if (name.empty()) return false;
        out->push_back(Global{name, size, 0});
    }
    return true;
}

// The image as text when it is PTX (a cubin or fatbin is binary: empty).
std::string ptx_text(const void *image, const char *path) {
    std::string text;
    if (path) {
        std::ifstream f(path, std::ios::binary);
        text.assign(std::istreambuf_iterator<char>(f), std::istreambuf_iterator<char>());
    } else {
        const unsigned char *p = static_cast<const unsigned char *>(image);
        bool binary = (p[0] == 0x7f && p[1] == 'E') ||                                // ELF cubin
                      (p[0] == 0x50 && p[1] == 0xed && p[2] == 0x55 && p[3] == 0xba) ||   // fatbin
                      (p[0] == 0xb1 && p[1] == 0x43 && p[2] == 0x62 && p[3] == 0x46);     // fatbin wrapper
        if (!binary) text = static_cast<const char *>(image);                          // PTX: NUL-terminated
    }
    return text.find(".version") != std::string::npos && text.find(".target") != std::string::npos ? text
                                                                                                     : std::string();
}

CUresult load_module(Module **out, bool library, const void *image, const char *path) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (path) {
        int fd = open(path, O_RDONLY | O_CLOEXEC);
        if (fd < 0) return CUDA_ERROR_FILE_NOT_FOUND;
        close(fd);
    } else if (!image) {
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::vector<Global> globals;
    if (!ptx_globals(ptx_text(image, path), &globals)) return CUDA_ERROR_INVALID_PTX;
    std::lock_guard<std::mutex> lk(g_mu);
    Context *c = nullptr;
    if (library) {
        CUresult rc = check_init();
        if (rc != CUDA_SUCCESS) return rc;
    } else {
        CUresult rc = get_context(&c);
        if (rc != CUDA_SUCCESS) return rc;
    }
    // The globals take device memory now, in the module's context.
    Context *owner = library ? current_context() : c;
    for (Global &g : globals) {
        Alloc *a;
        CUresult rc = owner ? alloc_block(owner, g.size, &a) : CUDA_SUCCESS;
        if (rc != CUDA_SUCCESS) {
            for (const Global &done : globals)
                if (done.base) free_block(done.base);
            return rc;
        }
        if (owner) g.base = a->base;
    }
    *out = new_module(c, library);
    (*out)->globals = std::move(globals);
    return CUDA_SUCCESS;
}

// Argument i of the launch: through kernelParams, or packed in the `extra`
// buffer at its natural alignment.
template <typename T>
bool arg(void **params, void **extra, size_t offset, int index, T *out) {
    if (params) {
        if (!params[index]) return false;
        memcpy(out, params[index], sizeof(T));
        return true;
    }
    if (!extra) return false;
    const char *buf = nullptr;
    size_t size = 0;
    for (int i = 0; extra[i] != CU_LAUNCH_PARAM_END; i += 2) {
        if (extra[i] == CU_LAUNCH_PARAM_BUFFER_POINTER) buf = static_cast<const char *>(extra[i + 1]);
        else if (extra[i] == CU_LAUNCH_PARAM_BUFFER_SIZE) size = *static_cast<size_t *>(extra[i + 1]);
        else return false;
    }
    if (!buf || offset + sizeof(T) > size) return false;
    memcpy(out, buf + offset, sizeof(T));
    return true;
}

CUresult launch(CUfunction hf, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz,
                unsigned smem, CUstream hs, void **params, void **extra, bool pt) {
    count_call(Call::Launch);
    std::unique_lock<std::mutex> lk(g_mu);
    CUresult rc = check_init();
    if (rc != CUDA_SUCCESS) return rc;
    if (!current_context()) return CUDA_ERROR_INVALID_CONTEXT;
    Stream *s;
    rc = resolve_stream(hs, pt, &s);
    if (rc != CUDA_SUCCESS) return rc;
    Context *c = s->ctx;
    if (c->sticky) return c->sticky;
    rc = capture_check(s);
    if (rc != CUDA_SUCCESS) return rc;
    const unsigned dims[6] = {gx, gy, gz, bx, by, bz};
    Op op;
    rc = kernel_op(hf, dims, params, extra, c, &op);
    if (rc != CUDA_SUCCESS) return rc;
    engine_enqueue(lk, s, std::move(op));
    return CUDA_SUCCESS;
}

CUresult launch_ex(const CUlaunchConfig *cfg, CUfunction f, void **params, void **extra, bool pt) {
    if (!cfg) {
        count_call(Call::Launch);   // launch() counts the others
        return CUDA_ERROR_INVALID_VALUE;
    }
    return launch(f, cfg->gridDimX, cfg->gridDimY, cfg->gridDimZ, cfg->blockDimX, cfg->blockDimY, cfg->blockDimZ,
                  cfg->sharedMemBytes, cfg->hStream, params, extra, pt);
}

}  // namespace

CUresult kernel_op(CUfunction hf, const unsigned dims[6], void **params, void **extra, Context *c, Op *out) {
    Function *f = reinterpret_cast<Function *>(hf);
    if (!g_functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    unsigned gx = dims[0], gy = dims[1], gz = dims[2], bx = dims[3], by = dims[4], bz = dims[5];
    if (!gx || !gy || !gz || !bx || !by || !bz || (uint64_t)bx * by * bz > 1024 || bz > 64 || gy > 65535 ||
        gz > 65535)
        return CUDA_ERROR_INVALID_VALUE;
    if ((params == nullptr) == (extra == nullptr)) return CUDA_ERROR_INVALID_VALUE;
    Op op{Op::Kernel, 0, 0, nullptr, nullptr};
    if (f->id == KernelId::Spin) {
        unsigned long long ns;
        if (!arg(params, extra, 0, 0, &ns)) return CUDA_ERROR_INVALID_VALUE;
        op.dur = ns;
    } else {
        unsigned long long dst, count;
        unsigned value;
        if (!arg(params, extra, 0, 0, &dst) || !arg(params, extra, 8, 1, &value) ||
            !arg(params, extra, 16, 2, &count))
            return CUDA_ERROR_INVALID_VALUE;
        op.dur = kFillOverheadNs + (uint64_t)((double)count * 4 / kFillBytesPerNs);
        op.action = [c, dst, value, count] {
            if (count == 0) return;
            unsigned *p = static_cast<unsigned *>(translate(dst, count * 4));
            if (!p || count > (1ull << 61)) {
                c->sticky = CUDA_ERROR_ILLEGAL_ADDRESS;
                return;
            }
            std::fill(p, p + count, value);
        };
    }
    *out = std::move(op);
    return CUDA_SUCCESS;
}

}  // namespace sim

using namespace sim;

// --- modules -------------------------------------------------------------------------

SIM_API CUresult cuModuleLoad(CUmodule *m, const char *fname) {
    if (!fname) return CUDA_ERROR_INVALID_VALUE;
    return load_module(reinterpret_cast<Module **>(m), false, nullptr, fname);
}
SIM_API CUresult cuModuleLoadData(CUmodule *m, const void *image) {
    return load_module(reinterpret_cast<Module **>(m), false, image, nullptr);
}
SIM_API CUresult cuModuleLoadDataEx(CUmodule *m, const void *image, unsigned int n, CUjit_option *o, void **v) {
    return load_module(reinterpret_cast<Module **>(m), false, image, nullptr);
}
SIM_API CUresult cuModuleLoadFatBinary(CUmodule *m, const void *fatCubin) {
    return load_module(reinterpret_cast<Module **>(m), false, fatCubin, nullptr);
}

SIM_API CUresult cuModuleUnload(CUmodule hmod) {
    std::lock_guard<std::mutex> lk(g_mu);
    Module *m = reinterpret_cast<Module *>(hmod);
    if (!g_modules.count(m) || m->is_library) return CUDA_ERROR_INVALID_HANDLE;
    drop_module(m);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuModuleGetFunction(CUfunction *hfunc, CUmodule hmod, const char *name) {
    if (!hfunc || !name) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Module *m = reinterpret_cast<Module *>(hmod);
    if (!g_modules.count(m)) return CUDA_ERROR_INVALID_HANDLE;
    Function *f = lookup(m, name);
    if (!f) return CUDA_ERROR_NOT_FOUND;
    *hfunc = reinterpret_cast<CUfunction>(f);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuModuleGetFunctionCount(unsigned int *count, CUmodule hmod) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!count || !g_modules.count(reinterpret_cast<Module *>(hmod))) return CUDA_ERROR_INVALID_VALUE;
    *count = 2;
    return CUDA_SUCCESS;
}

SIM_API CUresult cuModuleGetGlobal_v2(CUdeviceptr *dptr, size_t *bytes, CUmodule hmod, const char *name) {
    if (!name) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Module *m = reinterpret_cast<Module *>(hmod);
    if (!g_modules.count(m)) return CUDA_ERROR_INVALID_HANDLE;
    for (const Global &g : m->globals) {
        if (g.name != name || !g.base) continue;
        if (dptr) *dptr = g.base;
        if (bytes) *bytes = g.size;
        return CUDA_SUCCESS;
    }
    return CUDA_ERROR_NOT_FOUND;
}

SIM_API CUresult cuModuleGetLoadingMode(CUmoduleLoadingMode *mode) {
    if (!mode) return CUDA_ERROR_INVALID_VALUE;
    *mode = CU_MODULE_EAGER_LOADING;
    return CUDA_SUCCESS;
}

// --- libraries (context-independent; a CUkernel is also a valid CUfunction) -------------

SIM_API CUresult cuLibraryLoadData(CUlibrary *lib, const void *code, CUjit_option *jo, void **jv, unsigned int nj,
                                   CUlibraryOption *lo, void **lv, unsigned int nl) {
    return load_module(reinterpret_cast<Module **>(lib), true, code, nullptr);
}
SIM_API CUresult cuLibraryLoadFromFile(CUlibrary *lib, const char *file, CUjit_option *jo, void **jv,
                                       unsigned int nj, CUlibraryOption *lo, void **lv, unsigned int nl) {
    if (!file) return CUDA_ERROR_INVALID_VALUE;
    return load_module(reinterpret_cast<Module **>(lib), true, nullptr, file);
}
SIM_API CUresult cuLibraryUnload(CUlibrary lib) {
    std::lock_guard<std::mutex> lk(g_mu);
    Module *m = reinterpret_cast<Module *>(lib);
    if (!g_modules.count(m) || !m->is_library) return CUDA_ERROR_INVALID_HANDLE;
    drop_module(m);
    return CUDA_SUCCESS;
}
SIM_API CUresult cuLibraryGetKernel(CUkernel *k, CUlibrary lib, const char *name) {
    if (!k || !name) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> lk(g_mu);
    Module *m = reinterpret_cast<Module *>(lib);
    if (!g_modules.count(m)) return CUDA_ERROR_INVALID_HANDLE;
    Function *f = lookup(m, name);
    if (!f) return CUDA_ERROR_NOT_FOUND;
    *k = reinterpret_cast<CUkernel>(f);
    return CUDA_SUCCESS;
}
SIM_API CUresult cuLibraryGetModule(CUmodule *mod, CUlibrary lib) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!mod || !g_modules.count(reinterpret_cast<Module *>(lib))) return CUDA_ERROR_INVALID_VALUE;
    *mod = reinterpret_cast<CUmodule>(lib);
    return CUDA_SUCCESS;
}
SIM_API CUresult cuLibraryGetKernelCount(unsigned int *count, CUlibrary lib) {
    return cuModuleGetFunctionCount(count, reinterpret_cast<CUmodule>(lib));
}
SIM_API CUresult cuKernelGetFunction(CUfunction *f, CUkernel k) {
    std::lock_guard<std::mutex> lk(g_mu);
    if (!f || !g_functions.count(reinterpret_cast<Function *>(k))) return CUDA_ERROR_INVALID_HANDLE;
    if (!current_context()) return CUDA_ERROR_INVALID_CONTEXT;
    *f = reinterpret_cast<CUfunction>(k);
    return CUDA_SUCCESS;
}
SIM_API CUresult cuKernelGetName(const char **name, CUkernel k) {
    std::lock_guard<std::mutex> lk(g_mu);
    Function *f = reinterpret_cast<Function *>(k);
    if (!name || !g_functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    *name = f->name;
    return CUDA_SUCCESS;
}

// --- functions ---------------------------------------------------------------------------

SIM_API CUresult cuFuncGetName(const char **name, CUfunction hfunc) {
    return cuKernelGetName(name, reinterpret_cast<CUkernel>(hfunc));
}

SIM_API CUresult cuFuncGetModule(CUmodule *mod, CUfunction hfunc) {
    std::lock_guard<std::mutex> lk(g_mu);
    Function *f = reinterpret_cast<Function *>(hfunc);
    if (!mod || !g_functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    *mod = reinterpret_cast<CUmodule>(f->mod);
    return CUDA_SUCCESS;
}

SIM_API CUresult cuFuncGetAttribute(int *pi, CUfunction_attribute attrib, CUfunction hfunc) {
    std::lock_guard<std::mutex> lk(g_mu);
    Function *f = reinterpret_cast<Function *>(hfunc);
    if (!pi) return CUDA_ERROR_INVALID_VALUE;
    if (!g_functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    switch (attrib) {
    case CU_FUNC_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *pi = 1024; break;
    case CU_FUNC_ATTRIBUTE_NUM_REGS: *pi = 16; break;
    case CU_FUNC_ATTRIBUTE_PTX_VERSION:
    case CU_FUNC_ATTRIBUTE_BINARY_VERSION: *pi = 90; break;
    case CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES: *pi = f->max_dynamic_smem; break;
    case CU_FUNC_ATTRIBUTE_PREFERRED_SHARED_MEMORY_CARVEOUT: *pi = -1; break;
    default: *pi = 0; break;
    }
    return CUDA_SUCCESS;
}

SIM_API CUresult cuFuncSetAttribute(CUfunction hfunc, CUfunction_attribute attrib, int value) {
    std::lock_guard<std::mutex> lk(g_mu);
    Function *f = reinterpret_cast<Function *>(hfunc);
    if (!g_functions.count(f)) return CUDA_ERROR_INVALID_HANDLE;
    if (attrib == CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES) {
        if (value < 0 || value > 232448) return CUDA_ERROR_INVALID_VALUE;
        f->max_dynamic_smem = value;
    }
    return CUDA_SUCCESS;
}

SIM_API CUresult cuFuncSetCacheConfig(CUfunction hfunc, CUfunc_cache config) {
    std::lock_guard<std::mutex> lk(g_mu);
    return g_functions.count(reinterpret_cast<Function *>(hfunc)) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_HANDLE;
}

SIM_API CUresult cuFuncIsLoaded(CUfunctionLoadingState *state, CUfunction hfunc) {
    if (!state) return CUDA_ERROR_INVALID_VALUE;
    *state = CU_FUNCTION_LOADING_STATE_LOADED;
    return CUDA_SUCCESS;
}
SIM_API CUresult cuFuncLoad(CUfunction hfunc) { return CUDA_SUCCESS; }

SIM_API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int *n, CUfunction f, int blockSize,
                                                                      size_t smem, unsigned int flags) {
    if (!n || blockSize <= 0 || blockSize > 1024) return CUDA_ERROR_INVALID_VALUE;
    *n = std::min(32, 2048 / blockSize);
    return CUDA_SUCCESS;
}
SIM_API CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int *n, CUfunction f, int blockSize, size_t smem) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(n, f, blockSize, smem, 0);
}
SIM_API CUresult cuOccupancyMaxPotentialBlockSizeWithFlags(int *minGrid, int *blockSize, CUfunction f,
                                                           CUoccupancyB2DSize cb, size_t smem, int limit,
                                                           unsigned int flags) {
    if (!minGrid || !blockSize) return CUDA_ERROR_INVALID_VALUE;
    *blockSize = limit > 0 && limit < 1024 ? limit : 1024;
    *minGrid = g_cfg.sms * std::max(1, 2048 / *blockSize);
    return CUDA_SUCCESS;
}
SIM_API CUresult cuOccupancyMaxPotentialBlockSize(int *minGrid, int *blockSize, CUfunction f, CUoccupancyB2DSize cb,
                                                  size_t smem, int limit) {
    return cuOccupancyMaxPotentialBlockSizeWithFlags(minGrid, blockSize, f, cb, smem, limit, 0);
}

// --- launches ----------------------------------------------------------------------------

SIM_API CUresult cuLaunchKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz, unsigned int bx,
                                unsigned int by, unsigned int bz, unsigned int smem, CUstream s, void **params,
                                void **extra) {
    return launch(f, gx, gy, gz, bx, by, bz, smem, s, params, extra, false);
}
SIM_API CUresult cuLaunchKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                     unsigned int bx, unsigned int by, unsigned int bz, unsigned int smem,
                                     CUstream s, void **params, void **extra) {
    return launch(f, gx, gy, gz, bx, by, bz, smem, s, params, extra, true);
}
SIM_API CUresult cuLaunchKernelEx(const CUlaunchConfig *cfg, CUfunction f, void **params, void **extra) {
    return launch_ex(cfg, f, params, extra, false);
}
SIM_API CUresult cuLaunchKernelEx_ptsz(const CUlaunchConfig *cfg, CUfunction f, void **params, void **extra) {
    return launch_ex(cfg, f, params, extra, true);
}
SIM_API CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                           unsigned int bx, unsigned int by, unsigned int bz, unsigned int smem,
                                           CUstream s, void **params) {
    return launch(f, gx, gy, gz, bx, by, bz, smem, s, params, nullptr, false);
}
SIM_API CUresult cuLaunchCooperativeKernel_ptsz(CUfunction f, unsigned int gx, unsigned int gy, unsigned int gz,
                                                unsigned int bx, unsigned int by, unsigned int bz,
                                                unsigned int smem, CUstream s, void **params) {
    return launch(f, gx, gy, gz, bx, by, bz, smem, s, params, nullptr, true);
}
