# NVML: the shim's libnvidia-ml.so.1 (libfracgpu-nvml.so) and the simulated GPU's.
#
# Included from CMakeLists.txt after the shim target. Uses FRACGPU_CUDA_INCLUDE,
# GEN_DIR, FRACGPU_WARNINGS, fracgpu_generate and the targets fracgpu_common
# and cuda_sim.

set(FRACGPU_NVML_INCLUDE "${FRACGPU_CUDA_INCLUDE}" CACHE PATH "Folder holding nvml.h (next to cuda.h by default)")
if(NOT EXISTS "${FRACGPU_NVML_INCLUDE}/nvml.h")
  message(STATUS "fracgpu: no nvml.h in ${FRACGPU_NVML_INCLUDE}: building without the NVML shim and the "
    "simulated NVML (install the build requirement 'nvidia-nvml-dev', or set FRACGPU_NVML_INCLUDE)")
  return()
endif()
message(STATUS "fracgpu: NVML header from ${FRACGPU_NVML_INCLUDE}")

# ---------------------------------------------------------------------------
# Generated NVML tables (never committed: made from nvml.h here)
# ---------------------------------------------------------------------------
fracgpu_generate(NVML_GEN nvml gen_nvml_api.py "${FRACGPU_NVML_INCLUDE}" "nvml.h"
  MODES forwarders sim-stubs errors names INC errors
  DEPENDS "${PROJECT_SOURCE_DIR}/csrc/gen/gen_cuda_api.py" "${FRACGPU_NVML_INCLUDE}/nvml.h")
add_custom_target(fracgpu_nvml_names ALL DEPENDS "${NVML_GEN_names}")

# Only NVML functions are exported (not the C++ runtime's template instances).
file(WRITE "${GEN_DIR}/nvml_exports.map" "{ global: nvml*; local: *; };\n")

# ---------------------------------------------------------------------------
# The NVML shim: libfracgpu-nvml.so, SONAME libnvidia-ml.so.1, every NVML
# function exported (memory info hooked in csrc/shim/nvml, the rest forwarded)
# ---------------------------------------------------------------------------
add_library(fracgpu_nvml_shim SHARED csrc/shim/nvml/nvml_shim.cpp "${NVML_GEN_forwarders}" "${NVML_GEN_errors}")
set_target_properties(fracgpu_nvml_shim PROPERTIES OUTPUT_NAME "fracgpu-nvml" NO_SONAME ON)
target_include_directories(fracgpu_nvml_shim PRIVATE "${FRACGPU_NVML_INCLUDE}" "${GEN_DIR}" csrc/shim/nvml)
target_compile_options(fracgpu_nvml_shim PRIVATE ${FRACGPU_WARNINGS}
  $<$<COMPILE_LANGUAGE:CXX>:-fno-exceptions>)
# -Bsymbolic: the shim's own references bind to its own functions, whatever
# else is loaded (the real NVML is RTLD_LOCAL and exports the same names).
target_link_options(fracgpu_nvml_shim PRIVATE -Wl,-soname,libnvidia-ml.so.1 -Wl,-Bsymbolic -Wl,--no-undefined
  "-Wl,--version-script=${GEN_DIR}/nvml_exports.map")
target_link_libraries(fracgpu_nvml_shim PRIVATE fracgpu_common Threads::Threads ${CMAKE_DL_LIBS})

# ---------------------------------------------------------------------------
# The simulated GPU's NVML: libnvidia-ml.so.1 next to the simulated
# libcuda.so.1, asking it (fracgpu_sim_device_info) what to report
# ---------------------------------------------------------------------------
add_library(nvml_sim SHARED csrc/sim/nvml/sim_nvml.cpp "${NVML_GEN_sim_stubs}" "${NVML_GEN_errors}")
set_target_properties(nvml_sim PROPERTIES OUTPUT_NAME "nvidia-ml" PREFIX "lib" SUFFIX ".so.1" NO_SONAME ON)
target_include_directories(nvml_sim PRIVATE "${FRACGPU_NVML_INCLUDE}" "${GEN_DIR}" csrc/sim csrc/include)
target_compile_options(nvml_sim PRIVATE ${FRACGPU_WARNINGS}
  $<$<COMPILE_LANGUAGE:CXX>:-fno-exceptions>)
target_link_options(nvml_sim PRIVATE -Wl,-soname,libnvidia-ml.so.1 -Wl,-Bsymbolic -Wl,--no-undefined
  "-Wl,--version-script=${GEN_DIR}/nvml_exports.map")
target_link_libraries(nvml_sim PRIVATE Threads::Threads ${CMAKE_DL_LIBS})
# Built with the simulated driver, which it opens from its own folder.
add_dependencies(nvml_sim cuda_sim)

if(SKBUILD)
  install(TARGETS fracgpu_nvml_shim LIBRARY DESTINATION fracgpu/_shim)
  install(TARGETS nvml_sim LIBRARY DESTINATION fracgpu/_sim)
endif()
