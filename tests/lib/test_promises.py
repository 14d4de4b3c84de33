"""Memory promises in the shared state (csrc/state/state.cpp), through the library's Region:
the limits a GPU promises add up to at most its memory, and an overcommitted one is best effort.

No GPU is needed: a region is made for a made-up UUID in a private state folder."""

from __future__ import annotations

import pytest

from fracgpu import state

GiB, MiB = 1 << 30, 1 << 20
UUID = "GPU-00000000-0000-0000-0000-00000000beef"


@pytest.fixture
def region(tmp_path):
    folder = tmp_path / "state"
    folder.mkdir(mode=0o700)
    return state.open_region(str(folder), UUID, "test GPU", 4 * GiB)


def refusal(limit: str, promised: str, remains: str) -> str:
    return (f"{limit} does not fit on {UUID} (4GiB): already promised {promised}; {remains} remains. "
            f"Ask for at most {remains}, or pass --overcommit")


@pytest.mark.fault('A memory limit that does not fit beside what the GPU has promised',
                   'refused, naming the promises, to whom, and what remains; `--overcommit` makes it best effort')
def test_a_second_promise_that_does_not_fit_is_refused_naming_the_first(region):
    region.create_partition("team", 3 * GiB, 0, False)
    with pytest.raises(state.DoesNotFit) as refused:
        region.create_partition("other", 3 * GiB, 0, False)
    assert str(refused.value) == refusal("3GiB", "3GiB (team 3GiB)", "1GiB")
    assert isinstance(refused.value, ValueError) and isinstance(refused.value, state.StateError)
    assert [p.name for p in region.partitions()] == ["team"]
    made = region.create_partition("other", 3 * GiB, 0, False, overcommit=True)
    assert made.best_effort and made.memory_limit == 3 * GiB
    assert not region.partition("team").best_effort


def test_what_fits_exactly_is_a_promise_and_overcommit_does_not_mark_it(region):
    region.create_partition("a", 3 * GiB, 0, False)
    fits = region.create_partition("b", GiB, 0, False, overcommit=True)
    assert not fits.best_effort
    with pytest.raises(state.DoesNotFit) as refused:
        region.create_partition("c", MiB, 0, False)
    assert str(refused.value) == refusal("1MiB", "4GiB (a 3GiB, b 1GiB)", "0B")
    region.create_partition("open", 0, 0, False)   # no limit: no promise to check


def test_a_change_is_checked_as_a_creation_and_a_fitting_one_is_a_promise_again(region):
    region.create_partition("team", 3 * GiB, 0, False)
    region.create_partition("small", GiB, 0, False)
    with pytest.raises(state.DoesNotFit) as refused:
        region.update_partition("small", 2 * GiB, None, None)
    assert str(refused.value) == refusal("2GiB", "3GiB (team 3GiB)", "1GiB")
    assert region.partition("small").memory_limit == GiB   # unchanged
    assert region.update_partition("small", 2 * GiB, None, None, overcommit=True).best_effort
    # Its own old limit never counts against it, and a limit that fits makes it a promise again.
    assert not region.update_partition("small", GiB, None, None).best_effort
    assert not region.update_partition("team", 3 * GiB, 0.5, None).best_effort
    assert not region.update_partition("small", 0, None, None).best_effort   # no limit: no promise either


def test_a_promise_is_refused_while_what_it_needs_is_held_without_one(region):
    region.create_partition("scratch", 0, 0, False)
    region.check_promise("team", 4 * GiB)   # nothing is held yet
    with pytest.raises(state.DoesNotFit):
        region.check_promise("team", 4 * GiB + 1)


def test_the_refusal_before_a_job_starts_leaves_the_state_alone(region):
    region.create_partition("team", 3 * GiB, 0, False)
    region.check_promise("run-1", GiB)
    with pytest.raises(state.DoesNotFit) as refused:
        region.check_promise("run-1", GiB + 1)
    assert "already promised 3GiB (team 3GiB); 1GiB remains" in str(refused.value)
    assert [p.name for p in region.partitions()] == ["team"]


# Compute shares are promised as memory is (csrc/shim/cuda/gate.cpp weighs high and normal shares as
# fractions of the device, low shares as fractions of what the others leave).

