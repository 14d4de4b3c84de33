"""What a person at a terminal sees besides the output: progress while the GPU is probed (on stderr,
only on a terminal), and shell completion (commands, options, partition names, priority classes and
GPU indices)."""

from __future__ import annotations

import os
import pty
import subprocess
import sys
from types import SimpleNamespace

import pytest

from fracgpu.cli.common import PROBING
from tests.support import ROOT
from tests.support.simgpu import GiB


def run_with_terminal_stderr(gpu, *args) -> tuple[subprocess.CompletedProcess, str]:
    """``fracgpu ARGS`` with stderr a terminal (a pseudo-terminal) and stdout a pipe; what the terminal got."""
    leader, follower = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "fracgpu", *args], stdout=subprocess.PIPE,
                                stderr=follower, text=True, env={**gpu.env, "TERM": "xterm"})
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:   # EIO: the last writer closed it
                break
            if not chunk:
                break
            seen += chunk
        stdout = proc.stdout.read()
        proc.wait(timeout=60)
    finally:
        os.close(leader)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, None), seen.decode(errors="replace")


def test_progress_is_shown_on_a_terminal_while_the_gpu_is_probed(gpu):
    result, terminal = run_with_terminal_stderr(gpu, "partition", "create", "team", "--memory", "64MiB")
    assert result.returncode == 0, terminal
    assert PROBING in terminal
    assert result.stdout == "partition 'team' created on GPU 0: 64MiB, no compute share\n"   # nothing else


def test_no_progress_when_stderr_is_not_a_terminal(gpu):
    result = gpu.fracgpu("partition", "create", "team", "--memory", "64MiB")
    assert result.stderr == ""
    result = gpu.fracgpu("run", "--memory", "64MiB", "--", sys.executable, "-c", "print('job')")
    assert result.stdout == "job\n" and "probing" not in result.stderr


def test_commands_that_do_not_probe_show_nothing(gpu):
    """`partition list` reads the shared state only: no probe, so no progress, even on a terminal."""
    result, terminal = run_with_terminal_stderr(gpu, "partition", "list", "--json")
    assert result.returncode == 0 and result.stdout.strip() == "[]"
    assert "probing" not in terminal


def completion(env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["fracgpu"], capture_output=True, text=True, timeout=60,
                          env={"PATH": os.environ["PATH"], **env})


def test_shell_completion_is_documented_with_the_commands_that_make_it():
    section = (ROOT / "README.md").read_text().split("## Shell completion", 1)[1].split("\n## ", 1)[0]
    for shell in ("bash", "zsh", "fish"):
        assert f"_FRACGPU_COMPLETE={shell}_source fracgpu > " in section, shell


def test_shell_completion_scripts():
    bash = completion({"_FRACGPU_COMPLETE": "bash_source"})
    assert bash.returncode == 0, bash.stderr
    assert "_fracgpu_completion()" in bash.stdout and "complete -o nosort -F _fracgpu_completion fracgpu" in bash.stdout
    assert "compdef _fracgpu_completion fracgpu" in completion({"_FRACGPU_COMPLETE": "zsh_source"}).stdout
    assert "complete --no-files --command fracgpu" in completion({"_FRACGPU_COMPLETE": "fish_source"}).stdout


def test_completion_knows_the_commands_and_their_options():
    def complete(words: str, cword: int) -> list[str]:
        out = completion({"_FRACGPU_COMPLETE": "bash_complete", "COMP_WORDS": words, "COMP_CWORD": str(cword)})
        return [line.split(",", 1)[1] for line in out.stdout.splitlines()]

    assert complete("fracgpu par", 1) == ["partition"]
    assert complete("fracgpu partition ", 2) == ["create", "list", "rm", "set"]
    assert "--until" in complete("fracgpu report --", 2)


def shell_completions(gpu, shell: str, words: str) -> list[str]:
    """What ``shell``'s completion script (click's, as `_FRACGPU_COMPLETE=<shell>_source` prints it) is given
    for the command line ``words`` with the cursor at its end: the values offered."""
    if shell == "fish":   # fish passes the word being completed itself
        cword = "" if words.endswith(" ") else words.split()[-1]
    else:                 # bash and zsh its index
        cword = str(len(words.split()) - (0 if words.endswith(" ") else 1))
    env = {**gpu.env, "_FRACGPU_COMPLETE": f"{shell}_complete", "COMP_WORDS": words, "COMP_CWORD": cword}
    out = subprocess.run([sys.executable, "-m", "fracgpu"], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    if shell == "bash":   # "type,value" lines
        return [line.split(",", 1)[1] for line in out.stdout.splitlines()]
    if shell == "zsh":    # type, value, help: three lines each
        lines = out.stdout.splitlines()
        return [lines[i + 1] for i in range(0, len(lines), 3)]
    return [line.split(",", 1)[1].split("\t")[0] for line in out.stdout.splitlines()]   # fish: "type,value\thelp"


@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_completion_of_partition_names_priorities_and_gpu_indices(make_gpu, shell):
    gpu = make_gpu(memory=GiB, devices=2)
    for name in ("team-a", "team-b", "serving"):
        gpu.fracgpu("partition", "create", name, "--memory", "64MiB")
    assert shell_completions(gpu, shell, "fracgpu partition rm team") == ["team-a", "team-b"]
    assert shell_completions(gpu, shell, "fracgpu partition set s") == ["serving"]
    assert sorted(shell_completions(gpu, shell, "fracgpu run --partition ")) == ["serving", "team-a", "team-b"]
    assert shell_completions(gpu, shell, "fracgpu run --priority ") == ["high", "normal", "low"]
    assert shell_completions(gpu, shell, "fracgpu partition create x --priority l") == ["low"]
    assert shell_completions(gpu, shell, "fracgpu partition create x --device ") == ["0", "1"]
    # numbered as jobs started here see them: under a mask, one GPU, index 0
    masked = {**gpu.env, "CUDA_VISIBLE_DEVICES": "1"}
    assert shell_completions(SimpleNamespace(env=masked), shell, "fracgpu check --device ") == ["0"]
