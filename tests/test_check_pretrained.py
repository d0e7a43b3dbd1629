"""tools/check_pretrained.py and recognition/pretrained_graph.py on checkpoints in InsightFace's own graph layout
(tests/insightface_graphs.py): fresnet r50 and fmobilefacenet start exactly as in the file; the check fails when
the layer settings are not followed, and on misfits or a missing graph."""
import json

import mxnet as mx
import numpy as np
import pytest

import symbols
from tests import insightface_graphs as insightface

from tools import check_pretrained


@pytest.fixture(scope="module")
def mobilefacenet_file(tmp_path_factory):
    """fmobilefacenet (GDC) saved as InsightFace's training saves it: the graph with fc7 + softmax on top."""
    def build(bn_mom):
        return insightface.fmobilefacenet(bn_mom=bn_mom)
    arg, aux = insightface.trained_like(build, seed=1)
    arg["fc7_weight"] = mx.nd.array(np.random.default_rng(2).standard_normal((10, 512)), dtype=np.float32)
    prefix = str(tmp_path_factory.mktemp("zoo") / "mobilefacenet")
    return insightface.save(prefix, 3, insightface.with_softmax(build(0.9), 10), arg, aux)


def _check(capsys, *argv):
    """(exit status, the JSON line or None, stderr) of the tool run in this process."""
    status = check_pretrained.main(list(argv))
    out, err = capsys.readouterr()
    lines = out.strip().splitlines()
    assert len(lines) <= 1
    return status, json.loads(lines[0]) if lines else None, err


def test_fresnet_r50_starts_exactly_as_the_file(tmp_path, capsys, real_backbones):
    def build(bn_mom):
        return insightface.fresnet(50, bn_mom=bn_mom)
    arg, aux = insightface.trained_like(build)
    spec = insightface.save(str(tmp_path / "model"), 0, build(0.9), arg, aux)
    status, report, err = _check(capsys, "--pretrained", spec, "--network", "r50")
    assert status == 0, err
    # every one of the backbone's 396 parameters and statistics; 54 under fresnet's own names
    assert (report["loaded"], report["renamed"]) == (396, 54)
    assert report["max_rel_diff"] <= 1e-5 and report["min_cosine"] > 0.99999999
    assert "follows" not in err                        # eps 2e-5 everywhere: the config's default already
    assert "max |diff| / max |file| %.2e" % report["max_rel_diff"] in err
    # arcface_torch's eps (1e-5) on the same parameters is a different network: the check would fail
    from recognition.pretrained_graph import check_against_file
    ours = symbols.get_symbol("r50", bn_eps=1e-5)
    renamed = _renamed(arg, aux)
    loose = check_against_file(spec, ours, *renamed)
    assert loose["max_rel_diff"] > 1e-4


def _renamed(arg, aux):
    """The file's parameters under this project's names, fc7 left out."""
    from recognition.pretrained import insightface_to_ours
    def ours(params):
        return {insightface_to_ours(k) or k: v for k, v in params.items() if not k.startswith("fc7")}
    return ours(arg), ours(aux)


@pytest.mark.parametrize("act_type", ["prelu", "prelu_conv"])
def test_fmobilefacenet_starts_exactly_as_the_file(mobilefacenet_file, act_type, capsys, real_backbones):
    status, report, err = _check(capsys, "--pretrained", mobilefacenet_file, "--network", "mbf",
                                 "--act-type", act_type)
    assert status == 0, err
    assert (report["loaded"], report["renamed"]) == (284, 278)       # pre_fc1 and fc1 keep their names
    assert report["max_rel_diff"] <= 1e-5 and report["min_cosine"] > 0.99999999
    # what the graph says and the parameters cannot: MXNet's default eps, fc1's fixed gamma, the width, the bias
    follows = [line for line in err.splitlines() if "follows" in line]
    assert len(follows) == 1 and "mobilefacenet-symbol.json" in follows[0]
    for phrase in ("BatchNorm eps 0.001 in 49 layers", "BatchNorm fix_gamma True in fc1", "pre_fc1 with a bias",
                   "width_scale 1 (64 stem channels)"):
        assert phrase in follows[0]
    assert "classifier fc7_weight not taken" in err