@pytest.mark.fault('A compute share that does not fit beside the shares a GPU has promised',
                   'refused, naming the promises and what remains; `--overcommit` makes it best effort')
def test_a_share_that_does_not_fit_beside_the_promised_ones_is_refused_naming_them(region):
    region.create_partition("train", 0, 0.9, False)
    with pytest.raises(state.DoesNotFit) as refused:
        region.create_partition("other", 0, 0.9, False)
    assert str(refused.value) == (f"90% of compute does not fit on {UUID}: already promised 90% of its time "
                                  "(train 90%); 10% remains (high and normal shares together). Ask for at most 10%, "
                                  "or pass --overcommit")
    assert [p.name for p in region.partitions()] == ["train"]
    made = region.create_partition("other", 0, 0.9, False, overcommit=True)
    assert made.compute_best_effort and not made.best_effort and made.compute_share == 0.9
    assert not region.partition("train").compute_best_effort
    # What adds up to exactly 100% fits, and a best-effort share is nobody's promise.
    assert not region.create_partition("rest", 0, 0.1, False).compute_best_effort


def test_high_and_normal_shares_add_up_together_and_low_ones_among_themselves(region):
    region.create_partition("serve", 0, 0.5, False, priority="high")
    with pytest.raises(state.DoesNotFit, match="already promised 50% of its time .serve 50%."):
        region.create_partition("train", 0, 0.6, False)
    region.create_partition("train", 0, 0.5, False)
    region.create_partition("batch", 0, 0.7, False, priority="low")   # a share of what the others leave
    with pytest.raises(state.DoesNotFit, match="low-priority partitions already promised 70%"):
        region.create_partition("batch2", 0, 0.4, False, priority="low")


def test_a_change_of_share_or_class_is_checked_as_a_creation(region):
    region.create_partition("a", 0, 0.6, False)
    region.create_partition("b", 0, 0.4, False)
    with pytest.raises(state.DoesNotFit):
        region.update_partition("b", None, 0.5, None)
    assert region.partition("b").compute_share == 0.4   # unchanged
    assert region.update_partition("b", None, 0.5, None, overcommit=True).compute_best_effort
    assert not region.update_partition("b", None, 0.4, None).compute_best_effort   # fits: a promise again
    region.update_partition("a", None, None, None, priority="low")   # moved out of the normal class
    assert not region.update_partition("b", None, 1.0, None).compute_best_effort
    region.check_promise("c", 0, 0.3, "low")
    with pytest.raises(state.DoesNotFit):
        region.check_promise("c", 0, 0.5, "low")


@pytest.mark.fault('`partition create` with a name fracgpu keeps for its private partitions (run-, init-, slurm-)',
                   'refused, saying whose names they are')
def test_names_of_private_partitions_are_fracgpus_own(region):
    for name in ("run-4285", "init-12", "slurm-4242", "run-anything"):
        with pytest.raises(state.StateError, match="are fracgpu's own"):
            region.create_partition(name, GiB, 0, False)
    assert region.partitions() == []
    region.create_partition("runner", GiB, 0, False)   # only the prefixes are kept


def test_memory_the_device_holds_outside_these_books_is_not_promised(region):
    # Another state folder's job (pid 4242) holds 3.5 GiB of this 4 GiB GPU, by the device's own figure.
    region.count_held_outside(((4242, 3 * GiB + 512 * MiB),))
    with pytest.raises(state.DoesNotFit) as refused:
        region.create_partition("team", GiB, 0, False)
    assert ("and the device says 3.5GiB is held outside these books (pid 4242 3.5GiB: another state folder's jobs, "
            "or jobs without fracgpu); 512MiB remains") in str(refused.value)
    assert region.create_partition("team", GiB, 0, False, overcommit=True).best_effort
    assert not region.create_partition("small", 256 * MiB, 0, False).best_effort


def test_a_limit_no_context_fits_in_is_refused_with_the_smallest_usable_one(region):
    with pytest.raises(state.StateError, match=r"memory limit 4B is too small to hold a CUDA context.*the smallest "
                                               r"usable limit is 1MiB"):
        region.create_partition("tiny", 4, 0, False)
    region.create_partition("small", MiB, 0, False)
    with pytest.raises(state.StateError, match="too small"):
        region.update_partition("small", 1000, None, None)
