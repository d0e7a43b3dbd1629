"""The dynamic class queue on 1, 2 and 3 ranks against the plain reference of docs/ffc.md, and its contracts."""
import numpy as np
import pytest

from tests.ffc.ffc_reference import ReferenceQueue, insert_gallery, rank_loss, reference_side, unit_rows
from tests.harness import run_ranks

Q, DIM, IDS, HALF = 12, 16, 3, 2          # queue slots, embedding size, identities per rank, instance rows / side
MARGINS = {"arcface": 0.5, "cosface": 0.35, "sv": 0.3}
LOSSES = list(MARGINS)
FULL_LABELS = list(range(200, 200 + Q))    # the preloaded full queue, least recently used first


def full_state(seed=5):
    """A full queue: random unit banks, labels 200.. (200 least recently used) on shuffled slots, random bits."""
    rng = np.random.default_rng(seed)
    banks = unit_rows(rng.standard_normal((2 * Q, DIM))).reshape(2, Q, DIM).astype(np.float32)
    slots = np.stack([FULL_LABELS, rng.permutation(Q)], axis=1).astype(np.int64)
    return {"banks": banks, "slots": slots, "next_row": rng.integers(0, 2, Q).astype(np.uint8)}


def scenario(world, steps=4, seed=0):
    """FFC-like steps: rank r's x = [ids; c], y = [ids; d]; side A scores x against y's inserts (discarded),
    side B scores y against x's inserts (kept). Forced: rank 0's first gallery starts with two new labels and
    then 200, the least recently used label of the full queue, which the new labels evict first (a label losing
    its slot before its own insert); label 0 twice in one gallery; one identity on every rank; labels 205-211 of
    the full queue scored without being inserted."""
    rng = np.random.default_rng(seed)
    pool = np.array(list(range(24)) + FULL_LABELS[5:])
    steps_out = []
    for step in range(steps):
        ranks = []
        for r in range(world):
            ids = rng.choice(24, IDS, replace=False)
            c, d = rng.choice(pool, HALF), rng.choice(pool, HALF)
            if step == 0 and r == 0:
                ids, d = np.array([0, 1, 200]), np.array([0, FULL_LABELS[-1]])
            if r > 0:
                ids[0] = ranks[0]["x_labels"][0]
            ranks.append({"x": rng.standard_normal((IDS + HALF, DIM)).astype(np.float32) * 3,
                          "y": rng.standard_normal((IDS + HALF, DIM)).astype(np.float32) * 3,
                          "x_labels": np.concatenate([ids, c]).astype(np.int64),
                          "y_labels": np.concatenate([ids, d]).astype(np.int64)})
        steps_out.append(ranks)
    return steps_out


def ordered_calls(steps):
    """(step, probe key, gallery key, keep) of every forward_backward call: side A, then side B of each step."""
    return [(s, probe, gallery, keep) for s in range(len(steps))
            for probe, gallery, keep in (("x", "y", False), ("y", "x", True))]


def scenario_body(losses, steps=4):
    """Every rank: for each loss type and each start (fresh queue, preloaded full queue), run the scenario and
    return the initial state and, after every call, the loss, the gradient and the whole state."""
    import horovod.mxnet as hvd
    from recognition.ffc.class_queue import DynamicClassQueue
    rank = hvd.rank()
    data = scenario(hvd.size(), steps)
    out = {}
    for loss_type in losses:
        for start in ("fresh", "full"):
            dcq = DynamicClassQueue(Q, DIM, loss=loss_type, margin=MARGINS[loss_type], seed=3)
            if start == "full":
                dcq.load_state_dict(full_state())
            record = {"initial": dcq.state_dict(), "calls": []}
            for step, probe, gallery, keep in ordered_calls(data):
                mine = data[step][rank]
                loss, grad = dcq.forward_backward(mine[probe], mine[probe + "_labels"], mine[gallery],
                                                  mine[gallery + "_labels"], keep=keep)
                record["calls"].append({"loss": loss, "grad": grad, "state": dcq.state_dict()})
            out[(loss_type, start)] = record
    return out


