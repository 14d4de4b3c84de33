"""The library is a plain library: no module of it loads click or rich, and only the command line
(``fracgpu.cli``) is the command line. Each module is imported in a fresh interpreter, so what one
module pulls in cannot hide behind what another already loaded."""

import ast
import json
import pathlib
import subprocess
import sys

import fracgpu

PACKAGE = pathlib.Path(fracgpu.__file__).resolve().parent
LIBRARY = sorted(
    ".".join(("fracgpu", *path.relative_to(PACKAGE).with_suffix("").parts)).removesuffix(".__init__")
    for path in PACKAGE.rglob("*.py") if path.stem != "__main__" and path.relative_to(PACKAGE).parts[0] != "cli"
)
CLI_ONLY = {"click", "rich"}


def test_the_library_has_its_modules_and_the_jobs_that_exercise_a_node_their_own_package():
    for name in ("state", "partitions", "jobs", "snapshot", "ledger", "recorder", "metrics", "ray", "slurm", "sim",
                 "devices", "units", "plot", "settings", "in_process", "exercise.demo", "exercise.check"):
        assert f"fracgpu.{name}" in LIBRARY


def test_no_library_module_imports_click_or_rich():
    probe = ("import importlib, json, sys\n"
             "importlib.import_module(sys.argv[1])\n"
             "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in ('click', 'rich') "
             "or m.startswith('fracgpu.cli'))))")
    loaded = {}
    for module in LIBRARY:
        result = subprocess.run([sys.executable, "-c", probe, module], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, f"{module}: {result.stderr}"
        found = json.loads(result.stdout.strip().splitlines()[-1])
        if found:
            loaded[module] = found
    assert loaded == {}


def test_the_command_line_does_load_click():
    """The probe above can see click when it is loaded."""
    result = subprocess.run([sys.executable, "-c", "import sys, fracgpu.cli; print('click' in sys.modules)"],
                            capture_output=True, text=True, timeout=120)
    assert result.stdout.strip() == "True", result.stderr


def imported_modules(path: pathlib.Path) -> set[str]:
    """Every module ``path`` imports (absolute names; ``from fracgpu import cli`` is fracgpu.cli)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def test_nothing_outside_the_command_line_imports_it_or_click_or_rich():
    offenders = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE)
        if relative.parts[0] == "cli" or relative.name == "__main__.py":
            continue
        bad = sorted(m for m in imported_modules(path)
                     if m.split(".")[0] in CLI_ONLY or m == "fracgpu.cli" or m.startswith("fracgpu.cli."))
        if bad:
            offenders[str(relative)] = bad
    assert offenders == {}


def test_only_the_state_owner_the_grammar_the_settings_table_and_the_node_file_touch_native():
    """``fracgpu.state`` owns the shared state; ``fracgpu.units`` binds the one C grammar of values;
    ``fracgpu.settings`` reads the one C table of settings; ``fracgpu.config`` the one C parser of the
    node's configuration file (the shims' own)."""
    users = sorted(str(path.relative_to(PACKAGE)) for path in PACKAGE.rglob("*.py")
                   if any(m in ("fracgpu._native", "fracgpu._native") or m.endswith("._native")
                          for m in imported_modules(path)))
    assert users == ["config.py", "settings.py", "state.py", "units.py"]
