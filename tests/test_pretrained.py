"""Fine-tuning from a legacy checkpoint (recognition/pretrained.py): exact start, misfit reports, InsightFace names.

Training runs use the tiny stand-in backbone of tests/test_train.py; the InsightFace name test builds a real r18.
"""
import os

import numpy as np
import pytest

from tests.harness import run_ranks
from tests.conftest import patch_backbone as _patch_backbone, tiny_train_argv as _argv

EMBEDDING = 64          # the r18 comparison's embedding size (small FC, same layers)


@pytest.fixture
def horovod():
    """One Horovod process (rank 0 of 1): the loader logs on rank 0 only."""
    import horovod.mxnet as hvd
    hvd.init()
    return hvd


def _numpy(params):
    return {k: v.asnumpy() for k, v in params.items()}


def _trainer(argv, monkeypatch=None):
    """A Trainer with the tiny backbone (patched for this test only when ``monkeypatch`` is given)."""
    import horovod.mxnet as hvd
    import symbols
    from tests.conftest import tiny_symbol
    hvd.init()
    if monkeypatch is None:
        _patch_backbone()
    else:
        monkeypatch.setattr(symbols, "get_symbol", tiny_symbol)
    from recognition.config import config_from_args
    from recognition.trainer import Trainer
    return Trainer(config_from_args(argv))


def fine_tune_body(argv):
    """Build a trainer from ``argv``; report its backbone and centre shard before any step, then train."""
    trainer = _trainer(argv)
    arg, aux = trainer.backbone.get_params()
    pfc = trainer.method.head.pfc
    start = {"arg": _numpy(arg), "aux": _numpy(aux), "class_start": pfc.class_start, "weight": pfc.weight.copy()}
    start["loss"] = trainer.fit()
    return start


def test_fine_tuning_starts_bit_identical_from_the_export(tmp_path, monkeypatch):
    # K = 3 steps in one process; the checkpoint at step 3 exports model-0001.params
    first = _trainer(_argv(tmp_path / "a", "--max-steps", "3"), monkeypatch)
    first.fit()
    arg, aux = (_numpy(p) for p in first.backbone.get_params())
    centres = first.method.head.pfc.weight.copy()
    export = os.path.join(str(tmp_path / "a"), "model")
    step_folder = os.path.join(str(tmp_path / "a"), "checkpoints", "step_000000003")
    # fine-tune on 2 ranks from the export, the head from the checkpoint (re-sharded from 1 rank to 2)
    ranks = run_ranks(fine_tune_body, np=2, timeout=240, kwargs={"argv": _argv(
        tmp_path / "b", "--max-steps", "1", "--pretrained", export + ",1", "--pretrained-head", step_folder)})
    import mxnet as mx
    saved = mx.nd.load(export + "-0001.params")
    assert {k[4:] for k in saved} == set(arg) | set(aux)
    for r, rank in enumerate(ranks):
        for kind, expected in (("arg", arg), ("aux", aux)):
            assert set(rank[kind]) == set(expected)
            for name, value in expected.items():
                np.testing.assert_array_equal(rank[kind][name], value, err_msg="rank %d %s" % (r, name))
                np.testing.assert_array_equal(saved[kind + ":" + name].asnumpy(), value, err_msg=name)
        assert np.isfinite(rank["loss"])
    shards = sorted(ranks, key=lambda r: r["class_start"])
    np.testing.assert_array_equal(np.concatenate([r["weight"] for r in shards]), centres)
    # without --pretrained-head the head starts fresh: the centres of a run with no --pretrained at all
    backbone_only = _trainer(_argv(tmp_path / "c", "--pretrained", export + ",1"), monkeypatch)
    scratch = _trainer(_argv(tmp_path / "d"), monkeypatch)
    np.testing.assert_array_equal(backbone_only.method.head.pfc.weight, scratch.method.head.pfc.weight)
    assert not np.array_equal(backbone_only.method.head.pfc.weight, centres)
    np.testing.assert_array_equal(backbone_only.backbone.get_params()[0]["conv1_weight"].asnumpy(),
                                  arg["conv1_weight"])
    assert not np.array_equal(scratch.backbone.get_params()[0]["conv1_weight"].asnumpy(), arg["conv1_weight"])
    # a run's checkpoints/ folder stands for its newest checkpoint; a head of other classes is refused
    from recognition.pretrained import head_checkpoint
    assert head_checkpoint(os.path.dirname(step_folder), scratch.cfg) == step_folder
    with pytest.raises(ValueError, match="step_000000003: the checkpoint has num_classes=203, this run 100"):
        _trainer(_argv(tmp_path / "e", "--num-classes", "100", "--pretrained-head", step_folder), monkeypatch)