def assert_same_bits(states):
    for key in ("banks", "slots", "next_row"):
        first = states[0][key]
        for other in states[1:]:
            assert other[key].dtype == first.dtype and other[key].tobytes() == first.tobytes(), key


def bad_input_body():
    """Every rank: feed one bad input at a time (on one rank only) and record the error each rank raised; then
    a good call, which must still work (no rank was left behind in a collective)."""
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.ffc.class_queue import DynamicClassQueue
    rank = hvd.rank()
    dcq = DynamicClassQueue(Q, DIM, seed=3)
    dcq.load_state_dict(full_state())
    before = dcq.state_dict()
    rng = np.random.default_rng(rank)
    x, labels = rng.standard_normal((4, DIM)).astype(np.float32), np.array([1, 2, 201, 3])
    nan_x, inf_x = x.copy(), x.copy()
    nan_x[1, 2], inf_x[3, 0] = np.nan, -np.inf

    def on(r, bad, good):
        return bad if rank == r else good

    cases = {
        "probe_label_negative": (x, on(1, np.array([1, -2, 3, 4]), labels), x, labels),
        "gallery_label_negative": (x, labels, x, on(0, np.array([1, 2, 3, -7]), labels)),
        "probe_nan": (on(1, nan_x, x), labels, x, labels),
        "gallery_inf": (x, labels, on(0, inf_x, x), labels),
        "probe_dim": (on(0, x[:, :DIM - 1], x), labels, x, labels),
        "gallery_dim": (x, labels, on(1, np.ones((4, DIM + 2), np.float32), x), labels),
        "probe_label_count": (x, on(1, labels[:3], labels), x, labels),
        "gallery_label_count": (x, labels, on(0, x[:3], x), labels),
        "float_labels": (x, labels, x, on(1, labels.astype(np.float32), labels)),
        "probe_1d": (on(0, x[0], x), labels, x, labels),
        "ndarray_nan": (mx.nd.array(on(1, nan_x, x)), mx.nd.array(labels, dtype="int64"), mx.nd.array(x),
                        mx.nd.array(labels, dtype="int64")),
    }
    messages = {}
    for name, args in cases.items():
        try:
            dcq.forward_backward(*args, keep=True)
            messages[name] = None
        except ValueError as err:
            messages[name] = str(err)
    try:                                            # side A on one rank, side B on the other: the queues would drift
        dcq.forward_backward(x, labels, x, labels, keep=rank == 0)
        messages["keep_mismatch"] = None
    except ValueError as err:
        messages["keep_mismatch"] = str(err)
    diverged = DynamicClassQueue(Q, DIM, seed=3)    # rank 1 restored another state
    diverged.load_state_dict(full_state() if rank == 0 else {**full_state(), "slots": full_state()["slots"][:5]})
    try:
        diverged.forward_backward(x, labels, x, labels)
        messages["queues_differ"] = None
    except ValueError as err:
        messages["queues_differ"] = str(err)
    unchanged = dcq.state_dict()
    loss, _ = dcq.forward_backward(x, labels, x, labels, keep=True)
    return messages, before, unchanged, loss


def multi_rank_body(bad_input):
    """The jobs of the multi-rank tests, one launch per world size (starting ranks is the slow part)."""
    return {"scenario": scenario_body(LOSSES), "bad_input": bad_input_body() if bad_input else None}


