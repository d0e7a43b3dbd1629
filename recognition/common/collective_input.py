"""The heads' cross-rank input protocol: every rank's inputs described, gathered in ONE allgather, and checked
the same way on every rank.

A head's step starts with a collective. If one rank's input were bad and that rank raised alone, the others
would wait forever in the collective it never joins; so each rank instead sends a header describing its inputs
(shape, label count, integer labels, non-finite count, its first label outside the allowed range) with whatever
rows and labels the head shares, every rank reads every header, and every rank raises the same error, naming
the rank, the input and the value. Nothing is left waiting.

Each rank's segment is a flat float32 array: ``[header int64 | payload labels int64 | payload rows float32]``,
bit-cast (the collective copies bytes; no arithmetic touches them), so int64 class ids stay exact and segments
of different lengths (a shape mismatch) still arrive.

    local = [LocalInput("batch", x, y, label_range=(-1, C), rule="outside [0, C) (-1 marks an ignored row)")]
    ranks = exchange(local, extras=[flags], payload=(y, x), name="pfc.inputs")
    problems = [p for r, got in enumerate(ranks) for p in input_problems(r, got.inputs[0], dim)]
    raise_problems(problems, "PartialFC: bad input at step 3")
"""
from typing import List, NamedTuple

import numpy as np
import mxnet as mx

from recognition import dist

FIELDS = ("rows", "dim", "ndim", "num_labels", "labels_int", "nonfinite", "bad_row", "bad_label")


def as_numpy(a):
    """A NumPy view of an NDArray or array-like."""
    return a.asnumpy() if isinstance(a, mx.nd.NDArray) else np.asarray(a)


class LocalInput:
    """One input of this rank (rows ``x`` and their labels ``y``), described for the header.

    ``x`` None: labels only (the shape fields say -1). ``label_range`` (low, high): labels outside [low, high)
    are reported (the first one), with ``rule`` explaining the range in the message. Non-integer labels become
    zeros here (reported as such).
    """

    def __init__(self, what, x, y, label_range, rule):
        self.what, self.rule = what, rule
        y = as_numpy(y)
        labels_int = bool(np.issubdtype(y.dtype, np.integer))
        self.y = y.reshape(-1).astype(np.int64) if labels_int else np.zeros(y.size, np.int64)
        low, high = label_range
        outside = np.flatnonzero((self.y < low) | (self.y >= high)) if labels_int else np.zeros(0, np.int64)
        bad_row = int(outside[0]) if outside.size else -1
        if x is None:
            self.x, shape = None, (self.y.size, -1, -1)
        else:
            self.x = np.ascontiguousarray(as_numpy(x), dtype=np.float32)
            shape = (self.x.shape[0] if self.x.ndim else 0, self.x.shape[1] if self.x.ndim == 2 else -1,
                     self.x.ndim)
        nonfinite = 0 if self.x is None else self.x.size - np.count_nonzero(np.isfinite(self.x))
        self.fields = list(shape) + [self.y.size, int(labels_int), nonfinite, bad_row,
                                     int(self.y[bad_row]) if bad_row >= 0 else 0]

    def well_formed(self, dim):
        """Whether this input would pass ``input_problems`` (only then are its rows worth sending)."""
        f = dict(zip(FIELDS, self.fields))
        return not _problems(f, dim, "", "", 0)


class RankInputs(NamedTuple):
    """What one rank sent: its inputs' header fields, its extra integers, its shared labels and rows."""
    inputs: List[dict]
    extras: List[int]
    labels: np.ndarray        # int64 (n,)
    rows: np.ndarray          # float32 (n, dim)


def exchange(inputs, extras, payload, dim, name):
    """Gather every rank's description of ``inputs`` (LocalInputs), its ``extras`` (ints) and its ``payload``
    (labels int64 (n,), rows float32 (n, dim); either may be None for none) with one allgather; returns a RankInputs per
    rank, in rank order. Every rank must pass the same number of inputs and extras."""
    labels, rows = (None, None) if payload is None else payload
    labels = np.zeros(0, np.int64) if labels is None else labels
    rows = np.zeros((0, dim), np.float32) if rows is None else rows
    labels = np.ascontiguousarray(labels, dtype=np.int64).reshape(-1)
    rows = np.ascontiguousarray(rows, dtype=np.float32).reshape(-1, dim)
    header = np.array([f for i in inputs for f in i.fields] + [int(e) for e in extras] + [labels.size, rows.shape[0]],
                      np.int64)
    segment = np.concatenate([header.view(np.float32), labels.view(np.float32), rows.reshape(-1)])
    every = dist.allgather(segment, name=name)
    width, count = 2 * header.size, len(FIELDS)
    out, offset = [], 0
    for _ in range(dist.size()):
        fields = every[offset:offset + width].view(np.int64).tolist()
        offset += width
        blocks = [dict(zip(FIELDS, fields[k * count:(k + 1) * count])) for k in range(len(inputs))]
        num_labels, num_rows = fields[-2:]
        got_labels = every[offset:offset + 2 * num_labels].view(np.int64)
        offset += 2 * num_labels
        got_rows = every[offset:offset + num_rows * dim].reshape(num_rows, dim)
        offset += num_rows * dim
        out.append(RankInputs(blocks, fields[len(inputs) * count:-2], got_labels, got_rows))
    return out


def input_problems(r, fields, dim, local):
    """The problems of rank r's input, as messages, from its header ``fields``; ``local`` is this rank's
    LocalInput of the same position (for its name and label rule, the same on every rank)."""
    return _problems(fields, dim, local.what, local.rule, r)


def _problems(f, dim, what, rule, r):
    problems = []
    if f["ndim"] != -1 and (f["ndim"] != 2 or f["dim"] != dim):
        problems.append("rank %d %s has shape of %d dimensions with %s columns, expected (rows, %d)"
                        % (r, what, f["ndim"], f["dim"] if f["ndim"] == 2 else "no", dim))
    if f["ndim"] != -1 and f["num_labels"] != f["rows"]:
        problems.append("rank %d has %d %s labels for %d rows" % (r, f["num_labels"], what, f["rows"]))
    if not f["labels_int"]:
        problems.append("rank %d passed non-integer %s labels (int32/int64 needed: float32 cannot hold ids "
                        "above 2^24 exactly)" % (r, what))
    elif f["bad_row"] >= 0:
        problems.append("rank %d %s row %d has label %d %s" % (r, what, f["bad_row"], f["bad_label"], rule))
    if f["nonfinite"]:
        problems.append("rank %d %s has %d non-finite values (NaN/inf)" % (r, what, f["nonfinite"]))
    return problems


def raise_problems(problems, prefix):
    """Raise one ValueError listing ``problems`` (the same list on every rank, so every rank raises alike)."""
    if problems:
        raise ValueError("%s: %s" % (prefix, "; ".join(problems)))