# ------------------------------------------------------------------------------------------ misfits
def _tiny_params():
    """Initialised parameters of the tiny backbone (embedding 16), as bound by a Module."""
    import mxnet as mx
    from tests.conftest import tiny_symbol
    module = mx.mod.Module(tiny_symbol("tiny", embedding_size=16), data_names=["data"], label_names=None)
    module.bind(data_shapes=[("data", (2, 3, 112, 112))], for_training=False)
    module.init_params(mx.init.Normal(0.5))
    return module.get_params()


def _save(prefix, epoch, arg, aux):
    import mxnet as mx
    params = {"arg:" + k: v for k, v in arg.items()}
    params.update({"aux:" + k: v for k, v in aux.items()})
    mx.nd.save("%s-%04d.params" % (prefix, epoch), params)


def _misfit_checkpoint(tmp_path):
    """The tiny backbone's parameters with conv2_weight renamed, pre_fc1_weight reshaped and a classifier."""
    import mxnet as mx
    arg, aux = _tiny_params()
    arg = dict(arg)
    arg["conv9_weight"] = arg.pop("conv2_weight")
    arg["pre_fc1_weight"] = mx.nd.ones((16, 100))
    arg["fc7_weight"] = mx.nd.ones((203, 16))
    prefix = str(tmp_path / "misfit")
    _save(prefix, 2, arg, aux)
    return prefix + ",2", arg, aux


def test_a_renamed_and_a_reshaped_parameter_are_named(tmp_path, caplog, horovod):
    from recognition.pretrained import load_pretrained
    spec, saved_arg, saved_aux = _misfit_checkpoint(tmp_path)
    arg, aux = _tiny_params()
    before = {k: v.asnumpy() for k, v in arg.items()}
    with pytest.raises(ValueError) as err:
        load_pretrained(spec, arg, aux, network="tiny")
    text = str(err.value)
    assert "does not fit the backbone tiny" in text
    assert "1 backbone parameter(s) missing from the checkpoint: conv2_weight (8, 8, 4, 4)" in text
    assert "1 checkpoint parameter(s) with no place in the backbone: conv9_weight (8, 8, 4, 4)" in text
    assert "1 shape mismatch(es), backbone vs checkpoint: pre_fc1_weight (16, 392) vs (16, 100)" in text
    assert "fc7" not in text and "--pretrained-partial" in text
    for name, value in before.items():           # nothing was loaded
        np.testing.assert_array_equal(arg[name].asnumpy(), value)
    # --pretrained-partial: the same list as a warning; what fits is loaded, the rest keeps its values
    caplog.set_level("INFO", logger="recognition.train")
    match = load_pretrained(spec, arg, aux, partial=True, network="tiny")
    warning = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "conv2_weight (8, 8, 4, 4)" in warning and "conv9_weight" in warning and "(16, 100)" in warning
    assert match.classifier == ["fc7_weight"] and "classifier fc7_weight not taken" in caplog.text
    for name in ("conv2_weight", "pre_fc1_weight"):
        np.testing.assert_array_equal(arg[name].asnumpy(), before[name])
    for name in ("conv1_weight", "pre_fc1_bias", "fc1_gamma"):
        np.testing.assert_array_equal(arg[name].asnumpy(), saved_arg[name].asnumpy())
    for name, value in saved_aux.items():
        np.testing.assert_array_equal(aux[name].asnumpy(), value.asnumpy())


def test_train_py_reports_the_misfit_and_bad_specs(tmp_path, capsys, horovod, monkeypatch):
    import symbols
    from tests.conftest import tiny_symbol
    monkeypatch.setattr(symbols, "get_symbol", tiny_symbol)
    from recognition.train import main
    spec, _, _ = _misfit_checkpoint(tmp_path)
    assert main(_argv(tmp_path / "run", "--pretrained", spec)) == 2
    err = capsys.readouterr().err
    assert "conv2_weight" in err and "conv9_weight" in err and "pre_fc1_weight" in err
    assert main(_argv(tmp_path / "run", "--pretrained", str(tmp_path / "misfit"))) == 2
    assert "PREFIX,EPOCH" in capsys.readouterr().err
    assert main(_argv(tmp_path / "run", "--pretrained", str(tmp_path / "none") + ",1")) == 2
    assert str(tmp_path / "none") + "-0001.params not found" in capsys.readouterr().err
    assert main(_argv(tmp_path / "run", "--pretrained-partial")) == 2
    assert "--pretrained-partial needs --pretrained" in capsys.readouterr().err
    assert main(_argv(tmp_path / "run", "--pretrained-head", str(tmp_path))) == 2
    assert "not a checkpoint folder" in capsys.readouterr().err


def test_nothing_fitting_is_an_error_even_when_partial(tmp_path, horovod):
    import mxnet as mx
    from recognition.pretrained import load_pretrained
    _save(str(tmp_path / "other"), 0, {"unrelated_weight": mx.nd.ones((3, 3))}, {})
    arg, aux = _tiny_params()
    with pytest.raises(ValueError, match="(?s)none of its 1 parameters fit.*unrelated_weight"):
        load_pretrained(str(tmp_path / "other") + ",0", arg, aux, partial=True)


