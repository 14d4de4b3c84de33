#!/usr/bin/env python3
"""Generate the driver-API tables from the CUDA headers, at build time.

Why generated: libcuda exports ~680 entry points (counting the `_v2`/`_v3`
revisions and the `_ptds`/`_ptsz` per-thread-stream variants).  Both the
simulated driver and the shim must export every one of them under its real
name and type, and both must answer `cuGetProcAddress(name, version, flags)`
the way the real driver does.  Writing that list by hand goes stale with every
CUDA release; the headers already hold it:

* `cuda.h` preprocessed with `-D__CUDA_API_VERSION_INTERNAL` declares every
  exported symbol under its real name with its real parameter types.
* `cudaTypedefs.h` declares one `PFN_<api>_v<version>[_ptds|_ptsz]` type per
  revision of each API, where <version> is the CUDA version that introduced it.
  The revisions of one API, sorted by version, are its exported symbols sorted
  by suffix (`cuCtxCreate`, `cuCtxCreate_v2`, ... `_v4`); the per-thread
  revisions pair the same way with the `_ptds`/`_ptsz` symbols.  The generator
  checks that pairing and fails the build when a header breaks it.

Outputs (one per --mode):
  sim-stubs    C: a weak definition of every export returning
               CUDA_ERROR_NOT_SUPPORTED (the simulated driver's strong
               definitions replace the ones it implements).
  procaddr     C: the cuGetProcAddress table {api, version, per_thread, symbol,
               address-of-symbol}, sorted by api then version.
  forwarders   C: for every export, a weak forwarder calling the real driver's
               entry point through a lazily resolved table (for the shim).
  errors       C: {code, "CUDA_ERROR_NAME", "description"} for every CUresult
               (the description is the name in words, as the driver's are).
  names        text: one exported name per line (for tests and tools).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass

_PROTO = re.compile(r"\bCUresult\s+(cu\w+)\s*\(([^;{}]*?)\)\s*;", re.S)
_PFN = re.compile(r"typedef\s+CUresult\s*\(\s*\*\s*PFN_(cu\w+?)_v(\d+)(_ptds|_ptsz)?\s*\)\s*\(")
_SUFFIX = re.compile(r"^(cu\w+?)(?:_v(\d+))?(_ptds|_ptsz)?$")


@dataclass(frozen=True)
class Proto:
    name: str
    params: tuple[str, ...]  # each a full declaration with the parameter named a<i>

    @property
    def decl(self) -> str:
        return ", ".join(self.params) if self.params else "void"

    @property
    def args(self) -> str:
        return ", ".join(f"a{i}" for i in range(len(self.params)))


@dataclass(frozen=True)
class ProcEntry:
    api: str
    version: int
    per_thread: bool
    symbol: str


def preprocess(cc: str, include_dir: str, header: str, define: str = "__CUDA_API_VERSION_INTERNAL") -> str:
    """The header as the C preprocessor expands it, with ``define`` set (for cuda.h:
    every versioned name declared; also used by gen_nvml_api.py)."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "in.c")
        with open(src, "w") as f:
            f.write(f"#include <{header}>\n")
        cmd = [cc, "-E", "-P", f"-D{define}", "-I", include_dir, src]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            sys.exit(f"{os.path.basename(sys.argv[0])}: preprocessing {header} failed:\n{res.stderr}")
        return res.stdout


def _split_params(text: str) -> list[str]:
    out, depth, cur = [], 0, []
    for ch in text:
        if ch in "([":
            depth += 1
        elif ch in ")]":
            depth -= 1
        if ch == "," and depth == 0:
            out.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    out.append("".join(cur))
    return [" ".join(p.split()) for p in out]


def _rename_param(p: str, i: int, fn: str) -> str:
    fp = re.search(r"\(\s*\*\s*(\w+)\s*\)", p)
    if fp:
        return p[: fp.start(1)] + f"a{i}" + p[fp.end(1):]
    m = re.search(r"(\w+)\s*((?:\[[^\]]*\]\s*)*)$", p)
    if not m or len(p[: m.start(1)].strip()) == 0:
        sys.exit(f"gen_cuda_api: cannot find the parameter name in '{p}' of {fn}")
    return p[: m.start(1)] + f"a{i}" + (" " + m.group(2) if m.group(2) else "")


