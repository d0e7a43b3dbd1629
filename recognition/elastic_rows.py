"""Row-sharded state across a change of world (``--elastic``): the commit's copy of each rank's rows on another
host, and the re-sharding of committed rows onto a new world. Both move rows with ``hvd.alltoall``.

A training method may shard tables by rows over the ranks (Partial FC: the class centres and their momentum, rank r
holding rows [start_r, end_r)). A lost rank's rows exist nowhere else. So at every commit each rank also sends a
copy of its rows to a *keeper* on another host (``keepers``): Horovod's elastic driver drops a failed worker's whole
host, and a copy on the same host would go with it. After a change, the survivors hold pieces: their own rows and
the copies they keep, in the layout of the world that committed them. ``plan_transfers`` picks one holder for
every row a rank of the new world needs, and ``exchange`` moves the rows: each holder sends each new rank only
the rows that rank needs, nobody gathers the whole table.
"""
import bisect

import numpy as np
import mxnet as mx

from recognition import dist

ROUND_BYTES = 1 << 28       # bytes one rank sends per alltoall round (an MXNet array holds < 2^31 elements)


class MissingRows(ValueError):
    """Rows that no surviving rank holds: ``gaps`` lists them as [(start, end), ...]."""

    def __init__(self, gaps):
        self.gaps = gaps
        super().__init__("rows %s are held by no rank" % ", ".join("[%d, %d)" % g for g in gaps))


def keepers(hosts):
    """For rank r (``hosts[r]``: its host; a host's ranks come one after the other, as horovodrun numbers them) the
    rank that keeps the copy of r's rows: the rank of the same local rank on the next host (cyclically; modulo that
    host's ranks when it has fewer), or, when every rank is on one host, rank r + 1. A rank that would keep its
    own copy (a world of one) keeps none: ``keepers[r] == r``."""
    members = {}
    for r, host in enumerate(hosts):
        members.setdefault(host, []).append(r)
    names = list(members)
    if len(names) == 1:
        return [(r + 1) % len(hosts) for r in range(len(hosts))]
    out = []
    for r, host in enumerate(hosts):
        following = members[names[(names.index(host) + 1) % len(names)]]
        out.append(following[members[host].index(r) % len(following)])
    return out


def plan_transfers(pieces, needs):
    """Which rank sends which rows to which. ``pieces``: [(holder, start, end)], the rows each rank can give, in
    order of preference (several ranks may hold the same rows); ``needs[d]``: (start, end) of the rows rank d of the
    new world must have. Returns [(src, dst, start, end)] sorted, covering every need exactly once (a rank takes
    rows it holds itself from itself). Raises ``MissingRows`` when some needed rows are held by nobody."""
    points = sorted({p for _, lo, hi in pieces for p in (lo, hi)} | {p for lo, hi in needs for p in (lo, hi)})
    holders = [[] for _ in points]          # holders of the segment [points[i], points[i + 1])
    for holder, lo, hi in pieces:
        for i in range(bisect.bisect_left(points, lo), bisect.bisect_left(points, hi)):
            holders[i].append(holder)
    transfers, gaps = [], []
    for dst, (lo, hi) in enumerate(needs):
        for i in range(bisect.bisect_left(points, lo), bisect.bisect_left(points, hi)):
            a, b = points[i], points[i + 1]
            if not holders[i]:
                if gaps and gaps[-1][1] == a:
                    gaps[-1] = (gaps[-1][0], b)
                else:
                    gaps.append((a, b))
                continue
            src = dst if dst in holders[i] else holders[i][0]
            last = transfers[-1] if transfers else None
            if last is not None and last[:2] == (src, dst) and last[3] == a:
                transfers[-1] = (src, dst, last[2], b)
            else:
                transfers.append((src, dst, a, b))
    if gaps:
        raise MissingRows(gaps)
    return sorted(transfers)


def layout_of(rows):
    """[(name, dtype, row shape)] of a {name: array} of rows, sorted by name: what ``exchange`` needs to decode."""
    return [(name, rows[name].dtype.str, rows[name].shape[1:]) for name in sorted(rows)]


def _encode(rows, layout, lo, hi):
    """Rows [lo, hi) of the {name: array} ``rows`` as one uint8 block, a row of bytes per row."""
    return np.concatenate([np.ascontiguousarray(rows[name][lo:hi]).reshape(hi - lo, -1).view(np.uint8)
                           for name, _, _ in layout], axis=1)


