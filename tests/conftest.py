"""Test fixtures and helpers shared by the test modules.

The training-loop tests use a tiny conv net (``tiny_symbol``) in place of ``symbols.get_symbol``: the loop's
behaviour does not depend on the backbone, and the real ones cost seconds per step on this CPU. The demo
(``make demo``) trains the real MobileFaceNet end to end. In the pytest process the ``tiny_backbone`` fixture
patches it in (restored after the test); a rank process of its own calls ``patch_backbone()``.
"""
import pytest

import symbols

REAL_GET_SYMBOL = symbols.get_symbol    # the real backbones, for tests that need them after a leaked patch

# a small Partial FC run on the synthetic reader: 203 classes, 16-d embeddings, batches of 4 per rank
TINY_TRAIN_FLAGS = ["--dataset", "bench_1m", "--num-classes", "203", "--embedding-size", "16", "--batch-size", "4",
                    "--lr", "0.2", "--num-epochs", "2", "--frequent", "1", "--verbose", "0", "--checkpoint-every",
                    "3"]


def tiny_train_argv(out, *extra):
    """TINY_TRAIN_FLAGS writing into ``out``, plus ``extra`` flags."""
    return TINY_TRAIN_FLAGS + ["--output", str(out)] + list(extra)


def tiny_symbol(name, embedding_size=512, fp16=False, dropout=0.0, **unused):
    """A two-conv stand-in backbone with the real ones' interface (raw RGB in, fc1 out, dropout)."""
    import mxnet as mx
    x = (mx.sym.Variable("data") - 127.5) * 0.0078125
    x = mx.sym.Convolution(x, num_filter=8, kernel=(4, 4), stride=(4, 4), no_bias=True, name="conv1")
    x = mx.sym.relu(mx.sym.BatchNorm(x, name="bn1"))
    x = mx.sym.Convolution(x, num_filter=8, kernel=(4, 4), stride=(4, 4), no_bias=True, name="conv2")
    if dropout > 0:
        x = mx.sym.Dropout(x, p=dropout)
    x = mx.sym.FullyConnected(mx.sym.flatten(x), num_hidden=embedding_size, name="pre_fc1")
    return mx.sym.BatchNorm(x, fix_gamma=True, name="fc1")


def patch_backbone():
    """The tiny backbone for a rank process of its own (never in the pytest process: use ``tiny_backbone``)."""
    symbols.get_symbol = tiny_symbol


@pytest.fixture
def tiny_backbone(monkeypatch):
    monkeypatch.setattr(symbols, "get_symbol", tiny_symbol)


@pytest.fixture
def real_backbones(monkeypatch):
    """``symbols.get_symbol`` as shipped, even when a test before this one patched it without monkeypatch."""
    monkeypatch.setattr(symbols, "get_symbol", REAL_GET_SYMBOL)