def parse_prototypes(pp: str) -> list[Proto]:
    seen: dict[str, Proto] = {}
    for m in _PROTO.finditer(pp):
        name, raw = m.group(1), m.group(2).strip()
        parts = [] if raw in ("", "void") else _split_params(raw)
        params = tuple(_rename_param(p, i, name) for i, p in enumerate(parts))
        proto = Proto(name, params)
        if name in seen and seen[name] != proto:
            sys.exit(f"gen_cuda_api: {name} is declared twice with different parameters")
        seen[name] = proto
    if len(seen) < 400:
        sys.exit(f"gen_cuda_api: found only {len(seen)} driver entry points; is this cuda.h?")
    return sorted(seen.values(), key=lambda p: p.name)


def _suffix_rank(symbol: str, api: str) -> int:
    m = _SUFFIX.match(symbol)
    assert m and m.group(1) == api
    return int(m.group(2) or 1)


def build_procaddr(protos: list[Proto], typedefs_pp: str) -> list[ProcEntry]:
    exported = {p.name for p in protos}
    revisions: dict[tuple[str, bool], set[int]] = {}
    for m in _PFN.finditer(typedefs_pp):
        revisions.setdefault((m.group(1), bool(m.group(3))), set()).add(int(m.group(2)))

    # Candidate symbols for each (api, per_thread): <api>[_vN][_ptds|_ptsz].
    symbols: dict[tuple[str, bool], list[str]] = {}
    for name in exported:
        for api, per_thread in _split_candidates(name):
            if (api, per_thread) in revisions:
                symbols.setdefault((api, per_thread), []).append(name)

    entries: list[ProcEntry] = []
    problems: list[str] = []
    for (api, per_thread), versions in sorted(revisions.items()):
        syms = sorted(symbols.get((api, per_thread), []), key=lambda s: _suffix_rank(s, api))
        vers = sorted(versions)
        if len(syms) != len(vers):
            problems.append(f"{api}{' (per-thread)' if per_thread else ''}: "
                            f"revisions {vers} but exported symbols {syms}")
            continue
        entries.extend(ProcEntry(api, v, per_thread, s) for v, s in zip(vers, syms))
    if problems:
        sys.exit("gen_cuda_api: cannot pair typedef revisions with exports:\n  " + "\n  ".join(problems))
    return entries


def _split_candidates(name: str):
    """(api, per_thread) pairs this exported name could be a revision of."""
    per_thread = name.endswith(("_ptds", "_ptsz"))
    base = name[:-5] if per_thread else name
    yield base, per_thread
    m = re.match(r"^(cu\w+?)_v(\d+)$", base)
    if m:
        yield m.group(1), per_thread


HEADER = "/* Generated by csrc/gen/gen_cuda_api.py from the CUDA headers. Do not edit. */\n"


def emit_sim_stubs(protos: list[Proto]) -> str:
    out = [HEADER, "#include <cuda.h>\n",
           "/* Weak: the simulated driver's own definitions take precedence at link time. */\n"]
    for p in protos:
        out.append(f"__attribute__((weak, visibility(\"default\"))) CUresult {p.name}({p.decl}) {{")
        for i in range(len(p.params)):
            out.append(f" (void)a{i};")
        out.append(" return CUDA_ERROR_NOT_SUPPORTED; }\n")
    return "".join(out)


def emit_procaddr(entries: list[ProcEntry]) -> str:
    out = [HEADER, "/* {api, version, per_thread, symbol, address}; sorted by api, then version. */\n"]
    for e in sorted(entries, key=lambda e: (e.api, e.per_thread, e.version)):
        out.append(f'PROC_ENTRY("{e.api}", {e.version}, {int(e.per_thread)}, "{e.symbol}", {e.symbol})\n')
    return "".join(out)


