# The CUDA kernels (cuda/fracgpu_kernels.cu): a fatbin built with nvcc.
#
# Included from CMakeLists.txt. Uses Python_EXECUTABLE and CMAKE_CXX_COMPILER;
# sets FRACGPU_HAVE_FATBIN (0/1) and FATBIN (the fatbin's path when built).
#
# nvcc is looked for in FRACGPU_NVCC (a cache path), $CUDA_HOME/bin, the
# nvidia-cuda-nvcc wheel (a build requirement, so every wheel has one), PATH
# and /usr/local/cuda/bin. The architectures are FRACGPU_CUDA_ARCHS, the
# wanted ones, intersected with what this nvcc can build (`nvcc
# --list-gpu-code`), so an older nvcc (CUDA 12.0-12.7 has no 100 or 120) still
# builds; the newest one is also embedded as PTX, which the driver compiles for
# newer GPUs.

set(FRACGPU_CUDA_ARCHS "75;80;86;89;90;100;120" CACHE STRING
    "GPU architectures wanted in the kernel fatbin (those this nvcc cannot build are left out; PTX of the newest is embedded too)")
if(SKBUILD)
  set(_require_default ON)
else()
  set(_require_default OFF)
endif()
option(FRACGPU_REQUIRE_KERNELS "Fail the build when no usable nvcc is found (ON for wheels)" ${_require_default})

set(_nvcc_hints)
if(DEFINED ENV{CUDA_HOME})
  list(APPEND _nvcc_hints "$ENV{CUDA_HOME}/bin")
endif()
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import importlib.util,os\ns=importlib.util.find_spec('nvidia')\nprint(';'.join(os.path.join(d,v,'bin') for d in (s.submodule_search_locations if s else []) for v in ('cu13','cuda_nvcc')))"
  OUTPUT_VARIABLE _wheel_bins OUTPUT_STRIP_TRAILING_WHITESPACE)
list(APPEND _nvcc_hints ${_wheel_bins} /usr/local/cuda/bin)
find_program(FRACGPU_NVCC nvcc HINTS ${_nvcc_hints})

# What this nvcc can build: real architectures (sm_XX) from --list-gpu-code.
# Architecture-specific variants (sm_90a, sm_100f) are not used: they do not
# run on later GPUs.
set(_nvcc_problem "")
set(_archs)
if(NOT FRACGPU_NVCC)
  set(_nvcc_problem "nvcc not found (looked in \$CUDA_HOME/bin, the nvidia-cuda-nvcc wheel, PATH, /usr/local/cuda/bin)")
else()
  execute_process(COMMAND "${FRACGPU_NVCC}" --list-gpu-code
    OUTPUT_VARIABLE _codes ERROR_VARIABLE _codes_err RESULT_VARIABLE _rc)
  if(NOT _rc EQUAL 0)
    string(STRIP "${_codes_err}" _codes_err)
    set(_nvcc_problem "${FRACGPU_NVCC} does not run (`nvcc --list-gpu-code` failed: ${_codes_err})")
  else()
    string(REGEX MATCHALL "sm_[0-9]+\n" _codes "${_codes}\n")
    string(REGEX REPLACE "sm_([0-9]+)\n" "\\1" _supported "${_codes}")
    foreach(arch IN LISTS FRACGPU_CUDA_ARCHS)
      if(arch IN_LIST _supported)
        list(APPEND _archs ${arch})
      endif()
    endforeach()
    if(NOT _archs)
      set(_nvcc_problem "${FRACGPU_NVCC} builds none of FRACGPU_CUDA_ARCHS (${FRACGPU_CUDA_ARCHS}); it builds sm ${_supported}")
    endif()
  endif()
endif()

set(FRACGPU_HAVE_FATBIN 0)
if(_nvcc_problem)
  set(_what "fracgpu: no usable nvcc: ${_nvcc_problem}. Install the CUDA compiler with "
    "'pip install \"nvidia-cuda-nvcc>=13,<14\"' (a build requirement: pip installs it for 'pip install .'), "
    "or set CUDA_HOME to a CUDA toolkit")
  if(FRACGPU_REQUIRE_KERNELS)
    message(FATAL_ERROR ${_what} ". A wheel without the kernels cannot run on a real GPU; "
      "to build one anyway (the simulated GPU does not need them) pass -DFRACGPU_REQUIRE_KERNELS=OFF "
      "(pip: --config-settings=cmake.define.FRACGPU_REQUIRE_KERNELS=OFF).")
  endif()
  message(WARNING ${_what} ". Building without the CUDA kernel fatbin: fracgpu.kernels_path() will say so; "
    "the simulated GPU does not need it.")
  return()
endif()

list(GET _archs -1 _newest)
set(_gencode)
foreach(arch IN LISTS _archs)
  list(APPEND _gencode "-gencode=arch=compute_${arch},code=sm_${arch}")
endforeach()
list(APPEND _gencode "-gencode=arch=compute_${_newest},code=compute_${_newest}")
set(FATBIN "${CMAKE_CURRENT_BINARY_DIR}/fracgpu_kernels.fatbin")
add_custom_command(OUTPUT "${FATBIN}"
  COMMAND "${FRACGPU_NVCC}" -ccbin "${CMAKE_CXX_COMPILER}" -fatbin ${_gencode} -o "${FATBIN}"
          "${CMAKE_CURRENT_SOURCE_DIR}/cuda/fracgpu_kernels.cu"
  DEPENDS cuda/fracgpu_kernels.cu
  COMMENT "Compiling the CUDA kernels to a fatbin with ${FRACGPU_NVCC}" VERBATIM)
add_custom_target(fracgpu_kernels ALL DEPENDS "${FATBIN}")
set(FRACGPU_HAVE_FATBIN 1)
set(_skipped ${FRACGPU_CUDA_ARCHS})
list(REMOVE_ITEM _skipped ${_archs})
if(_skipped)
  set(_skipped " (this nvcc cannot build ${_skipped})")
endif()
message(STATUS "fracgpu: building the kernel fatbin with ${FRACGPU_NVCC} for sm ${_archs}, "
  "PTX ${_newest}${_skipped}")
