"""A one-process megatron world (gloo on CPU, TP = PP = 1) shared by the in-process tests of this package.

Megatron's parallel state is process-global, so it is created once per session and torn down at the end.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session")
def megatron_world1() -> Iterator[None]:
    """Megatron parallel state for one process (TP = PP = CP = DP = 1), seeded with 1234."""
    import torch.distributed as dist

    from nemo_quagmire.config.model import get_model_preset
    from nemo_quagmire.megatron.parallel import ParallelConfig, destroy_parallel, initialize_parallel

    owns_group = not dist.is_initialized()
    initialize_parallel(get_model_preset("tiny"), ParallelConfig(), seed=1234)
    yield
    destroy_parallel(destroy_process_group=owns_group)
