"""Nothing is promised twice, as the shim enforces it: a job without a promise gets only what
nobody was promised, and of two jobs racing for the last promise exactly one gets it. Each test has its own simulated GPU of 4 GiB and its own state folder."""

from __future__ import annotations

import sys

import pytest

from tests.shim.test_quota import CTYPES_JOB
from tests.support.simgpu import CTYPES_PRELUDE, GiB, MiB, parse_facts

CUDA_ERROR_NOT_PERMITTED = 800

# What the job sees, then 32 MiB allocations until refused: the quota tests' ctypes job.
FILL = CTYPES_JOB

# cuInit's result; a job that started then waits for the test.
START = """import ctypes, sys
rc = ctypes.CDLL("libcuda.so.1").cuInit(0)
print("init", rc, flush=True)
if rc == 0:
    sys.stdin.readline()
"""


@pytest.fixture
def gpu4(make_gpu):
    return make_gpu(memory=4 * GiB)


def cuda_init(gpu, env: dict) -> tuple[int, str]:
    """What cuInit returns to a job started with ``env`` (which then ends), and what it said on stderr."""
    result = gpu.run(sys.executable, "-c", START, env=env, input="\n")
    return int(result.stdout.split()[1]), result.stderr


def refused(gpu, env: dict) -> str:
    """What a job started with ``env`` says when the shim refuses it CUDA (cuInit returns NOT_PERMITTED)."""
    status, said = cuda_init(gpu, env)
    assert status == CUDA_ERROR_NOT_PERMITTED, said
    return said


def test_a_job_without_a_limit_gets_only_what_nobody_was_promised(gpu4):
    gpu4.fracgpu("partition", "create", "team", "--memory", "3GiB")   # promised, unused
    facts = parse_facts(gpu4.fracgpu("run", "--compute", "50%", "--", sys.executable, "-c", FILL).stdout)
    assert int(facts["meminfo_total"]) == int(facts["total_mem"]) == GiB
    # 1 GiB in 32 MiB blocks, less what a context may be charged.
    assert 28 <= int(facts["blocks"]) <= 32, facts
    # A shared partition without a limit is held to the same rule.
    gpu4.fracgpu("partition", "create", "open")
    facts = parse_facts(gpu4.fracgpu("run", "--partition", "open", "--", sys.executable, "-c", FILL).stdout)
    assert int(facts["meminfo_total"]) == GiB and 28 <= int(facts["blocks"]) <= 32, facts
    # With the promise gone, the whole GPU is nobody's.
    gpu4.fracgpu("partition", "rm", "team")
    facts = parse_facts(gpu4.fracgpu("run", "--partition", "open", "--", sys.executable, "-c", FILL).stdout)
    assert int(facts["meminfo_total"]) == 4 * GiB and int(facts["blocks"]) > 100, facts


def test_what_jobs_without_a_promise_hold_together_stays_outside_the_promises(gpu4):
    gpu4.fracgpu("partition", "create", "team", "--memory", "3GiB")
    gpu4.fracgpu("partition", "create", "open")
    hold = CTYPES_PRELUDE + """
import sys
p = ctypes.c_uint64()
print(cuda.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(768 << 20)), flush=True)
sys.stdin.readline()
"""
    holder = gpu4.popen(sys.executable, "-m", "fracgpu", "run", "--compute", "25%", "--", sys.executable, "-c", hold)
    try:
        assert holder.stdout.readline() == "0\n"
        facts = parse_facts(gpu4.fracgpu("run", "--partition", "open", "--", sys.executable, "-c", FILL).stdout)
        assert int(facts["blocks"]) <= 8, facts   # 256 MiB left of the 1 GiB nobody was promised
    finally:
        holder.communicate("\n", timeout=30)


@pytest.mark.fault('Two jobs racing for the last memory promise (`fracgpu run --memory 75%` twice)',
                   'exactly one starts; the other exits 125, or has CUDA refused with the reason')
