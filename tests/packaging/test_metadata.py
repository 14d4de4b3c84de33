"""What a package index and a user read of the package, and what CI runs: the
licence declared and shipped, classifiers and project URLs, the build backend
that can write them, the `gpu-test` extra, and `.ci/run` running the README's
set-up commands in a fresh virtual environment. Read from the installed
package's metadata (as pip and PyPI read it) and from the checkout."""

from __future__ import annotations

import re
from importlib.metadata import metadata

from tests.support import ROOT

META = metadata("fracgpu")


def requirement_floor(text: str, name: str) -> tuple[int, ...]:
    """The ``>=`` version of requirement ``name`` in ``text`` (a list of requirement strings)."""
    match = re.search(rf'"{re.escape(name)}>=([0-9.]+)', text)
    assert match, f"{name} has no >= floor"
    return tuple(int(part) for part in match.group(1).split("."))


def test_the_declared_licence_is_the_one_shipped():
    assert META["License-Expression"] == "Apache-2.0"
    assert META.get_all("License-File") == ["LICENSE"]
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    # PEP 639: with a licence expression, no licence classifier may be given beside it.
    assert not [c for c in META.get_all("Classifier") if c.startswith("License ::")]


def test_classifiers_and_project_urls_are_declared():
    classifiers = set(META.get_all("Classifier"))
    assert {"Operating System :: POSIX :: Linux", "Programming Language :: Python :: 3",
            "Environment :: GPU :: NVIDIA CUDA :: 13"} <= classifiers
    supported = {c.rsplit(" :: ", 1)[1] for c in classifiers if re.fullmatch(r"Programming Language :: Python :: 3\.\d+", c)}
    assert supported == {"3.10", "3.11", "3.12", "3.13"}   # requires-python >=3.10, and cibuildwheel's builds
    urls = dict(entry.split(", ", 1) for entry in META.get_all("Project-URL"))
    assert {"Homepage", "Source", "Issues"} <= set(urls) and all(u.startswith("https://") for u in urls.values())


def test_the_build_backend_floor_writes_the_licence_field():
    # scikit-build-core 0.11 is the first to write PEP 639's License-Expression and License-File.
    pyproject = (ROOT / "pyproject.toml").read_text()
    build_system = pyproject.split("[build-system]", 1)[1].split("\n[", 1)[0]
    assert requirement_floor(build_system, "scikit-build-core") >= (0, 11)
    assert META["Metadata-Version"] >= "2.4"


def test_the_gpu_test_extra_brings_the_frameworks_of_the_gpu_tests():
    assert "gpu-test" in META.get_all("Provides-Extra")
    extra = [r.split(";")[0].strip() for r in META.get_all("Requires-Dist") if 'extra == "gpu-test"' in r]
    names = {re.split(r"[\[<>=~! ]", r, maxsplit=1)[0] for r in extra}
    assert {"torch", "fracgpu"} <= names and any(n.startswith("cupy-cuda") for n in names), extra


def readme_setup_commands() -> list[str]:
    """The README's two set-up commands: install and run the demo, install the tests and run them."""
    setup = (ROOT / "README.md").read_text().split("## Set up", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```sh\n(.*?)```", setup, re.S)
    lines = [line.strip() for block in blocks for line in block.splitlines()]
    commands = [line for line in lines if line.startswith("pip install") and line.endswith(("&& fracgpu demo",
                                                                                            "&& python -m pytest"))]
    assert len(commands) == 2, lines
    return commands


def test_ci_runs_the_readmes_two_commands_in_a_fresh_virtual_environment():
    script = (ROOT / ".ci" / "run").read_text()
    lines = [line.split("#", 1)[0].strip() for line in script.splitlines()]
    made = next(i for i, line in enumerate(lines) if re.search(r"-m venv \"?\$venv\"?$", line))
    activated = next(i for i, line in enumerate(lines) if re.fullmatch(r'source "?\$venv/bin/activate"?', line))
    assert made < activated, "the fresh environment is made, then used"
    assert "--system-site-packages" not in script
    for command in readme_setup_commands():   # each as written, after the environment is active
        as_written = re.compile(re.escape(command) + r"(?=\)|\s*$|\s*2>|\s*\|)")   # nothing added to it
        at = next((i for i, line in enumerate(lines) if as_written.search(line)), None)
        assert at is not None and at > activated, f"{command!r} is not run in the fresh environment"
    assert "FRACGPU_SANITIZE=ON" in script and "FRACGPU_TSAN=ON" in script   # then the native suites