def test_not_following_the_graph_fails_the_check(mobilefacenet_file, capsys, monkeypatch, real_backbones):
    """The shapes alone (width, bias) fit, eps and fix_gamma are the config's: the check must catch it."""
    import recognition.backbone
    monkeypatch.setattr(recognition.backbone, "backbone_options",
                        lambda spec, network, options: dict(options, width_scale=1, fc_bias=True))
    status, report, err = _check(capsys, "--pretrained", mobilefacenet_file, "--network", "mbf")
    assert status == 1 and report["loaded"] == 284
    assert report["max_rel_diff"] > 1e-3
    assert "does not compute what the file's graph computes" in err


def test_misfits_and_missing_graph_fail(mobilefacenet_file, tmp_path, capsys, real_backbones):
    # a file parameter with no place in the backbone: the network is the file's, but something did not load
    prefix, epoch = mobilefacenet_file.split(",")
    saved = mx.nd.load("%s-%04d.params" % (prefix, int(epoch)))
    saved["arg:conv_7_conv2d_weight"] = mx.nd.ones((4, 4))
    extra = insightface.save(str(tmp_path / "extra"), 1, mx.sym.load(prefix + "-symbol.json"),
                             {k[4:]: v for k, v in saved.items() if k.startswith("arg:")},
                             {k[4:]: v for k, v in saved.items() if k.startswith("aux:")})
    status, report, err = _check(capsys, "--pretrained", extra, "--network", "mbf")
    assert status == 1 and report["loaded"] == 284 and report["max_rel_diff"] <= 1e-5
    assert "1 checkpoint parameter(s) with no place in the backbone: conv_7_conv2d_weight (4, 4)" in err
    assert "do not fit each other" in err
    # another embedding size: fc1 and pre_fc1 do not fit, the rest loads; embeddings of two sizes cannot compare
    status, report, err = _check(capsys, "--pretrained", mobilefacenet_file, "--network", "mbf",
                                 "--embedding-size", "128")
    assert (status, report) == (2, None)
    assert "pre_fc1_weight (128, 512) vs (512, 512)" in err and "embeddings of (512,), the backbone (128,)" in err
    # another network: the stem fits, nothing else; the figure says how far off that start is
    status, report, err = _check(capsys, "--pretrained", mobilefacenet_file, "--network", "r18")
    assert status == 1 and report["loaded"] == 11 and report["max_rel_diff"] > 0.5
    assert "144 backbone parameter(s) missing from the checkpoint" in err
    # parameters without their graph: nothing to run
    prefix = str(tmp_path / "bare")
    mx.nd.save(prefix + "-0001.params", {"arg:x": mx.nd.ones(1)})
    status, report, err = _check(capsys, "--pretrained", prefix + ",1", "--network", "mbf")
    assert (status, report) == (2, None) and "bare-symbol.json not found" in err


def test_an_export_made_with_arcface_torch_eps_starts_exactly(tmp_path, capsys, real_backbones):
    """This project's own mbf export (prelu_conv) from a run at eps 1e-5 (its default before 2e-5): the default
    config follows the file's eps and the start is exact."""
    from recognition.checkpoint_io import save_legacy_checkpoint
    from tools.onnx_check import trained_like_params
    symbol, arg, aux = trained_like_params(
        lambda bn_mom: symbols.get_symbol("mbf", act_type="prelu_conv", bn_mom=bn_mom, bn_eps=1e-5))
    save_legacy_checkpoint(str(tmp_path / "model"), 2, symbol, arg, aux)
    status, report, err = _check(capsys, "--pretrained", str(tmp_path / "model") + ",2", "--network", "mbf",
                                 "--act-type", "prelu_conv")
    assert status == 0, err
    assert (report["loaded"], report["renamed"]) == (len(arg) + len(aux), 0) and report["max_rel_diff"] <= 1e-5
    assert "follows" in err and "BatchNorm eps 1e-05 in 50 layers" in err


