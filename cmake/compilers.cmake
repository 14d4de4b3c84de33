# The C and C++ compilers, found before they are enabled so that a machine
# without them gets an error naming what to install rather than CMake's
# generic "No CMAKE_C_COMPILER could be found". Included from CMakeLists.txt
# right after project(... LANGUAGES NONE).
include(CheckLanguage)
check_language(C)
check_language(CXX)
if(NOT CMAKE_C_COMPILER OR NOT CMAKE_CXX_COMPILER)
  set(_missing)
  if(NOT CMAKE_C_COMPILER)
    list(APPEND _missing "C")
  endif()
  if(NOT CMAKE_CXX_COMPILER)
    list(APPEND _missing "C++")
  endif()
  list(JOIN _missing " and " _missing)
  message(FATAL_ERROR "fracgpu: building from source needs a C and a C++ compiler, and no working "
    "${_missing} compiler was found (tried \$CC/\$CXX, then cc/gcc/clang and c++/g++/clang++ on PATH). "
    "Install one (Debian/Ubuntu: apt install build-essential; Fedora/RHEL: dnf install gcc gcc-c++; "
    "conda: conda install cxx-compiler) or point CC and CXX at it. "
    "A manylinux wheel of fracgpu needs no compiler at all.")
endif()
enable_language(C CXX)
