"""The out-of-core bank: sparse file, lazy deterministic rows, and the same updates as the host bank."""
import os

import numpy as np
import pytest

from recognition.partial_fc.disk_bank import DiskBank
from recognition.partial_fc.memory_bank import HostBank


def test_disk_bank_follows_the_host_bank_step_for_step(tmp_path):
    num_local, dim = 3000, 16
    host = HostBank(num_local, dim, class_start=500, seed=4)
    disk = DiskBank(num_local, dim, class_start=500, seed=4, directory=str(tmp_path))
    rng = np.random.default_rng(0)
    for step in range(6):
        index = np.sort(rng.choice(num_local, 200, replace=False)).astype(np.int64)
        index[:5] = np.arange(5) + 10 * step           # a run of consecutive rows: one coalesced call
        index = np.unique(index)
        u_host, inv_host = host.pull(index)
        u_disk, inv_disk = disk.pull(index)
        # equal up to float32 rounding: the compiled loops vectorise strided and contiguous rows differently
        np.testing.assert_allclose(u_disk, u_host, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(inv_disk, inv_host, rtol=1e-6)
        grad = rng.standard_normal((index.size, dim)).astype(np.float32)
        # the disk bank is updated in blocks (as PartialFC does), the host bank at once
        host.apply_grad(index, grad.copy(), inv_host.copy(), 0.1, 0.9, 5e-4)
        for lo in range(0, index.size, 64):
            disk.apply_grad(index[lo:lo + 64], grad[lo:lo + 64].copy(), inv_disk[lo:lo + 64].copy(), 0.1, 0.9, 5e-4,
                            offset=lo)
    np.testing.assert_allclose(disk.weight, host.weight, rtol=1e-5, atol=1e-6 * np.abs(host.weight).max())
    np.testing.assert_allclose(disk.momentum, host.momentum, rtol=1e-5, atol=1e-6 * np.abs(host.momentum).max())
    changed = np.any(disk.weight != HostBank(num_local, dim, class_start=500, seed=4).weight, axis=1)
    assert changed.sum() == disk.rows_on_disk
    assert 0 < disk.rows_on_disk < num_local
    disk.close()


def test_file_is_sparse_and_untouched_rows_read_as_their_initial_values(tmp_path):
    disk = DiskBank(100000, 64, class_start=0, seed=1, directory=str(tmp_path))
    size = os.path.getsize(disk.path)
    assert size == 100000 * 64 * 2 * 4
    assert os.stat(disk.path).st_blocks * 512 < size / 100     # nothing written up front
    w, m = disk.read(99990, 100000)
    np.testing.assert_array_equal(w, HostBank(10, 64, class_start=99990, seed=1).weight)
    assert not m.any()
    disk.write(5, np.ones((2, 64), np.float32), np.full((2, 64), 2, np.float32))
    w, m = disk.read(4, 8)
    assert np.all(w[1:3] == 1) and np.all(m[1:3] == 2) and not m[0].any()
    disk.close()


def test_owned_temporary_folder_is_removed_and_update_needs_a_pull():
    disk = DiskBank(10, 4, class_start=0)
    folder = disk.directory
    with pytest.raises(RuntimeError, match="without a pull"):
        disk.apply_grad(None, np.zeros((10, 4), np.float32), np.ones(10, np.float32), 0.1, 0.9, 0.0)
    disk.close()
    assert not os.path.exists(folder)