# ------------------------------------------------------------------------------------ follow_graph itself
def test_follow_graph_reads_mxnet_defaults_and_maps_names(real_backbones):
    from recognition.pretrained_graph import follow_graph
    base = {"act_type": "prelu", "bn_eps": 2e-5}
    nodes = {"bn0": ("BatchNorm", {"eps": "2e-05", "fix_gamma": "False"}),        # fresnet's stem, as ours
             "stage1_unit1_sc": ("BatchNorm", {"fix_gamma": "False"}),              # no eps: MXNet's 1e-3
             "fc1": ("BatchNorm", {"eps": "2e-05"}),                                # no fix_gamma: fixed
             "bn_data": ("BatchNorm", {}),                                          # no such layer here
             "relu0": ("LeakyReLU", {"act_type": "prelu"}),
             "pre_fc1": ("FullyConnected", {"num_hidden": "512", "no_bias": "True"})}
    overrides, notes = follow_graph(nodes, "r18", base)
    assert overrides == {"bn_layers": {"stage1_unit1_down_bn": {"eps": 1e-3}}, "fc_bias": False}
    assert notes == ["BatchNorm eps 0.001 in stage1_unit1_down_bn", "pre_fc1 without a bias"]
    # mbf: fc1's gamma is learnt in arcface_torch's layout; the file fixes it
    overrides, _ = follow_graph({"fc1": ("BatchNorm", {"eps": "2e-05"})}, "mbf", base)
    assert overrides == {"bn_layers": {"fc1": {"fix_gamma": True}}}
    # a ReLU network on a PReLU config follows the file, and the other way round
    relu = {"relu0": ("Activation", {"act_type": "relu"})}
    assert follow_graph(relu, "r18", base)[0] == {"act_type": "relu"}
    prelu = {"relu0_gamma": ("null", {}), "relu0": ("LeakyReLU", {"act_type": "prelu"})}
    assert follow_graph(prelu, "r18", dict(base, act_type="relu"))[0] == {"act_type": "prelu"}
    assert follow_graph(prelu, "r18", dict(base, act_type="prelu_conv"))[0] == {}


@pytest.mark.parametrize("network", ["mbf", "r18"])
@pytest.mark.parametrize("saved", ["prelu", "prelu_conv", "relu"])
def test_this_projects_own_graphs_need_nothing_followed(network, saved, real_backbones):
    """Its exports (prelu_conv's graphs hold ReLUs and slopes) rebuild as they are; only relu vs PReLU changes."""
    from recognition.pretrained_graph import _graph_nodes, follow_graph
    nodes = _graph_nodes(symbols.get_symbol(network, act_type=saved))
    for config_act in ("prelu", "prelu_conv", "relu"):
        expected = {}
        if (saved == "relu") != (config_act == "relu"):
            expected = {"act_type": "relu" if saved == "relu" else "prelu"}
        assert follow_graph(nodes, network, {"act_type": config_act, "bn_eps": 2e-5}) == (
            expected, ["act_type %s" % expected["act_type"]] if expected else [])


def test_fresnet_relu_is_followed(tmp_path, real_backbones, caplog):
    """A ReLU fresnet (net_act relu) on the default PReLU config: the backbone takes the file's activation."""
    import horovod.mxnet as hvd
    from recognition.backbone import Backbone
    from recognition.config import config_from_args
    hvd.init()

    def build(bn_mom):
        return insightface.fresnet(18, embedding_size=32, bn_mom=bn_mom, act_type="relu")
    arg, aux = insightface.trained_like(build, seed=3)
    spec = insightface.save(str(tmp_path / "relu"), 1, build(0.9), arg, aux)
    caplog.set_level("INFO", logger="recognition.train")
    cfg = config_from_args(["--dataset", "bench_1m", "--network", "r18", "--embedding-size", "32",
                            "--pretrained", spec])
    backbone = Backbone(cfg, mx.cpu(), 2)
    assert "act_type relu" in caplog.text
    assert not any(name.endswith("_act_gamma") for name in backbone.symbol.list_arguments())
    assert backbone.pretrained_check["max_rel_diff"] <= 1e-5


def test_no_symbol_file_keeps_the_config(tmp_path, caplog):
    import horovod.mxnet as hvd
    from recognition.pretrained_graph import backbone_options
    hvd.init()
    caplog.set_level("INFO", logger="recognition.train")
    options = {"act_type": "prelu", "bn_eps": 2e-5}
    assert backbone_options(str(tmp_path / "model") + ",1", "r18", options) == options
    assert "model-symbol.json, so the layer settings (BatchNorm eps, ...) are the config's" in caplog.text
    (tmp_path / "broken-symbol.json").write_text("{not json")
    with pytest.raises(ValueError, match="broken-symbol.json is not an MXNet symbol file"):
        backbone_options(str(tmp_path / "broken") + ",1", "r18", options)


def test_compare_against_hand_computed_rows():
    from recognition.pretrained_graph import compare
    expected = np.array([[3.0, 4.0], [1.0, 0.0]])
    got = np.array([[3.0, 4.5], [1.0, 0.0]])
    result = compare(expected, got)
    assert result["max_rel_diff"] == pytest.approx(0.5 / 4.0, abs=1e-15)
    assert result["min_cosine"] == pytest.approx((9 + 18) / (5 * np.sqrt(9 + 20.25)), abs=1e-12)
