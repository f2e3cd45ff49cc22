"""utils.distributed without a process group (the light layer, a single process): sums are copies, gathers
hold the one object. Several ranks: tests/megatron/test_multiprocess.py, tests/scripts (DP=2 runs)."""

from __future__ import annotations

import torch

from nemo_quagmire.utils.distributed import all_gather_objects, all_reduce_sum, group_rank_and_size


def test_one_process_without_a_group_is_rank_0_of_1():
    tensor = torch.tensor([1.0, 2.0])
    summed = all_reduce_sum(tensor)
    assert torch.equal(summed, tensor) and summed is not tensor  # a copy the caller may modify
    assert all_gather_objects({"a": 1}) == [{"a": 1}]
    assert group_rank_and_size() == (0, 1)
