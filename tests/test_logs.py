"""Quiet by default: upop_fx's calls hold back the libraries' noise (only inside them), a compress logs a few
INFO lines, and ``verbose=`` shows or hides them."""

from __future__ import annotations

import contextlib
import logging
import warnings

import pytest
import torch

import upop_fx
from upop_fx.logs import THIRD_PARTY, quiet


@pytest.fixture(scope="module")
def bert():
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    model = BertModel(BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                 vocab_size=100)).eval()
    return model, {"input_ids": torch.randint(1, 100, (2, 8))}


def test_a_compress_and_an_export_log_a_few_lines_of_upop_fx_only(bert, caplog, tmp_path):
    model, inputs = bert
    with contextlib.ExitStack() as stack:  # INFO everywhere, whatever an earlier test set on these loggers
        for name in ("", "upop_fx", *THIRD_PARTY):
            stack.enter_context(caplog.at_level(logging.INFO, logger=name or None))
        caught = stack.enter_context(warnings.catch_warnings(record=True))
        warnings.simplefilter("always")
        result = upop_fx.compress(model, inputs, ratio=0.5, search_steps=2, retrain_steps=1)
        upop_fx.export_onnx(result.model, inputs, tmp_path / "m.onnx")
    names = sorted({r.name for r in caplog.records})
    assert all(n.startswith("upop_fx") for n in names), [(r.name, r.getMessage()[:200]) for r in caplog.records if not r.name.startswith("upop_fx")][:3]  # no onnx_ir / onnxscript / torch.onnx notes
    assert 3 <= len(caplog.records) < 40, [r.getMessage() for r in caplog.records]
    assert not [w for w in caught if "LeafSpec" in str(w.message) or "torchvision" in str(w.message)]
    assert not any("use_cache" in r.getMessage() for r in caplog.records)  # an encoder: no note about a KV cache


def test_quiet_changes_nothing_outside_its_block():
    logger = logging.getLogger("onnx_ir")
    before = logger.level
    logger.setLevel(logging.DEBUG)
    try:
        with quiet():
            assert not logger.isEnabledFor(logging.INFO)
            with quiet():  # re-entrant
                pass
            assert not logger.isEnabledFor(logging.INFO)
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(before)


@pytest.mark.parametrize("verbose", [True, False])
def test_verbose_shows_or_hides_the_phases(bert, capsys, verbose):
    """verbose=True prints the phases even where the application configured no logging; verbose=False keeps
    upop_fx to warnings even where the application logs it at INFO. Both leave the logger as they found it."""
    import sys

    model, inputs = bert
    logger, root = logging.getLogger("upop_fx"), logging.getLogger()
    level, handlers, root_handlers = logger.level, list(logger.handlers), list(root.handlers)
    for h in root_handlers:
        root.removeHandler(h)
    app = None
    if not verbose:  # the application's own INFO handler for upop_fx
        app = logging.StreamHandler(sys.stderr)
        logger.addHandler(app)
        logger.setLevel(logging.INFO)
    try:
        upop_fx.compress(model, inputs, ratio=0.5, method="magnitude", retrain_steps=0, verbose=verbose)
        after = (list(logger.handlers), logger.level)
    finally:
        if app is not None:
            logger.removeHandler(app)
        for h in root_handlers:
            root.addHandler(h)
        logger.setLevel(level)
    err = capsys.readouterr().err
    assert ("compressed BertModel" in err) == verbose, err
    assert after == (handlers + ([app] if app else []), logging.INFO if app else level)