@pytest.fixture(scope="module")
def rank_results():
    """world size -> every rank's ``multi_rank_body`` result; one process runs in this one (Horovod with one
    process needs no horovodrun), 2 and 3 ranks under horovodrun, each launched once."""
    import horovod.mxnet as hvd
    cache = {}

    def results(world):
        if world not in cache:
            if world == 1:
                hvd.init()
                cache[world] = [multi_rank_body(bad_input=False)]
            else:
                cache[world] = run_ranks(multi_rank_body, np=world, timeout=300, kwargs={"bad_input": world == 2})
        return cache[world]
    return results


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_matches_reference_on_every_rank(rank_results, world_size):
    """Loss, gradient and queue state after each of 8 calls (4 steps, sides A and B), for each loss type, from a
    fresh queue and from a full one, equal the reference; the state is bit-identical on every rank after every
    call, and a keep=False call leaves it bit-identical to before."""
    results = [r["scenario"] for r in rank_results(world_size)]
    data = scenario(world_size)
    for loss_type in LOSSES:
        m = MARGINS[loss_type]
        for start in ("fresh", "full"):
            per_rank = [results[r][(loss_type, start)] for r in range(world_size)]
            assert_same_bits([p["initial"] for p in per_rank])
            initial = per_rank[0]["initial"]
            ref = ReferenceQueue(initial["banks"], initial["slots"], initial["next_row"])
            previous, fresh_rows, evictions = initial, 0, 0
            for k, (step, probe, gallery, keep) in enumerate(ordered_calls(data)):
                ranks = data[step]
                after, ref_loss, ref_grads = reference_side(
                    ref, [d[gallery] for d in ranks], [d[gallery + "_labels"] for d in ranks],
                    [d[probe] for d in ranks], [d[probe + "_labels"] for d in ranks], loss_type, m)
                fresh_rows += sum(int(label) not in after.slot_of for d in ranks for label in d[probe + "_labels"])
                evictions += after.evictions - ref.evictions
                if keep:
                    ref = after
                calls = [p["calls"][k] for p in per_rank]
                where = "%s, %s start, call %d (step %d, keep=%s)" % (loss_type, start, k, step, keep)
                assert len({c["loss"] for c in calls}) == 1, "loss differs between ranks: " + where
                assert calls[0]["loss"] == pytest.approx(ref_loss, rel=1e-5), where
                for r, c in enumerate(calls):
                    scale = np.abs(ref_grads[r]).max()
                    np.testing.assert_allclose(c["grad"], ref_grads[r], rtol=1e-4, atol=2e-5 * scale, err_msg=where)
                states = [c["state"] for c in calls]
                assert_same_bits(states)
                if not keep:
                    assert_same_bits([previous, states[0]])
                expected = ref.state()
                np.testing.assert_array_equal(states[0]["slots"], expected["slots"], err_msg=where)
                np.testing.assert_array_equal(states[0]["next_row"], expected["next_row"], err_msg=where)
                np.testing.assert_allclose(states[0]["banks"], expected["banks"], atol=1e-6, err_msg=where)
                previous = states[0]
            assert fresh_rows > 0 and evictions > 0 and len(ref.slot_of) == Q    # the cases were all there



def test_bad_input_raises_the_same_clear_error_on_every_rank(rank_results):
    (msgs0, before0, after0, loss0), (msgs1, _, after1, loss1) = [r["bad_input"] for r in rank_results(2)]
    assert msgs0 == msgs1
    expected = {
        "probe_label_negative": "rank 1 probe row 1 has label -2 (labels must be >= 0)",
        "gallery_label_negative": "rank 0 gallery row 3 has label -7",
        "probe_nan": "rank 1 probe has 1 non-finite values (NaN/inf)",
        "gallery_inf": "rank 0 gallery has 1 non-finite values",
        "probe_dim": "rank 0 probe has shape of 2 dimensions with %d columns, expected (rows, %d)" % (DIM - 1, DIM),
        "gallery_dim": "rank 1 gallery has shape of 2 dimensions with %d columns" % (DIM + 2),
        "probe_label_count": "rank 1 has 3 probe labels for 4 rows",
        "gallery_label_count": "rank 0 has 4 gallery labels for 3 rows",
        "float_labels": "rank 1 passed non-integer gallery labels",
        "probe_1d": "rank 0 probe has shape of 1 dimensions with no columns",
        "ndarray_nan": "rank 1 probe has 1 non-finite values",
        "keep_mismatch": "rank 1 passed keep=False but rank 0 keep=True",
        "queues_differ": "rank 1's queue holds 5 identities but rank 0's 12 (the ranks' queues differ",
    }
    for name, text in expected.items():
        assert msgs0[name] is not None and text in msgs0[name], (name, msgs0[name])
        assert msgs0[name].startswith("DynamicClassQueue: bad input at call 0: "), msgs0[name]
    assert_same_bits([before0, after0, after1])      # failed calls changed nothing
    assert np.isfinite(loss0) and loss0 == loss1


