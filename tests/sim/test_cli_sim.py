"""`fracgpu sim env` and `fracgpu sim run` select the simulated GPU, and say clearly what is wrong."""

import os
import shlex
import subprocess
import sys

import pytest

from fracgpu import sim

GiB = 1 << 30


def fracgpu(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "fracgpu", *args], capture_output=True, text=True, env=env, timeout=60
    )


def environ(**changes):
    env = dict(os.environ)
    for name, value in changes.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    return env


def test_env_output_is_shell_that_sets_the_variables():
    lib = str(sim.library_dir())
    script = 'eval "$({} sim env --memory 1GiB)"; echo $FRACGPU_SIM_MEMORY; echo $LD_LIBRARY_PATH'.format(
        shlex.join([sys.executable, "-m", "fracgpu"])
    )
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=environ(LD_LIBRARY_PATH=None),
                         check=True, timeout=60).stdout.splitlines()
    assert out == [str(GiB), lib]
    # An existing LD_LIBRARY_PATH, set in the user's shell, is kept after the simulator's folder.
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                         env=environ(LD_LIBRARY_PATH="/opt/x:/opt/y"), check=True, timeout=60).stdout.splitlines()
    assert out == [str(GiB), f"{lib}:/opt/x:/opt/y"]


def test_env_quotes_values_for_the_shell():
    result = fracgpu("sim", "env", "--name", "it's a $HOME `gpu`", "--dir", "/tmp/a b;rm -rf x",
                     "--sms", "8", "--devices", "2", "--context-memory", "300MiB")
    assert result.returncode == 0, result.stderr
    script = result.stdout + 'printf "%s\\n" "$FRACGPU_SIM_NAME" "$FRACGPU_SIM_DIR" "$FRACGPU_SIM_SMS" ' \
                             '"$FRACGPU_SIM_DEVICES" "$FRACGPU_SIM_CONTEXT_MEMORY" "$FRACGPU_SIM_MEMORY"'
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, check=True,
                         timeout=60).stdout.splitlines()
    assert out == ["it's a $HOME `gpu`", "/tmp/a b;rm -rf x", "8", "2", str(300 << 20), str(16 * GiB)]


def test_env_without_state_dir_leaves_the_simulator_default():
    result = fracgpu("sim", "env")
    assert result.returncode == 0, result.stderr
    assert "FRACGPU_SIM_DIR" not in result.stdout
    assert f"export FRACGPU_SIM_MEMORY={16 * GiB}\n" in result.stdout
    assert f"export FRACGPU_SIM_CONTEXT_MEMORY={64 << 20}\n" in result.stdout   # 1/256 of the device


def test_env_context_memory_defaults_to_a_share_of_the_memory():
    result = fracgpu("sim", "env", "--memory", "4GiB")
    assert result.returncode == 0, result.stderr
    assert f"export FRACGPU_SIM_CONTEXT_MEMORY={16 << 20}\n" in result.stdout


def run_env(*options, **env_changes):
    result = fracgpu("sim", "run", *options, "--", "env", env=environ(**env_changes))
    assert result.returncode == 0, result.stderr
    return dict(line.split("=", 1) for line in result.stdout.splitlines() if "=" in line)


def test_run_gives_the_command_the_variables():
    env = run_env("--memory", "4GB", "--sms", "16", "--devices", "3", "--name", "Test GPU",
                  "--context-memory", "0", "--dir", "/tmp/fracgpu-test-state", LD_LIBRARY_PATH="/opt/lib")
    lib = str(sim.library_dir())
    assert env["FRACGPU_SIM_MEMORY"] == "4000000000"
    assert env["FRACGPU_SIM_SMS"] == "16"
    assert env["FRACGPU_SIM_DEVICES"] == "3"
    assert env["FRACGPU_SIM_NAME"] == "Test GPU"
    assert env["FRACGPU_SIM_CONTEXT_MEMORY"] == "0"
    assert env["FRACGPU_SIM_DIR"] == "/tmp/fracgpu-test-state"
    assert env["LD_LIBRARY_PATH"] == f"{lib}:/opt/lib"
    assert os.path.isfile(os.path.join(lib, "libcuda.so.1"))


