"""Memory promises in the shared state (csrc/state/state.cpp), through the library's Region:
the limits a GPU promises add up to at most its memory, and an overcommitted one is best effort.

No GPU is needed: a region is made for a made-up UUID in a private state folder."""

from __future__ import annotations

import pytest

from fracgpu import state

GiB = 1 << 30
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
        region.create_partition("c", 1, 0, False)
    assert str(refused.value) == refusal("1B", "4GiB (a 3GiB, b 1GiB)", "0B")
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