# ------------------------------------------------------------------------------------------- one process
@pytest.fixture(scope="module")
def hvd_single():
    import horovod.mxnet as hvd
    hvd.init()
    return hvd


def single_rank_calls(steps=3, seed=0):
    """The scenario's calls on one rank: (probe, probe labels, gallery, gallery labels, keep)."""
    data = scenario(1, steps, seed)
    return [(data[s][0][p], data[s][0][p + "_labels"], data[s][0][g], data[s][0][g + "_labels"], keep)
            for s, p, g, keep in ordered_calls(data)]


def test_ndarray_input_gives_the_numbers_of_numpy_input(hvd_single):
    """Bit-equal losses, gradients and states; the gradient is an NDArray on the probe's context for NDArray
    input and a float32 NumPy array for NumPy input."""
    import mxnet as mx
    from recognition.ffc.class_queue import DynamicClassQueue
    queues = [DynamicClassQueue(Q, DIM, loss="sv", margin=0.3, seed=1) for _ in range(2)]
    ctx = mx.cpu(1)
    for probe, probe_labels, gallery, gallery_labels, keep in single_rank_calls():
        loss_np, grad_np = queues[0].forward_backward(probe, probe_labels, gallery, gallery_labels, keep=keep)
        loss_nd, grad_nd = queues[1].forward_backward(
            mx.nd.array(probe, ctx=ctx), mx.nd.array(probe_labels, ctx=ctx, dtype="int64"),
            mx.nd.array(gallery, ctx=ctx), mx.nd.array(gallery_labels, ctx=ctx, dtype="int64"), keep=keep)
        assert isinstance(grad_np, np.ndarray) and grad_np.dtype == np.float32 and grad_np.shape == probe.shape
        assert isinstance(grad_nd, mx.nd.NDArray) and grad_nd.context == ctx and grad_nd.dtype == np.float32
        assert loss_np == loss_nd
        np.testing.assert_array_equal(grad_nd.asnumpy(), grad_np)
        assert_same_bits([queues[0].state_dict(), queues[1].state_dict()])