def test_two_racing_jobs_for_three_quarters_exactly_one_starts(gpu4):
    jobs = [gpu4.popen(sys.executable, "-m", "fracgpu", "run", "--memory", "75%", "--", sys.executable, "-c", START)
            for _ in range(2)]
    firsts = [job.stdout.readline() for job in jobs]
    outcomes = [job.communicate("\n", timeout=60) for job in jobs]
    assert sorted(firsts) == ["", "init 0\n"] or sorted(firsts) == ["init 0\n", f"init {CUDA_ERROR_NOT_PERMITTED}\n"], \
        (firsts, outcomes)
    loser = firsts.index("" if "" in firsts else f"init {CUDA_ERROR_NOT_PERMITTED}\n")
    assert "3GiB does not fit on GPU-" in outcomes[loser][1], outcomes[loser]
    assert "already promised 3GiB (run-" in outcomes[loser][1]
    assert jobs[loser].returncode == (125 if firsts[loser] == "" else 0)
    assert jobs[1 - loser].returncode == 0


@pytest.mark.fault('A job\'s own partition (FRACGPU_MEMORY) that does not fit beside the promises',
                   'CUDA refused in the job with the reason (never unlimited); `FRACGPU_OVERCOMMIT=1` runs it')
def test_the_shim_refuses_a_private_partition_that_does_not_fit(gpu4, shim):
    gpu4.fracgpu("partition", "create", "team", "--memory", "3GiB")
    said = refused(gpu4, env := {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "mine", "FRACGPU_MEMORY": "2GiB"})
    assert "2GiB does not fit on GPU-" in said and "already promised 3GiB (team 3GiB); 1GiB remains" in said \
        and "FRACGPU_OVERCOMMIT=1" in said, said
    assert cuda_init(gpu4, {**env, "FRACGPU_OVERCOMMIT": "1"})[0] == 0
    assert "FRACGPU_OVERCOMMIT: invalid flag 'yes'" in refused(gpu4, {**env, "FRACGPU_OVERCOMMIT": "yes"})


@pytest.mark.fault('A private job (FRACGPU_MEMORY) whose partition name is taken by a partition it did not make',
                   'CUDA refused in the job with the reason; it never joins that partition')
def test_a_private_job_never_joins_a_partition_it_did_not_make(gpu4, shim):
    gpu4.fracgpu("partition", "create", "team", "--memory", "1MiB")
    said = refused(gpu4, {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "team", "FRACGPU_MEMORY": "1GiB"})
    assert "partition 'team' on GPU" in said and "a private job never joins a partition it did not make" in said, said
    # The processes of one private job share the partition its first one made; a job asking for other
    # settings under that name does not get in.
    mine = {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "mine", "FRACGPU_MEMORY": "1GiB", "FRACGPU_COMPUTE": "25%"}
    first = gpu4.popen(sys.executable, "-c", START, env=mine)
    try:
        assert first.stdout.readline() == "init 0\n"
        assert cuda_init(gpu4, mine)[0] == 0
        said = refused(gpu4, {**mine, "FRACGPU_MEMORY": "2GiB"})
        assert "another job's private partition" in said, said
    finally:
        first.stdin.close()
        first.wait(timeout=30)


@pytest.mark.fault('A job\'s own partition (FRACGPU_COMPUTE) whose share does not fit beside the promised shares',
                   'CUDA refused in the job with the reason (never an unpromised share); `FRACGPU_OVERCOMMIT=1` '
                   'runs it, best effort')
def test_the_shim_refuses_a_private_share_that_does_not_fit(gpu4, shim):
    gpu4.fracgpu("partition", "create", "train", "--compute", "75%")
    said = refused(gpu4, env := {"LD_PRELOAD": shim, "FRACGPU_PARTITION": "mine", "FRACGPU_COMPUTE": "50%"})
    assert "50% of compute does not fit on GPU-" in said and "(train 75%); 25% remains" in said
    status, said = cuda_init(gpu4, {**env, "FRACGPU_OVERCOMMIT": "1"})
    assert status == 0, said
