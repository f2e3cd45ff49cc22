from __future__ import annotations

import logging

import torch.distributed as dist

from nemo_quagmire.utils import logging as qlogging
from nemo_quagmire.utils.logging import get_logger, global_rank


def test_info_is_emitted_on_rank_zero_only(monkeypatch, caplog):
    logger = get_logger("tests.rank")
    assert logger.name == "nemo_quagmire.tests.rank"
    with caplog.at_level(logging.INFO, logger="nemo_quagmire"):
        monkeypatch.setattr(qlogging, "global_rank", lambda: 1)
        logger.info("from rank 1")
        logger.warning("warning from rank 1")
        monkeypatch.setattr(qlogging, "global_rank", lambda: 0)
        logger.info("from rank 0")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["warning from rank 1", "from rank 0"]


def test_rank_comes_from_the_launcher_before_the_process_group_exists(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setenv("RANK", "3")
    assert global_rank() == 3
    monkeypatch.delenv("RANK")
    assert global_rank() == 0


def test_filter_is_added_once():
    first = get_logger("nemo_quagmire.tests.once")
    again = get_logger("nemo_quagmire.tests.once")
    assert first is again and len(first.filters) == 1