@pytest.mark.parametrize("loss_type", ["arcface", "cosface", "sv"])
def test_gradient_matches_finite_differences(hvd_single, loss_type):
    """d loss / d probe (raw rows, through the normalisation) against central differences of the float64
    reference loss; the reference's own analytic gradient is checked against them as well."""
    from recognition.ffc.class_queue import DynamicClassQueue
    rng = np.random.default_rng(7)
    m = MARGINS[loss_type]
    dcq = DynamicClassQueue(Q, DIM, loss=loss_type, margin=m, seed=0)
    state = full_state()
    dcq.load_state_dict(state)
    gallery = rng.standard_normal((4, DIM)).astype(np.float32)
    gallery_labels = np.array([205, 7, 205, 211])             # an existing label twice, a new one
    probe = rng.standard_normal((4, DIM)).astype(np.float32)
    probe_labels = np.array([205, 7, 30, 31])                  # two rows with a target, two fresh rows
    _, grad = dcq.forward_backward(probe, probe_labels, gallery, gallery_labels, keep=False)
    after, existing = insert_gallery(ReferenceQueue(state["banks"], state["slots"], state["next_row"]),
                                     [gallery], [gallery_labels])
    _, ref_grad = rank_loss(after, existing, probe, probe_labels, loss_type, m)
    h, numeric = 1e-6, np.zeros(probe.shape)
    p64 = probe.astype(np.float64)
    for i in range(probe.shape[0]):
        for j in range(DIM):
            step = np.zeros_like(p64)
            step[i, j] = h
            numeric[i, j] = (rank_loss(after, existing, p64 + step, probe_labels, loss_type, m)[0]
                             - rank_loss(after, existing, p64 - step, probe_labels, loss_type, m)[0]) / (2 * h)
    assert np.abs(numeric[2:]).max() > 0        # the fresh rows' hard-negative term has a gradient
    np.testing.assert_allclose(ref_grad, numeric, rtol=1e-5, atol=1e-6 * np.abs(numeric).max())
    np.testing.assert_allclose(grad, numeric, rtol=1e-4, atol=2e-5 * np.abs(numeric).max())


def test_state_dict_round_trip_continues_exactly(hvd_single):
    """A queue restored from another's state_dict (into a queue of another seed) continues bit for bit; the
    state_dict holds copies."""
    from recognition.ffc.class_queue import DynamicClassQueue
    calls = single_rank_calls(steps=4)
    original = DynamicClassQueue(Q, DIM, loss="arcface", seed=1)
    for call in calls[:3]:
        original.forward_backward(*call[:4], keep=call[4])
    state = original.state_dict()
    assert state["banks"].dtype == np.float32 and state["banks"].shape == (2, Q, DIM)
    assert state["slots"].dtype == np.int64 and state["slots"].shape[1] == 2
    assert state["next_row"].dtype == np.uint8 and state["next_row"].shape == (Q,)
    saved = {k: v.copy() for k, v in state.items()}
    restored = DynamicClassQueue(Q, DIM, loss="arcface", seed=99)
    restored.load_state_dict(state)
    state["banks"][:] = 0.0                 # the queues own their arrays
    state["next_row"][:] = 1
    assert_same_bits([original.state_dict(), restored.state_dict(), saved])
    for call in calls[3:]:
        loss_a, grad_a = original.forward_backward(*call[:4], keep=call[4])
        loss_b, grad_b = restored.forward_backward(*call[:4], keep=call[4])
        assert loss_a == loss_b
        np.testing.assert_array_equal(grad_a, grad_b)
        assert_same_bits([original.state_dict(), restored.state_dict()])


def _corrupt(state, key, value):
    out = dict(state)
    out[key] = value
    return out


@pytest.mark.parametrize("change,message", [
    (lambda s: _corrupt(s, "banks", s["banks"][:, :-1]), "banks must be float (2, 12, 16)"),
    (lambda s: _corrupt(s, "banks", s["banks"].astype(np.int32)), "banks must be float"),
    (lambda s: _corrupt(s, "banks", np.where(np.arange(DIM) == 3, np.nan, s["banks"])), "banks hold 24 non-finite"),
    (lambda s: _corrupt(s, "slots", np.concatenate([s["slots"][:2], s["slots"][:1]])), "duplicate label 200"),
    (lambda s: _corrupt(s, "slots", np.array([[1, 4], [2, 4]])), "duplicate slot 4 (rows [0, 1])"),
    (lambda s: _corrupt(s, "slots", np.array([[1, 12]])), "slot 12 (row 0) outside [0, 12)"),
    (lambda s: _corrupt(s, "slots", np.array([[1.0, 2.0]])), "slots must be integers"),
    (lambda s: _corrupt(s, "slots", np.arange(3)), "slots must have shape (n, 2)"),
    (lambda s: _corrupt(s, "next_row", s["next_row"][:5]), "next_row must be integer (12,)"),
    (lambda s: _corrupt(s, "next_row", np.full(Q, 2, np.uint8)), "next_row[0] is 2, not 0 or 1"),
    (lambda s: {k: v for k, v in s.items() if k != "next_row"}, "needs exactly the keys"),
    (lambda s: _corrupt(s, "step", 3), "needs exactly the keys"),
])
def test_load_state_dict_refuses_bad_state_and_keeps_its_own(hvd_single, change, message):
    from recognition.ffc.class_queue import DynamicClassQueue
    dcq = DynamicClassQueue(Q, DIM, seed=0)
    dcq.load_state_dict(full_state())
    before = dcq.state_dict()
    with pytest.raises(ValueError) as err:
        dcq.load_state_dict(change(full_state()))
    assert message in str(err.value)
    assert_same_bits([before, dcq.state_dict()])


