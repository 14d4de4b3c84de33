// fracgpu._native: the C units parser, and what this build was made with.
//
// The Python package parses sizes and shares with the same C code the shim
// uses for FRACGPU_* variables, so a value accepted on the command line is
// read the same way inside every job.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "fracgpu/units.h"

namespace py = pybind11;

namespace {

constexpr size_t kErrLen = 512;

// The C parser stops at a NUL, so "1GiB\0junk" would pass as "1GiB".
void reject_nul(const std::string &text, const char *what) {
  if (text.find('\0') != std::string::npos)
    throw py::value_error(std::string("invalid ") + what + ": it contains a NUL character");
}

py::tuple parse_size(const std::string &text) {
  reject_nul(text, "size");
  uint64_t bytes = 0;
  double fraction = 0.0;
  char err[kErrLen] = "";
  if (fracgpu_parse_size(text.c_str(), &bytes, &fraction, err, sizeof err) != 0)
    throw py::value_error(err);
  return py::make_tuple(bytes, fraction);
}

double parse_share(const std::string &text) {
  reject_nul(text, "share");
  double share = 0.0;
  char err[kErrLen] = "";
  if (fracgpu_parse_share(text.c_str(), &share, err, sizeof err) != 0) throw py::value_error(err);
  return share;
}

std::string format_size(uint64_t bytes) {
  char buf[64];
  size_t n = fracgpu_format_size(bytes, buf, sizeof buf);
  return std::string(buf, n < sizeof buf ? n : sizeof buf - 1);
}

std::string format_share(double share) {
  char buf[64];
  size_t n = fracgpu_format_share(share, buf, sizeof buf);
  if (n == 0) throw py::value_error("format_share: the share must be a finite number >= 0");
  return std::string(buf, n < sizeof buf ? n : sizeof buf - 1);
}

py::dict build_info() {
  py::dict info;
  info["have_fatbin"] = static_cast<bool>(FRACGPU_HAVE_FATBIN);
  info["cuda_header_version"] = static_cast<int>(FRACGPU_CUDA_HEADER_VERSION);
  return info;
}

}  // namespace

PYBIND11_MODULE(_native, m) {
  m.doc() = "fracgpu native core: sizes and shares, build information";
  m.def("parse_size", &parse_size, py::arg("text"),
        "Parse '4GiB', '512MiB', '4GB', '1048576' or '25%'. Returns (bytes, fraction): "
        "(n, 0.0) for a size, (0, f) for a percentage of the device. Raises ValueError.");
  m.def("parse_share", &parse_share, py::arg("text"),
        "Parse '25%' or '0.25' to a fraction in (0, 1]. Raises ValueError.");
  m.def("format_size", &format_size, py::arg("bytes"),
        "Write bytes as people do: 268435456 -> '256MiB', 1610612736 -> '1.5GiB'.");
  m.def("format_share", &format_share, py::arg("share"), "Write a share as a percentage: 0.25 -> '25%'.");
  m.def("build_info", &build_info,
        "What this build was made with: {'have_fatbin': bool, 'cuda_header_version': int}.");
}
