"""Head checkpoints are world-size independent: N ranks save, M ranks load, every class kept."""
import numpy as np
import pytest
from easydict import EasyDict as edict

from tests.harness import run_ranks

NUM_CLASSES, DIM = 1001, 8


def head_cfg(bank="device"):
    return edict(num_classes=NUM_CLASSES, embedding_size=DIM, sample_ratio=0.2, margins=(1.0, 0.5, 0.0),
                 scale=64.0, bank_location=bank, bank_dir=None, bank_pipeline=True, interclass_filter=0.0,
                 momentum=0.9, fc_weight_decay=5e-4, seed=3)


def train_and_save_body(folder, steps, bank):
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.head import PartialFCHead
    head = PartialFCHead(head_cfg(bank), mx.cpu())
    rng = np.random.default_rng([hvd.rank()])
    for _ in range(steps):
        head.forward_backward(mx.nd.array(rng.standard_normal((4, DIM))),
                              mx.nd.array(rng.integers(0, NUM_CLASSES, 4), dtype="int64"))
        head.update(0.5)
    if hvd.rank() == 0:
        import os
        os.makedirs(folder, exist_ok=True)
    from recognition import dist
    dist.barrier()
    head.save(folder)
    pfc = head.pfc
    return pfc.class_start, pfc.weight.copy(), pfc.weight_mom.copy(), pfc.step


def load_body(folder, bank):
    import mxnet as mx
    from recognition.partial_fc.head import PartialFCHead
    head = PartialFCHead(head_cfg(bank), mx.cpu())
    head.load(folder)
    pfc = head.pfc
    return pfc.class_start, pfc.weight.copy(), pfc.weight_mom.copy(), pfc.step


def _assemble(results):
    results = sorted(results, key=lambda r: r[0])
    return np.concatenate([r[1] for r in results]), np.concatenate([r[2] for r in results]), results[0][3]


@pytest.mark.parametrize("saved_on,loaded_on", [(2, 3), (3, 2)])
def test_centres_reshard_across_world_sizes(tmp_path, saved_on, loaded_on):
    folder = str(tmp_path / "ckpt")
    w_saved, m_saved, step_saved = _assemble(run_ranks(train_and_save_body, np=saved_on, timeout=120,
                                                       kwargs={"folder": folder, "steps": 3, "bank": "device"}))
    assert step_saved == 3 and np.count_nonzero(m_saved.any(axis=1)) > 0
    w_loaded, m_loaded, step_loaded = _assemble(run_ranks(load_body, np=loaded_on, timeout=120,
                                                          kwargs={"folder": folder, "bank": "disk"}))
    assert w_loaded.shape == (NUM_CLASSES, DIM)
    np.testing.assert_array_equal(w_loaded, w_saved)
    np.testing.assert_array_equal(m_loaded, m_saved)
    assert step_loaded == step_saved


def test_missing_shard_and_class_count_mismatch_are_clear_errors(tmp_path):
    import os
    import mxnet as mx
    import horovod.mxnet as hvd
    from recognition.partial_fc.head import PartialFCHead
    hvd.init()
    folder = str(tmp_path)
    head = PartialFCHead(head_cfg(), mx.cpu())
    head.save(folder)
    other = head_cfg()
    other.num_classes = NUM_CLASSES + 1
    with pytest.raises(ValueError, match="holds 1001 classes, this run has 1002"):
        PartialFCHead(other, mx.cpu()).load(folder)
    os.remove(os.path.join(folder, "centres_%010d_%010d.momentum.npy" % (0, NUM_CLASSES)))
    with pytest.raises(ValueError, match="gap or missing file"):
        head.load(folder)
