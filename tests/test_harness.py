"""The test harness itself: a multi-rank test whose rank dies fails at once instead of hanging CI."""
import os
import time

import pytest

from conftest import run_distributed


def die_on_rank_one(rank):
    import torch
    import torch.distributed as dist

    if rank == 1:
        os._exit(3)  # what a segfault or the OOM killer looks like to the parent: no result, no exception
    dist.all_reduce(torch.ones(1))  # rank 0 waits for rank 1 forever (gloo's own timeout is 30 min)
    return rank


def slow(rank):
    time.sleep(60)
    return rank


def test_a_rank_that_dies_fails_the_test_with_its_exit_code(tmp_path):
    start = time.monotonic()
    with pytest.raises(RuntimeError, match=r"rank\(s\) \[1\] exited \(codes \[3\]\)"):
        run_distributed(die_on_rank_one, 2, tmp_path=tmp_path)
    assert time.monotonic() - start < 60


def test_a_group_past_its_timeout_fails_and_its_ranks_are_killed(tmp_path):
    start = time.monotonic()
    with pytest.raises(TimeoutError, match="slow on 2 ranks: no result from ranks \\[0, 1\\] after 5 s"):
        run_distributed(slow, 2, tmp_path=tmp_path, timeout=5)
    assert time.monotonic() - start < 30


def test_the_same_test_may_start_several_groups(tmp_path):
    """Each call gets its own store file (a reused file can deadlock the rendezvous)."""
    for _ in range(3):
        assert run_distributed(slow_free, 2, tmp_path=tmp_path) == [0, 1]


def slow_free(rank):
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return rank * int(t.item()) // 2