def test_run_does_not_repeat_the_library_folder():
    lib = str(sim.library_dir())
    env = run_env(LD_LIBRARY_PATH=f"{lib}:/opt/lib")
    assert env["LD_LIBRARY_PATH"] == f"{lib}:/opt/lib"


def test_run_passes_arguments_and_exit_status_through():
    result = fracgpu("sim", "run", "--", sys.executable, "-c", "import sys; print(sys.argv[1:]); sys.exit(7)",
                     "--memory", "x")
    assert result.returncode == 7
    assert result.stdout.strip() == "['--memory', 'x']"
    # Without "--", the command starts at the first argument that is not an option.
    result = fracgpu("sim", "run", "--sms", "4", sys.executable, "-c", "import os; print(os.environ['FRACGPU_SIM_SMS'])")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "4"


@pytest.mark.parametrize(
    "args, option, problem",
    [
        (["--memory", "12XB"], "--memory", "unknown unit 'XB'"),
        (["--memory", "0"], "--memory", "zero"),
        (["--memory", "25%"], "--memory", "percentage"),
        (["--memory", "-1GiB"], "--memory", "negative"),
        (["--memory", "65TiB"], "--memory", "at most 64TiB"),
        (["--sms", "0"], "--sms", "between 1 and 1024"),
        (["--sms", "many"], "--sms", "not a valid integer"),
        (["--devices", "99"], "--devices", "between 1 and 16"),
        (["--devices", "0"], "--devices", "between 1 and 16"),
        (["--name", ""], "--name", "non-empty"),
        (["--name", "a\nb"], "--name", "printable"),
        (["--name", "x" * 201], "--name", "200"),
        (["--memory", "1GiB", "--context-memory", "1GiB"], "--context-memory", "less than the device's memory"),
        (["--context-memory", "-5"], "--context-memory", "negative"),
    ],
)
@pytest.mark.parametrize("command", ["env", "run"])
def test_bad_option_values_are_usage_errors(command, args, option, problem):
    result = fracgpu("sim", command, *args, *(["--", "true"] if command == "run" else []))
    # `sim run` refuses as env(1) does (125), so its command's own 2 stays its own.
    assert result.returncode == (125 if command == "run" else 2), result.stdout + result.stderr
    assert f"'{option}'" in result.stderr
    assert problem in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_run_without_a_command_is_a_usage_error():
    for args in ([], ["--memory", "1GiB"], ["--memory", "1GiB", "--"]):
        result = fracgpu("sim", "run", *args)
        assert result.returncode == 125
        assert "missing the command to run" in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.parametrize("args", [["--no-such-option"], ["--sms"], ["--devices", "0"]])
def test_run_refuses_with_125_and_passes_the_commands_own_2_and_125_on(args):
    result = fracgpu("sim", "run", *args, *(["--", "true"] if args != ["--sms"] else []))
    assert result.returncode == 125 and "Traceback" not in result.stderr and result.stdout == ""
    for status in (2, 125):
        result = fracgpu("sim", "run", "--", "sh", "-c", f"echo ran; exit {status}")
        assert (result.returncode, result.stdout, result.stderr) == (status, "ran\n", "")


def test_run_of_a_command_not_found_is_an_error():
    result = fracgpu("sim", "run", "--", "fracgpu-no-such-command-xyz", "arg")
    assert result.returncode == 127
    assert "command not found: fracgpu-no-such-command-xyz" in result.stderr
    assert "Traceback" not in result.stderr


def test_version_and_help():
    result = fracgpu("--version")
    assert result.returncode == 0 and result.stdout.startswith("fracgpu, version ")
    result = fracgpu("sim", "--help")
    assert result.returncode == 0 and "env" in result.stdout and "run" in result.stdout