def test_construction(hvd_single):
    """Unit rows drawn from the seed (so ranks agree), an empty map, zero bits; bad arguments are refused."""
    from recognition.ffc.class_queue import DynamicClassQueue
    a, b, c = (DynamicClassQueue(Q, DIM, seed=s).state_dict() for s in (4, 4, 5))
    assert_same_bits([a, b])
    assert not np.array_equal(a["banks"], c["banks"])
    np.testing.assert_allclose(np.linalg.norm(a["banks"], axis=2), 1.0, rtol=1e-6)
    assert a["slots"].shape == (0, 2) and not a["next_row"].any()
    for kwargs, text in [({"loss": "softmax"}, "loss must be one of"), ({"scale": 0.0}, "need scale > 0"),
                         ({"margin": -0.1}, "margin >= 0"), ({"queue_size": 0}, "queue_size and embedding_size")]:
        args = {"queue_size": Q, "embedding_size": DIM, **kwargs}
        with pytest.raises(ValueError, match=text):
            DynamicClassQueue(args.pop("queue_size"), args.pop("embedding_size"), **args)


@pytest.mark.parametrize("queue_size", [3, 5])
def test_many_random_calls_with_a_tiny_queue(hvd_single, queue_size):
    """Tiny queues under long random call sequences (most inserts evict, labels repeat within a batch, batches
    larger than the queue, empty probe or gallery batches): the state and loss follow the reference."""
    from recognition.ffc.class_queue import DynamicClassQueue
    rng = np.random.default_rng(queue_size)
    dcq = DynamicClassQueue(queue_size, 4, loss="cosface", margin=0.35, seed=2)
    state = dcq.state_dict()
    ref = ReferenceQueue(state["banks"], state["slots"], state["next_row"])
    for call in range(40):
        n_probe, n_gallery = rng.integers(0, 6, 2)
        probe = rng.standard_normal((n_probe, 4)).astype(np.float32)
        gallery = rng.standard_normal((n_gallery, 4)).astype(np.float32)
        probe_labels, gallery_labels = rng.integers(0, 9, n_probe), rng.integers(0, 9, n_gallery)
        keep = bool(rng.integers(0, 2))
        loss, grad = dcq.forward_backward(probe, probe_labels, gallery, gallery_labels, keep=keep)
        after, ref_loss, (ref_grad,) = reference_side(ref, [gallery], [gallery_labels], [probe], [probe_labels],
                                                      "cosface", 0.35)
        ref = after if keep else ref
        assert loss == pytest.approx(ref_loss, rel=1e-5, abs=1e-6), call
        np.testing.assert_allclose(grad, ref_grad, rtol=1e-4, atol=1e-5 * max(np.abs(ref_grad).max(initial=0), 1))
        state, expected = dcq.state_dict(), ref.state()
        np.testing.assert_array_equal(state["slots"], expected["slots"])
        np.testing.assert_array_equal(state["next_row"], expected["next_row"])
        np.testing.assert_allclose(state["banks"], expected["banks"], atol=1e-6)