def _decode(block, layout):
    """The inverse of ``_encode``: {name: array} of the rows of ``block``."""
    out, offset = {}, 0
    for name, dtype, shape in layout:
        width = np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64))
        out[name] = np.ascontiguousarray(block[:, offset:offset + width]).view(dtype).reshape((-1,) + tuple(shape))
        offset += width
    return out


def exchange(transfers, held, layout, name):
    """Move rows along ``transfers`` ([(src, dst, start, end)], the same list on every rank; a collective).
    ``held``: [(start, end, {name: array})] the pieces this rank holds, covering what it sends. Returns [(start,
    end, {name: array})] of the transfers whose destination is this rank, sorted by start.

    Rows travel as bytes (``layout``: ``layout_of`` of the rows), in rounds of at most ``ROUND_BYTES`` per rank."""
    me, size = dist.rank(), dist.size()
    width = sum(np.dtype(dtype).itemsize * int(np.prod(shape, dtype=np.int64)) for _, dtype, shape in layout)
    mine = [t for t in transfers if t[1] == me]
    received = [(lo, hi, np.empty((hi - lo, width), np.uint8)) for _, _, lo, hi in mine]
    if not width:
        raise ValueError("elastic: rows of no bytes to exchange (layout %r)" % (layout,))
    # the most rows any rank sends or receives (e.g. one new rank gathering from many) sets the number of rounds
    moved = [0] * size
    for src, dst, lo, hi in transfers:
        moved[src] += hi - lo
        moved[dst] += (hi - lo) if dst != src else 0
    rounds = max(1, -(-max(moved) * width // ROUND_BYTES))
    for k in range(rounds):
        parts = [_round_part(t, k, rounds) for t in transfers]
        if size == 1:
            blocks = [_source_block(held, layout, part) for t, part in zip(transfers, parts) if part[1] > part[0]]
            incoming = np.concatenate(blocks) if blocks else np.zeros((0, width), np.uint8)
        else:
            incoming = _alltoall(transfers, parts, held, layout, width, me, size, "%s.%d" % (name, k))
        offset = 0
        for (src, dst, lo, hi), (a, b) in sorted(zip(transfers, parts), key=lambda tp: (tp[0][0], tp[0][2])):
            if dst != me:
                continue
            block = received[mine.index((src, dst, lo, hi))][2]
            block[a - lo:b - lo] = incoming[offset:offset + b - a]
            offset += b - a
    return sorted(((lo, hi, _decode(block, layout)) for lo, hi, block in received), key=lambda piece: piece[0])


def _round_part(transfer, k, rounds):
    """The rows [a, b) of ``transfer`` that round k of ``rounds`` moves."""
    _, _, lo, hi = transfer
    step = -(-(hi - lo) // rounds)
    return min(hi, lo + k * step), min(hi, lo + (k + 1) * step)


def _source_block(held, layout, part):
    """Rows [a, b) from this rank's pieces (a transfer may span several: its own rows and a copy it keeps)."""
    a, b = part
    blocks = []
    while a < b:
        lo, hi, rows = max(((lo, hi, rows) for lo, hi, rows in held if lo <= a < hi), key=lambda p: p[1],
                           default=(None, None, None))
        if rows is None:
            raise RuntimeError("elastic: rank %d was to send row %d, which it does not hold" % (dist.rank(), a))
        end = min(hi, b)
        blocks.append(_encode(rows, layout, a - lo, end - lo))
        a = end
    return np.concatenate(blocks)


def _alltoall(transfers, parts, held, layout, width, me, size, name):
    """One round: what this rank sends each rank, in rank order, then what it receives, in source order. Each rank
    also sends itself one spare row (MXNet has no empty arrays), dropped on arrival."""
    import horovod.mxnet as hvd
    blocks, splits = [], [0] * size
    for (src, dst, lo, hi), part in sorted(zip(transfers, parts), key=lambda tp: (tp[0][1], tp[0][2])):
        if src == me and part[1] > part[0]:
            blocks.append((dst, _source_block(held, layout, part)))
            splits[dst] += part[1] - part[0]
    blocks.append((me, np.zeros((1, width), np.uint8)))
    splits[me] += 1
    send = np.concatenate([block for _, block in sorted(blocks, key=lambda db: db[0])])   # stable: spare last
    out, got = hvd.alltoall(mx.nd.array(send, dtype=np.uint8), splits=mx.nd.array(splits, dtype="int32"), name=name)
    incoming, got = out.asnumpy(), got.asnumpy()
    keep = np.ones(len(incoming), bool)
    keep[int(np.sum(got[:me + 1])) - 1] = False            # this rank's own spare row: the last of its own part
    return incoming[keep]