# ------------------------------------------------------------------------------------ InsightFace names
@pytest.mark.parametrize("act_type", ["prelu", "prelu_conv"])
def test_insightface_iresnet_names_give_the_same_network(tmp_path, act_type, horovod, real_backbones, caplog):
    """fresnet's r18 in InsightFace's own graph layout (tests/insightface_graphs.py), loaded by the Backbone
    training builds: the same embeddings, and the start-up check says so."""
    import mxnet as mx
    from recognition.backbone import Backbone
    from recognition.config import config_from_args
    from tests import insightface_graphs as insightface

    def build(bn_mom):
        return insightface.fresnet(18, embedding_size=EMBEDDING, bn_mom=bn_mom)
    arg, aux = insightface.trained_like(build)
    arg = dict(arg, fc7_weight=mx.nd.ones((10, EMBEDDING)))         # a released model keeps its classifier
    spec = insightface.save(str(tmp_path / "insightface"), 1, build(0.9), arg, aux)
    caplog.set_level("INFO", logger="recognition.train")
    cfg = config_from_args(["--dataset", "bench_1m", "--network", "r18", "--act-type", act_type, "--embedding-size",
                            str(EMBEDDING), "--pretrained", spec])
    ours = Backbone(cfg, mx.cpu(), 2)
    theirs = mx.mod.Module(build(0.9), data_names=["data"], label_names=None)
    theirs.bind(data_shapes=[("data", (2, 3, 112, 112))], for_training=False)
    theirs.set_params(arg, aux, allow_extra=True)
    images = mx.nd.array(np.random.default_rng(0).uniform(0, 255, (2, 3, 112, 112)))
    theirs.forward(mx.io.DataBatch([images]), is_train=False)
    ours.module.forward(mx.io.DataBatch([images]), is_train=False)
    expected, got = theirs.get_outputs()[0].asnumpy(), ours.module.get_outputs()[0].asnumpy()
    assert np.linalg.norm(expected, axis=1).min() > 1.0
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    loaded = ours.get_params()[0]
    np.testing.assert_array_equal(loaded["stem_conv_weight"].asnumpy(), arg["conv0_weight"].asnumpy())
    np.testing.assert_array_equal(loaded["stage2_unit1_down_conv_weight"].asnumpy(),
                                  arg["stage2_unit1_conv1sc_weight"].asnumpy())
    check = ours.pretrained_check
    assert check["loaded"] == len(loaded) + len(ours.get_params()[1]) and check["max_rel_diff"] <= 1e-5
    assert "the backbone against the file's own graph on 8 faces: max |diff| / max |file| %.2e" \
        % check["max_rel_diff"] in caplog.text


def test_insightface_mobilefacenet_names_cover_the_backbone(real_backbones):
    import symbols
    from recognition.pretrained import Match, insightface_to_ours
    from tests import insightface_graphs as insightface
    graph = insightface.fmobilefacenet()
    theirs = set(graph.list_arguments() + graph.list_auxiliary_states()) - {"data"}
    # InsightFace's layout: 64 channels wide, biased embedding FC; every name maps onto one of this backbone's
    sym = symbols.get_symbol("mbf", embedding_size=512, width_scale=1, fc_bias=True)
    ours = set(sym.list_arguments() + sym.list_auxiliary_states()) - {"data"}
    mapped = {insightface_to_ours(n) or n for n in theirs}
    assert mapped == ours and len(theirs) == len(ours) == 284

    def shapes_of(symbol):
        arg_shapes, _, aux_shapes = symbol.infer_shape(data=(1, 3, 112, 112))
        return dict(zip(symbol.list_arguments() + symbol.list_auxiliary_states(), arg_shapes + aux_shapes))
    ours_shapes = shapes_of(sym)
    assert {insightface_to_ours(n) or n: s for n, s in shapes_of(graph).items() if n != "data"} == \
        {n: s for n, s in ours_shapes.items() if n != "data"}
    assert insightface_to_ours("res_4_block5_conv_proj_batchnorm_moving_var") == "res2_unit6_project_bn_moving_var"
    assert insightface_to_ours("conv_6dw7_7_conv2d_weight") == "gdc_conv_weight"
    # arcface_torch's layout (the default mbf) is 128 wide, without the bias: shapes name the misfit
    default = symbols.get_symbol("mbf", embedding_size=512)
    assert set(default.list_arguments()) == set(sym.list_arguments()) - {"pre_fc1_bias"}
    shapes = dict.fromkeys(ours, (4,))
    match = Match({"conv_1_conv2d_weight": (64, 3, 3, 3), "fc7_weight": (10, 512)}, dict(shapes, stem_conv_weight=(
        128, 3, 3, 3)))
    assert match.mismatched == [("stem_conv_weight", "conv_1_conv2d_weight")] and match.classifier == ["fc7_weight"]
    assert "stem_conv_weight (128, 3, 3, 3) vs conv_1_conv2d_weight (64, 3, 3, 3)" in match.describe()