def error_codes(pp: str, enum: str, prefix: str, where: str) -> list[tuple[str, str]]:
    """(name, code) of each PREFIX_SUCCESS and PREFIX_ERROR_* value of ``enum`` in the preprocessed
    header ``pp``; exits naming ``where`` (the tool and header) when the enum is not there."""
    body = re.search(r"enum\s+" + enum + r"\s*\{(.*?)\}", pp, re.S)
    if not body:
        sys.exit(f"{where}: no {enum}")
    return re.findall(r"\b(" + prefix + r"_(?:SUCCESS|ERROR_\w+))\s*=\s*(\d+)", body.group(1))


def emit_errors(pp: str) -> str:
    out = [HEADER]
    for name, code in error_codes(pp, "cudaError_enum", "CUDA", "gen_cuda_api: cuda.h"):
        words = "no error" if name == "CUDA_SUCCESS" else name[len("CUDA_ERROR_"):].lower().replace("_", " ")
        out.append(f'ERROR_ENTRY({code}, "{name}", "{words}")\n')
    return "".join(out)


def emit_forwarders(protos: list[Proto]) -> str:
    out = [HEADER, "#include <cuda.h>\n", '#include "forward.h"\n\n',
           "enum {\n"]
    out += [f"  FWD_{p.name},\n" for p in protos]
    out.append("  FWD_COUNT\n};\n\n")
    out.append("const char *const fg_forward_names[FWD_COUNT] = {\n")
    out += [f'  "{p.name}",\n' for p in protos]
    out.append("};\n\n")
    # Each forwarder's real entry point, cached here once resolved (the real
    # driver is never unloaded): a forwarded call is one load and a jump.
    out.append("static void *fg_real[FWD_COUNT];\n\n"
               "static inline void *fg_real_of(unsigned idx) {\n"
               "  void *fn = __atomic_load_n(&fg_real[idx], __ATOMIC_ACQUIRE);\n"
               "  if (__builtin_expect(fn != 0, 1)) return fn;\n"
               "  fn = fg_forward_resolve(idx);\n"
               "  if (fn) __atomic_store_n(&fg_real[idx], fn, __ATOMIC_RELEASE);\n"
               "  return fn;\n}\n\n")
    for p in protos:
        args = p.args
        out.append(
            f"__attribute__((weak, visibility(\"default\"))) CUresult {p.name}({p.decl}) {{\n"
            f"  typedef CUresult (*fn_t)({p.decl});\n"
            f"  fn_t fn = (fn_t)fg_real_of(FWD_{p.name});\n"
            f"  if (!fn) return fg_forward_missing(FWD_{p.name});\n"
            f"  return fn({args});\n}}\n")
    out.append("const unsigned fg_forward_count = FWD_COUNT;\n")
    return "".join(out)


def write_output(path: str, text: str) -> None:
    """Write a generated file whole or not at all (a build stopped midway leaves no half file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--include", required=True, help="folder holding cuda.h and cudaTypedefs.h")
    ap.add_argument("--cc", default=os.environ.get("CC", "cc"), help="C compiler used to preprocess")
    ap.add_argument("--mode", required=True, choices=["sim-stubs", "procaddr", "forwarders", "errors", "names"])
    ap.add_argument("--out", required=True)
    ns = ap.parse_args(argv)

    cuda_h = preprocess(ns.cc, ns.include, "cuda.h")
    protos = parse_prototypes(cuda_h)
    if ns.mode == "errors":
        text = emit_errors(cuda_h)
    elif ns.mode == "sim-stubs":
        text = emit_sim_stubs(protos)
    elif ns.mode == "forwarders":
        text = emit_forwarders(protos)
    elif ns.mode == "names":
        text = "".join(p.name + "\n" for p in protos)
    else:
        entries = build_procaddr(protos, preprocess(ns.cc, ns.include, "cudaTypedefs.h"))
        text = emit_procaddr(entries)
    write_output(ns.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
