"""Every FRACGPU_* variable is one row of the native settings table, which fracgpu.settings reads, and the
README's table is generated from it."""

import pathlib
import re
import subprocess
import sys

import pytest

from fracgpu import devices, settings
from tests.support import ROOT

SOURCES = pathlib.Path(settings.__file__).resolve().parent


def test_readme_variables_table_is_generated_from_the_settings():
    result = subprocess.run([sys.executable, str(ROOT / "tools" / "settings_table.py"), "--check"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- settings:begin -->", 1)[1].split("<!-- settings:end -->", 1)[0]
    assert [f"`{name}`" for name in settings.NAMES] == re.findall(r"^\| (`FRACGPU_[A-Z_]+`) \|", block, re.M)


def test_the_check_fails_when_the_readme_table_is_stale(tmp_path):
    (tmp_path / "tools").mkdir()
    for script in ("settings_table.py", "readme_block.py"):
        (tmp_path / "tools" / script).write_text((ROOT / "tools" / script).read_text())
    tool = tmp_path / "tools" / "settings_table.py"
    readme = (ROOT / "README.md").read_text()
    stale = readme.replace("| `FRACGPU_SIM_MEMORY` | 16GiB |", "| `FRACGPU_SIM_MEMORY` | 8GiB |")
    assert stale != readme
    (tmp_path / "README.md").write_text(stale)

    def check():
        return subprocess.run([sys.executable, str(tool), "--check"], capture_output=True, text=True, timeout=60)

    result = check()
    assert result.returncode == 1 and "python tools/settings_table.py" in result.stderr
    subprocess.run([sys.executable, str(tool)], check=True, timeout=60)   # regenerates it
    assert check().returncode == 0 and (tmp_path / "README.md").read_text() == readme


def test_every_variable_the_package_names_is_in_the_table():
    named = set()
    for path in SOURCES.rglob("*.py"):
        named.update(re.findall(r"\bFRACGPU_[A-Z_]*[A-Z]\b(?!_\*)", path.read_text()))
    assert named - {settings.PREFIX.rstrip("_")} <= set(settings.NAMES)
    assert all(name.startswith(settings.PREFIX) for name in settings.NAMES)
    assert len(set(settings.NAMES)) == len(settings.NAMES)


def test_the_strip_lists_come_from_the_table():
    assert settings.PARTITION_VARIABLES == ("FRACGPU_PARTITION", "FRACGPU_MEMORY", "FRACGPU_COMPUTE",
                                            "FRACGPU_COMPUTE_CAP", "FRACGPU_PRIORITY", "FRACGPU_OVERCOMMIT")
    assert set(settings.JOB_VARIABLES) == set(settings.PARTITION_VARIABLES) | {"FRACGPU_JOB_HOLDER"}
    env = {name: "1" for name in settings.NAMES} | {"LD_PRELOAD": "x.so", "HOME": "/h"}
    assert settings.without_job_variables(env) == {"HOME": "/h"}
    probed = devices.probe_environment(env)
    assert not set(settings.JOB_VARIABLES) & set(probed)
    assert settings.STATE_DIR in probed and settings.SIM_MEMORY in probed


@pytest.mark.parametrize("name, text, value", [
    ("FRACGPU_MEMORY", "4GiB", (4 << 30, 0.0)),
    ("FRACGPU_MEMORY", "25%", (0, 0.25)),
    ("FRACGPU_COMPUTE", "25%", 0.25),
    ("FRACGPU_COMPUTE_CAP", "1", True),
    ("FRACGPU_OOM_WAIT", "2.5", 2.5),
    ("FRACGPU_CONTEXT_MEMORY", "0", 0),
    ("FRACGPU_CONTEXT_MEMORY", "0MiB", 0),
    ("FRACGPU_SIM_MEMORY", "16GB", 16 * 10**9),
    ("FRACGPU_JOB_HOLDER", "42", 42),
    ("FRACGPU_SIM_SMS", "66", 66),
])
def test_each_setting_is_parsed_by_its_row(name, text, value):
    assert settings.read(name, {name: text}) == value
    assert settings.read(name, {}) is None


@pytest.mark.parametrize("name, text", [("FRACGPU_MEMORY", "4XB"), ("FRACGPU_COMPUTE", "150%"),
                                        ("FRACGPU_COMPUTE_CAP", "yes"), ("FRACGPU_OOM_WAIT", "-1"),
                                        ("FRACGPU_OOM_WAIT", "0x10"), ("FRACGPU_JOB_HOLDER", "me"),
                                        ("FRACGPU_MEMORY", "0MiB"), ("FRACGPU_SIM_SMS", "1025")])
def test_a_bad_value_is_refused_naming_the_variable(name, text):
    with pytest.raises(ValueError, match=f"^{name}: "):
        settings.read(name, {name: text})


def test_the_simulated_gpu_defaults_are_the_tables():
    from fracgpu import sim

    config = sim.SimConfig()
    assert (config.memory, config.sms, config.devices, config.name, config.context_memory) == (
        16 << 30, 132, 1, "fracgpu simulated GPU", None)
    # None: the table's rule, 1/256 of the memory, as the simulated driver applies it.
    context = settings.by_name(settings.SIM_CONTEXT_MEMORY)
    assert context.default is None and context.default_rule == "1/256 of the memory"
    assert config.reserved_per_context() == (16 << 30) // 256 == sim.SimConfig(memory=1 << 30).reserved_per_context() * 16
    assert config.memory == settings.default(settings.SIM_MEMORY)
    with pytest.raises(ValueError, match="FRACGPU_STATE_DIR has no default value"):
        settings.default(settings.STATE_DIR)   # a rule, not a value


def test_defaults_are_values_of_their_grammar():
    """A default is what parsing its text gives, never text to be parsed again: every default
    value reads back the same through its own setting's grammar."""
    written = {"size": lambda v: str(v), "count": str, "seconds": lambda v: f"{v:g}", "flag": lambda v: str(int(v)),
               "priority": str, "text": str, "log_format": str}
    with_values = [s for s in settings.SETTINGS if s.default_rule is None]
    assert {s.name for s in with_values} >= {settings.SIM_MEMORY, settings.SIM_SMS, settings.OOM_WAIT,
                                             settings.PRIORITY, settings.COMPUTE_CAP}
    for s in with_values:
        assert s.parse(written[s.grammar](s.default)) == s.default, s.name
    assert settings.default(settings.RECONCILE_INTERVAL) == 1.0 and settings.default(settings.PRIORITY) == "normal"


def test_no_native_source_reads_a_fracgpu_variable_outside_the_table():
    sources = [p for p in (ROOT / "csrc").rglob("*") if p.suffix in (".c", ".cpp", ".h")]
    assert sources
    readers = [str(p.relative_to(ROOT)) for p in sources if re.search(r'getenv\("FRACGPU_', p.read_text())]
    assert readers == []
