"""recognition/data/record_scan.py: which index entries are the index's damage and which the file's."""
import numpy as np

from recognition.data.record_scan import bad_index_entries


def test_an_entry_past_the_end_in_the_middle_of_the_index_is_the_index_damage():
    offsets = np.array([0, 100, 200, 10 ** 12, 400, 500])
    assert bad_index_entries(offsets, 600).tolist() == [False, False, False, True, False, False]


def test_a_tail_past_the_end_in_order_is_a_file_cut_short():
    offsets = np.array([0, 100, 200, 300, 400, 500])
    assert not bad_index_entries(offsets, 250).any()        # records 3..5 were lost with the file's end


def test_a_tail_out_of_order_or_negative_offsets_are_the_index_damage():
    assert bad_index_entries(np.array([0, 100, 900, 800]), 500).tolist() == [False, False, True, True]
    assert bad_index_entries(np.array([0, -8, 100]), 500).tolist() == [False, True, False]
    assert bad_index_entries(np.array([0, 100, 700, -1]), 500).tolist() == [False, False, True, True]
