"""recognition/elastic_rows.py: where each rank's rows are copied, who sends which rows after a change of world, and
the alltoall that moves them (against NumPy references; the exchange on 1 and 3 ranks)."""
import numpy as np
import pytest

from recognition import elastic_rows
from recognition.dist import shard_range
from tests.harness import run_ranks


def test_keepers_are_on_another_host():
    assert elastic_rows.keepers(["a", "b", "c"]) == [1, 2, 0]               # one slot per host: the next rank
    assert elastic_rows.keepers(["a"] * 4) == [1, 2, 3, 0]                 # one host: the next rank, no better
    assert elastic_rows.keepers(["a", "a", "b", "b"]) == [2, 3, 0, 1]      # the same local rank, next host
    assert elastic_rows.keepers(["a", "a", "a", "b"]) == [3, 3, 3, 0]      # the next host has fewer ranks
    assert elastic_rows.keepers(["a", "b", "b", "c"]) == [1, 3, 3, 0]
    assert elastic_rows.keepers(["a"]) == [0]                              # a world of one keeps no copy
    for hosts in (["a", "a", "b", "b", "c"], ["x", "y", "y", "y"]):
        keep = elastic_rows.keepers(hosts)
        assert all(hosts[k] != hosts[r] for r, k in enumerate(keep))


def _reference_check(pieces, needs, transfers):
    """Every needed row comes exactly once, from a rank that holds it; a rank holding a row takes it from itself,
    else the first holder in the pieces' order gives it."""
    for dst, (lo, hi) in enumerate(needs):
        got = np.zeros(hi - lo, np.int64)
        for src, d, a, b in transfers:
            if d != dst:
                continue
            assert lo <= a < b <= hi
            got[a - lo:b - lo] += 1
            for row in range(a, b):
                holders = [h for h, p, q in pieces if p <= row < q]
                assert src == (dst if dst in holders else holders[0]), (row, src, holders)
        assert np.all(got == 1), (dst, got)
    assert transfers == sorted(transfers)


def test_plan_transfers_covers_every_need_once_from_a_holder():
    rng = np.random.default_rng(5)
    for _ in range(200):
        rows = int(rng.integers(3, 40))
        old, new = int(rng.integers(1, 6)), int(rng.integers(1, 6))
        if rows < max(old, new):
            continue
        owned = [shard_range(rows, old, r) for r in range(old)]
        keep = elastic_rows.keepers(["h%d" % r for r in range(old)])
        lost = set(rng.choice(old, size=int(rng.integers(0, old)), replace=False).tolist())
        survivors = [r for r in range(old) if r not in lost]
        renumber = {r: i for i, r in enumerate(survivors)}
        pieces = [(renumber[r], *owned[r]) for r in survivors]
        pieces += [(renumber[keep[r]], *owned[r]) for r in range(old) if keep[r] in renumber and keep[r] != r]
        needs = [shard_range(rows, new, d) for d in range(new)]
        covered = np.zeros(rows, bool)
        for _, lo, hi in pieces:
            covered[lo:hi] = True
        if covered.all():
            _reference_check(pieces, needs, elastic_rows.plan_transfers(pieces, needs))
        else:
            with pytest.raises(elastic_rows.MissingRows) as err:
                elastic_rows.plan_transfers(pieces, needs)
            missing = np.zeros(rows, bool)
            for lo, hi in err.value.gaps:
                missing[lo:hi] = True
            np.testing.assert_array_equal(missing, ~covered)


def test_two_neighbours_lost_leave_a_gap_named_by_rows():
    owned = [shard_range(10, 4, r) for r in range(4)]        # [0,3) [3,6) [6,8) [8,10); copies on r + 1
    pieces = [(0, *owned[0]), (1, *owned[3]), (0, *owned[3])]   # ranks 1 and 2 lost: [3,6) is gone, [6,8) kept by 3
    with pytest.raises(elastic_rows.MissingRows, match=r"rows \[3, 6\) are held by no rank"):
        elastic_rows.plan_transfers(pieces + [(1, *owned[2])], [shard_range(10, 2, d) for d in range(2)])


