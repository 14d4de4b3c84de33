"""A job's options are parsed once, into one JobSpec, and each rule about them is checked in one place."""

import pytest

from fracgpu import devices, jobs, snapshot

GiB = 1 << 30
DEVICE = devices.Device(index=0, uuid="GPU-x", name="sim", total_memory=GiB)


def test_a_private_job_is_parsed_once_into_values_and_the_text_it_carries():
    spec = jobs.JobSpec.parse(memory="512MiB", compute="25%", cap=True, oom_wait=2.5)
    assert (spec.memory, spec.compute, spec.cap, spec.oom_wait) == ((512 << 20, 0.0), 0.25, True, 2.5)
    assert (spec.memory_text, spec.compute_text, spec.oom_wait_text) == ("512MiB", "25%", "2.5")
    assert spec.private and spec.memory_bytes == 512 << 20 and spec.limit_on(DEVICE) == 512 << 20


def test_a_percentage_becomes_bytes_on_the_device_it_meets():
    spec = jobs.JobSpec.parse(memory="25%")
    assert spec.memory_bytes is None and spec.limit_on(DEVICE) == GiB // 4


def test_a_limit_above_the_device_is_refused_naming_it():
    spec = jobs.JobSpec.parse(memory="2GiB")
    with pytest.raises(ValueError, match=r"memory limit 2GiB is above the 1GiB of GPU 0 \(sim, GPU-x\); ask for at"):
        spec.limit_on(DEVICE)


@pytest.mark.parametrize("options, error, field", [
    ({"memory": "4XB"}, jobs.OptionError, "memory"),
    ({"compute": "150%"}, jobs.OptionError, "compute"),
    ({"memory": "1GiB", "oom_wait": "-1"}, jobs.OptionError, "oom_wait"),
    ({"partition": "a/b"}, jobs.OptionError, "partition"),
    ({"memory": "1GiB", "cap": True}, jobs.CapWithoutShare, None),
    ({"memory": "1GiB", "partition": "team"}, jobs.ConflictingChoice, None),
    ({}, jobs.ConflictingChoice, None),
])
def test_bad_options_are_refused_with_the_rule_that_refuses_them(options, error, field):
    with pytest.raises(error) as raised:
        jobs.JobSpec.parse(**options)
    assert getattr(raised.value, "field", None) == field


def test_the_spec_a_process_was_started_with_is_read_back_from_its_variables():
    spec = jobs.JobSpec.parse(memory="25%", compute=0.5, cap=True)
    env = {"FRACGPU_PARTITION": "run-1", "FRACGPU_MEMORY": "25%", "FRACGPU_COMPUTE": spec.compute_text,
           "FRACGPU_COMPUTE_CAP": "1"}
    assert jobs.JobSpec.from_environment(env).same_partition(spec)
    assert jobs.JobSpec.from_environment({"FRACGPU_PARTITION": "team"}).partition == "team"
    assert jobs.JobSpec.from_environment({}) is None
    with pytest.raises(ValueError, match="^FRACGPU_COMPUTE: "):
        jobs.JobSpec.from_environment({"FRACGPU_PARTITION": "p", "FRACGPU_COMPUTE": "2"})


def test_the_achieved_share_is_written_once():
    assert snapshot.achieved_share(1.0, 2.0, 4.0) == 0.25
    assert snapshot.achieved_share(None, 2.0, 4.0) is None     # no earlier read
    assert snapshot.achieved_share(3.0, 2.0, 4.0) is None      # went down: made again
    assert snapshot.achieved_share(1.0, 2.0, 0.0) is None      # no time between the reads
