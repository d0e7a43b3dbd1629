"""The queue's LRU identity -> slot map against the sequential LRU of the reference, and its state checks."""
import numpy as np
import pytest

from recognition.ffc.slot_map import LRUSlotMap
from tests.ffc.ffc_reference import ReferenceQueue


def reference_inserts(ref, labels):
    """Slots and 'had no slot' flags of sequential inserts into a ReferenceQueue (features are irrelevant)."""
    out = [ref.insert(np.zeros(1), int(label)) for label in labels]
    return np.array([s for s, _ in out]), np.array([not had for _, had in out])


def empty_reference(capacity):
    return ReferenceQueue(np.zeros((2, capacity, 1)), [], [0] * capacity)


@pytest.mark.parametrize("capacity,label_range,batch,preload", [(4, 9, 10, False), (8, 20, 5, True),
                                                                 (16, 24, 12, False), (16, 40, 12, True),
                                                                 (1, 3, 4, False)])
def test_batches_of_inserts_match_sequential_lru(capacity, label_range, batch, preload):
    """Random batches (repeats, evictions, labels evicted and re-inserted within one batch, batches with more
    distinct labels than slots): the planned slots, the lookups after the plan and the committed order equal
    the one-by-one LRU; a plan alone changes nothing. ``preload``: start from a loaded half-full state whose
    slots are scattered (never-used slots are then not a contiguous range)."""
    rng = np.random.default_rng(capacity + label_range)
    slot_map, ref = LRUSlotMap(capacity), empty_reference(capacity)
    if preload:
        half = capacity // 2
        pairs = np.stack([rng.choice(label_range, half, replace=False), rng.permutation(capacity)[:half]], 1)
        slot_map.load(pairs)
        ref = ReferenceQueue(np.zeros((2, capacity, 1)), pairs, [0] * capacity)
    for step in range(60):
        labels = rng.integers(0, label_range, rng.integers(0, batch + 1)).tolist()
        before = slot_map.state()
        plan = slot_map.plan(labels)
        np.testing.assert_array_equal(slot_map.state(), before)        # planning is read-only
        probe = rng.integers(0, label_range, 6).tolist()
        expected_slots, expected_fresh = reference_inserts(ref, labels)
        np.testing.assert_array_equal(plan.slots, expected_slots.reshape(-1))
        np.testing.assert_array_equal(plan.fresh, expected_fresh.reshape(-1))
        assert slot_map.lookup(probe, plan).tolist() == [ref.slot_of.get(label, -1) for label in probe]
        if step % 3 == 0:       # a discarded plan (FFC's side A): redo the reference from the old state
            ref = ReferenceQueue(np.zeros((2, capacity, 1)), before, ref.next_row)
            assert slot_map.lookup(probe).tolist() == [ref.slot_of.get(label, -1) for label in probe]
            continue
        slot_map.commit(plan)
        np.testing.assert_array_equal(slot_map.state(), ref.state()["slots"])
        assert len(slot_map) == len(ref.slot_of)


def test_eviction_order_within_one_batch():
    """Full map [10, 11, 12] (LRU first): 20 evicts 10; 10 is then new and evicts 11; 12 is touched, so 21
    evicts 20 (the oldest label of this batch once every label of the map has been touched)."""
    slot_map = LRUSlotMap(3)
    slot_map.load(np.array([[10, 2], [11, 0], [12, 1]]))
    plan = slot_map.plan([20, 10, 12, 21])
    assert plan.slots.tolist() == [2, 0, 1, 2]
    assert plan.fresh.tolist() == [True, True, False, True]
    slot_map.commit(plan)
    assert slot_map.state().tolist() == [[10, 0], [12, 1], [21, 2]]


def test_never_used_slots_are_taken_lowest_first_after_load():
    slot_map = LRUSlotMap(5)
    slot_map.load(np.array([[7, 3], [8, 0]]))
    plan = slot_map.plan([1, 2, 3, 4])
    assert plan.slots.tolist() == [1, 2, 4, 3]     # the free slots 1, 2, 4, then the LRU label 7's slot
    assert plan.fresh.all()


@pytest.mark.parametrize("pairs,message", [
    ([[1, 0], [1, 2]], "duplicate label 1 (rows [0, 1])"),
    ([[1, 0], [2, 0]], "duplicate slot 0 (rows [0, 1])"),
    ([[1, 0], [2, 4]], "slot 4 (row 1) outside [0, 4)"),
    ([[1, -1]], "slot -1 (row 0) outside [0, 4)"),
    ([[-3, 1]], "label -3 (row 0) is negative"),
    ([[1, 0], [2, 1], [3, 2], [4, 3], [5, 3]], "slots has 5 rows but the queue has 4 slots"),
    ([1, 2], "slots must have shape (n, 2)"),
])
def test_bad_state_is_refused_and_the_map_is_kept(pairs, message):
    slot_map = LRUSlotMap(4)
    slot_map.load(np.array([[9, 1]]))
    with pytest.raises(ValueError) as err:
        slot_map.load(np.array(pairs))
    assert message in str(err.value)
    assert slot_map.state().tolist() == [[9, 1]]