def test_encode_decode_round_trip():
    rng = np.random.default_rng(0)
    rows = {"weight": rng.standard_normal((5, 3)).astype(np.float32), "step": np.arange(5, dtype=np.int64),
            "pair": rng.integers(0, 9, (5, 2, 2)).astype(np.uint8)}
    layout = elastic_rows.layout_of(rows)
    back = elastic_rows._decode(elastic_rows._encode(rows, layout, 1, 4), layout)
    for name in rows:
        np.testing.assert_array_equal(back[name], rows[name][1:4])
        assert back[name].dtype == rows[name].dtype


def exchange_body(rows, old, new, lost, round_bytes):
    """This rank holds what a survivor of an ``old``-rank world that lost the ranks ``lost`` held (its rows and the
    copies it kept); returns the rows it gets for its part of a ``new``-rank sharding, once per ``round_bytes``
    (a transfer spanning a rank's own rows and a copy in one round, and the same in many small rounds)."""
    return [_exchange(rows, old, new, lost, size) for size in round_bytes]


def _exchange(rows, old, new, lost, round_bytes):
    from recognition import dist
    elastic_rows.ROUND_BYTES = round_bytes
    full = {"w": np.arange(rows * 4, dtype=np.float32).reshape(rows, 4) / 7,
            "m": -np.arange(rows, dtype=np.int64)[:, None] * np.ones((1, 3), np.int64)}
    owned = [shard_range(rows, old, r) for r in range(old)]
    keep = elastic_rows.keepers(["h%d" % r for r in range(old)])
    survivors = [r for r in range(old) if r not in lost]
    assert len(survivors) == dist.size()
    me_old = survivors[dist.rank()]
    mine = [owned[me_old]] + [owned[r] for r in range(old) if keep[r] == me_old and r != me_old]
    held = [(lo, hi, {k: v[lo:hi].copy() for k, v in full.items()}) for lo, hi in mine]
    pieces = [(survivors.index(r), *owned[r]) for r in survivors]
    pieces += [(survivors.index(keep[r]), *owned[r]) for r in range(old) if keep[r] in survivors and keep[r] != r]
    needs = [shard_range(rows, new, d) for d in range(new)]
    transfers = elastic_rows.plan_transfers(pieces, needs)
    got = elastic_rows.exchange(transfers, held, elastic_rows.layout_of(full), "test.exchange")
    lo, hi = needs[dist.rank()] if dist.rank() < new else (0, 0)
    return {"need": (lo, hi), "got": got, "full": full}


def test_exchange_on_one_rank(monkeypatch):
    import horovod.mxnet as hvd
    hvd.init()
    monkeypatch.setattr(elastic_rows, "ROUND_BYTES", elastic_rows.ROUND_BYTES)
    for result in exchange_body(rows=11, old=2, new=1, lost={1}, round_bytes=(40, 1 << 20)):
        assert result["need"] == (0, 11)
        _check_received(result)


def _check_received(result):
    lo, hi = result["need"]
    pieces = result["got"]
    assert [p[0] for p in pieces] == sorted(p[0] for p in pieces)
    covered = np.concatenate([np.arange(a, b) for a, b, _ in pieces]) if pieces else np.zeros(0, np.int64)
    np.testing.assert_array_equal(covered, np.arange(lo, hi))
    for a, b, arrays in pieces:
        for name, full in result["full"].items():
            np.testing.assert_array_equal(arrays[name], full[a:b])
            assert arrays[name].dtype == full.dtype


def test_exchange_on_three_ranks_reshards_from_survivors_and_copies():
    # a world of 4 lost rank 1: its rows come from its keeper (old rank 2); several rounds of small alltoalls
    for results in run_ranks(exchange_body, np=3, timeout=120,
                             kwargs={"rows": 23, "old": 4, "new": 3, "lost": {1}, "round_bytes": (64, 1 << 20)}):
        for result in results:
            assert result["need"][1] > result["need"][0]
            _check_received(result)
