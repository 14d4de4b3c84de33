"""One set of books per node: the node's configuration file (``/etc/fracgpu/fracgpu.conf``, here
named by ``FRACGPU_CONFIG``) gives the CLI, the library and the shim one state folder and one
ledger, and the environment cannot take them elsewhere."""

from __future__ import annotations

import sqlite3

import pytest

from fracgpu import config, settings
from tests.support.simgpu import MiB, parse_facts

QUOTA = 256 * MiB


@pytest.fixture
def node(gpu, tmp_path):
    """The test GPU's state folder and a ledger of the node's, named by a node file (and nowhere else)."""
    folder, ledger = tmp_path / "node-state", tmp_path / "node-ledger.sqlite"
    folder.mkdir(mode=0o700)
    path = tmp_path / "fracgpu.conf"
    path.write_text(config.text({settings.STATE_DIR: str(folder), settings.LEDGER: str(ledger)},
                                comment="the node's books"))
    gpu.env = {k: v for k, v in gpu.env.items() if k not in (settings.STATE_DIR, settings.LEDGER)}
    gpu.env[config.VARIABLE] = str(path)
    return folder, ledger, path


def write(tmp_path, text: str) -> str:
    path = tmp_path / "bad.conf"
    path.write_text(text)
    return str(path)


@pytest.mark.fault("A node configuration file with an unknown key, a relative path or a key given twice",
                   "refused, naming the file, the line and the key")
@pytest.mark.parametrize("text, line, says", [
    ("state_dir = /var/lib/fracgpu\nstat_group = gpu\n", 2, "unknown key 'stat_group'"),
    ("# books\nledger = books.sqlite\n", 2, "key 'ledger': 'books.sqlite' is not an absolute path"),
    ("partition = a\npartition = b\n", 2, "key 'partition' is given twice"),
    ("state_dir /var/lib/fracgpu\n", 1, "write key = value"),
    ("partition = -bad\n", 1, "key 'partition'"),
])
def test_a_bad_node_file_is_refused_naming_file_line_and_key(tmp_path, text, line, says):
    path = write(tmp_path, text)
    with pytest.raises(config.ConfigError) as e:
        config.read(path)
    assert f"{path}:{line}: " in str(e.value) and says in str(e.value)


def test_a_node_file_reads_back_what_was_written(tmp_path):
    values = {settings.STATE_DIR: "/var/lib/fracgpu", settings.STATE_GROUP: "gpu",
              settings.LEDGER: "/var/lib/fracgpu/ledger.sqlite", settings.PARTITION: "team-a"}
    path = tmp_path / "fracgpu.conf"
    path.write_text(config.text(values, comment="a comment\nover two lines") + "  # a trailing comment\n")
    read = config.read(str(path))
    assert read.path == str(path) and dict(read.values) == values and read.partition == "team-a"


