// Settings and the real driver: read once, on the first CUDA call of a
// process (a process that never uses CUDA loads no driver), through the
// loader both shims share (fracgpu/real_library.h).
#include "shim.h"
#include "fracgpu/error_text.h"

#include "fracgpu/job_settings.h"
#include "fracgpu/real_library.h"

namespace shim {

namespace {

Settings g_settings;
CUresult g_error = CUDA_ERROR_NOT_INITIALIZED;   // what calls return while the driver is not loaded

// Before the driver is opened: a job whose settings do not parse gets no CUDA.
bool read_settings() {
    std::string err;
    if (!fracgpu::read_job_settings(&g_settings, &err)) {
        log_event(kRefusedEvent, "%s; CUDA is refused in this process so that no job runs without its limits",
                  err.c_str());
        g_error = CUDA_ERROR_NOT_PERMITTED;
        return false;
    }
    if (!g_settings.notice.empty()) log("%s", g_settings.notice.c_str());
    g_error = CUDA_ERROR_NO_DEVICE;   // unless the driver opens
    return true;
}

constexpr fracgpu::RealLibrary kDriver = {
    "libcuda.so.1", FRACGPU_SETTING_REAL_LIBCUDA, "the real CUDA driver",
    "install the NVIDIA driver, set FRACGPU_REAL_LIBCUDA to its full path, or use the simulated GPU "
    "(eval \"$(fracgpu sim env)\")"};
fracgpu::RealLibraryLoader g_driver(kDriver, &fg_forward_count, read_settings);

}  // namespace

bool ensure_loaded() { return g_driver.ensure_loaded(); }
CUresult init_error() { return ensure_loaded() ? CUDA_SUCCESS : g_error; }
const Settings &settings() { return g_settings; }
void *real_handle() { return g_driver.handle(); }
void *real_symbol(const char *name, std::atomic<void *> &slot) { return g_driver.symbol(name, slot); }

}  // namespace shim

extern "C" void *fg_forward_resolve(unsigned idx) { return shim::g_driver.forwarded(idx, fg_forward_names); }

// Unloaded: why; loaded: the real driver predates this entry point.
extern "C" CUresult fg_forward_missing(unsigned idx) {
    (void)idx;
    return shim::missing_error();
}

// Error names and strings answer even when the real driver could not be
// loaded, so a client can say what went wrong (cuInit's refusal included).
namespace {
#define ERROR_ENTRY(code, name, text) {code, name, text},
const fracgpu::ErrorText kErrors[] = {
#include "cuda_errors.inc"
};
#undef ERROR_ENTRY

// Loaded: the real driver answers; else the table, so that a client can say
// why CUDA is refused.
template <typename Real>
CUresult describe(Real real, CUresult error, const char **pStr, const char *fracgpu::ErrorText::*field) {
    if (shim::ensure_loaded()) return real ? real(error, pStr) : shim::missing_error();
    if (!pStr) return CUDA_ERROR_INVALID_VALUE;
    return fracgpu::describe_error(kErrors, (int)error, field, pStr) ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
}  // namespace

SHIM_API CUresult cuGetErrorName(CUresult error, const char **pStr) {
    return describe(REAL(cuGetErrorName), error, pStr, &fracgpu::ErrorText::name);
}

SHIM_API CUresult cuGetErrorString(CUresult error, const char **pStr) {
    return describe(REAL(cuGetErrorString), error, pStr, &fracgpu::ErrorText::text);
}
