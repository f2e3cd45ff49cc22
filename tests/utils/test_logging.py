from __future__ import annotations

import logging

from nemo_quagmire.utils.logging import get_logger


def test_info_is_emitted_on_rank_zero_only(monkeypatch, caplog):
    logger = get_logger("tests.rank")
    assert logger.name == "nemo_quagmire.tests.rank"
    with caplog.at_level(logging.INFO, logger="nemo_quagmire"):
        monkeypatch.setenv("RANK", "1")
        logger.info("from rank 1")
        logger.warning("warning from rank 1")
        monkeypatch.setenv("RANK", "0")
        logger.info("from rank 0")
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["warning from rank 1", "from rank 0"]


def test_filter_is_added_once():
    first = get_logger("nemo_quagmire.tests.once")
    again = get_logger("nemo_quagmire.tests.once")
    assert first is again and len(first.filters) == 1