def test_cli_library_and_shim_share_the_node_files_books(clients, gpu, node):
    folder, ledger, _ = node
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    assert [p.name for p in folder.glob("gpu-*.state")], "the CLI made the GPU's state in the node's folder"
    # The library finds the same folder and ledger.
    out = gpu.python("from fracgpu import ledger, state; print(state.resolve_state_dir()); "
                     "print(ledger.default_path())").stdout.split()
    assert out == [str(folder), str(ledger)]
    # A job under `fracgpu run` is held by the partition kept there, and recorded in the node's ledger.
    facts = parse_facts(gpu.fracgpu("run", "--partition", "team", "--", clients.lcuda, "alloc-until-oom", 64).stdout)
    assert facts["blocks"] == str((QUOTA - gpu.context) // (64 * MiB))
    with sqlite3.connect(ledger) as db:
        assert db.execute("SELECT count(*) FROM jobs").fetchone()[0] == 1


@pytest.mark.fault("`FRACGPU_STATE_DIR` or `FRACGPU_LEDGER` contradicting the node's configuration file",
                   "`fracgpu run` refuses (exit 125) naming the variable; the shim does not obey it and says so once")
def test_the_environment_cannot_take_a_job_off_the_nodes_books(clients, gpu, node, shim, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir(mode=0o700)
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    away = {settings.STATE_DIR: str(elsewhere), settings.LEDGER: str(elsewhere / "ledger.sqlite")}
    result = gpu.fracgpu("run", "--partition", "team", "--", clients.lcuda, "info", env=away, check=False)
    assert result.returncode == 125, result.stderr
    assert "FRACGPU_STATE_DIR, FRACGPU_LEDGER are not obeyed" in result.stderr
    # The shim, started without fracgpu run, stays with the node's folder: partition 'team' exists
    # only there, and holds it to 256MiB.
    result = gpu.run(clients.lcuda, "alloc-until-oom", 64, env={"LD_PRELOAD": shim, settings.PARTITION: "team",
                                                                  **away})
    assert parse_facts(result.stdout)["blocks"] == str((QUOTA - gpu.context) // (64 * MiB))
    notices = [line for line in result.stderr.splitlines() if "not obeyed" in line]
    assert len(notices) == 1 and "FRACGPU_STATE_DIR" in notices[0], result.stderr
    assert not list(elsewhere.iterdir())


@pytest.mark.fault("A process whose node file binds it to a partition sets `FRACGPU_PARTITION`, `FRACGPU_MEMORY`, "
                   "`FRACGPU_CONTEXT_MEMORY`, `FRACGPU_RECONCILE_INTERVAL`",
                   "not obeyed: it stays in the bound partition, under its limit")
def test_a_bound_process_stays_in_its_partition_whatever_its_environment(clients, gpu, node, shim, tmp_path):
    folder, _, _ = node
    gpu.fracgpu("partition", "create", "team", "--memory", "256MiB")
    bound = tmp_path / "bound.conf"
    bound.write_text(config.text({settings.STATE_DIR: str(folder), settings.PARTITION: "team"}))
    env = {config.VARIABLE: str(bound), "LD_PRELOAD": shim, settings.PARTITION: "other", settings.MEMORY: "1GiB",
           settings.CONTEXT_MEMORY: "0", settings.RECONCILE_INTERVAL: "0"}
    result = gpu.run(clients.dlopen, "alloc-until-oom", 64, env=env)
    assert parse_facts(result.stdout)["blocks"] == str((QUOTA - gpu.context) // (64 * MiB))
    assert "binds this process to partition 'team'" in result.stderr
    # fracgpu run and init() there refuse a job that asks for another partition.
    run = gpu.fracgpu("run", "--memory", "1GiB", "--", clients.lcuda, "info", check=False,
                      env={config.VARIABLE: str(bound)})
    assert run.returncode == 125 and "binds every process here to partition 'team'" in run.stderr


def test_without_a_node_file_the_per_user_default_holds(gpu):
    out = gpu.python("from fracgpu import config; c = config.read(); print(c.path, dict(c.values))").stdout
    assert out.split() == ["None", "{}"]


def test_fracgpu_init_refuses_an_environment_that_contradicts_the_node_file(gpu, node, tmp_path):
    result = gpu.python("import fracgpu\ntry:\n    fracgpu.init(memory='256MiB')\n"
                        "except fracgpu.InitError as e:\n    print(e)", env={settings.STATE_DIR: str(tmp_path)})
    assert "FRACGPU_STATE_DIR is not obeyed" in result.stdout, result.stdout + result.stderr


@pytest.mark.fault("A node configuration file that does not parse, under any command",
                   "refused with the file, line and key before anything is read (exit 2; `fracgpu run` 125); the "
                   "shim refuses CUDA with the same reason")
def test_every_command_and_the_shim_refuse_a_broken_node_file(clients, gpu, shim, tmp_path):
    path = write(tmp_path, "stat_dir = /var/lib/fracgpu\n")
    env = {config.VARIABLE: path}
    says = f"{path}:1: unknown key 'stat_dir'"
    for args, status in ((("top", "--once"), 2), (("report",), 2), (("partition", "list"), 2),
                         (("run", "--memory", "256MiB", "--", "true"), 125)):
        result = gpu.fracgpu(*args, env=env, check=False)
        assert result.returncode == status and says in result.stderr and "Traceback" not in result.stderr, args
    result = gpu.run(clients.lcuda, "info", env={**env, "LD_PRELOAD": shim, settings.PARTITION: "team"}, check=False)
    assert result.returncode != 0 and says in result.stderr and "CUDA is refused" in result.stderr
