"""Presets, flag overrides, validation and data-folder resolution of recognition/config.py."""
import sys
import types

import pytest
from easydict import EasyDict as edict

from recognition import config as config_module
from recognition.config import NETWORKS, config_from_args, default_config, get_config, list_presets
from recognition.partial_fc.method import LOSSES

PRESETS = {"glint360k", "ms1mv2", "emore", "ms1mv3", "webface", "synthetic", "bench_1m", "bench_10m", "bench_100m",
           "glint360k_ffc", "synthetic_ffc"}
RECORD_PRESETS = sorted(p for p in PRESETS if not p.startswith("bench"))


@pytest.fixture
def data_root(tmp_path, monkeypatch):
    """$PFC_DATA_ROOT with every record preset's folder in it."""
    from recognition.data.rec_format import write_property
    for name in RECORD_PRESETS:
        folder = tmp_path / get_config(name).data_folder
        folder.mkdir(exist_ok=True)
        write_property(str(folder / "property"), get_config(name).num_classes or 1000, (112, 112))
    monkeypatch.setenv("PFC_DATA_ROOT", str(tmp_path))
    return tmp_path


def test_presets_are_discovered():
    assert set(list_presets()) == PRESETS


@pytest.mark.parametrize("name, classes, images", [
    ("glint360k", 360232, 17091657), ("ms1mv2", 85742, 5822653), ("emore", 85742, 5822653),
    ("ms1mv3", 93431, 5179510), ("webface", 10572, 494414)])
def test_dataset_sizes(name, classes, images):
    cfg = get_config(name)
    assert (cfg.num_classes, cfg.num_images, cfg.reader) == (classes, images, "record")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_every_preset_validates(name, data_root):
    cfg = config_from_args(["--dataset", name])
    assert cfg.dataset == name and cfg.network in NETWORKS and cfg.output.startswith("models")
    if cfg.method == "pfc":     # the method's own keys are resolved by that method only
        assert cfg.loss in LOSSES and len(cfg.margins) == 3
    else:
        assert cfg.queue_size >= 1 and cfg.output.endswith("_ffc_" + cfg.ffc_loss)
    if cfg.reader == "record":
        assert cfg.data_dir == str(data_root / cfg.data_folder)


def test_bench_presets():
    sizes = {"bench_1m": (10 ** 6, 0.1), "bench_10m": (10 ** 7, 0.01), "bench_100m": (10 ** 8, 0.01)}
    for name, (classes, ratio) in sizes.items():
        cfg = config_from_args(["--dataset", name])
        assert (cfg.reader, cfg.num_classes, cfg.sample_ratio, cfg.data_dir) == ("synthetic", classes, ratio, None)
    assert get_config("bench_10m").bank_location == "host"


def test_base_defaults():
    """configs/base.py's keys and the methods' own keys (TrainingMethod.config_defaults), merged."""
    cfg = get_config("bench_1m")
    base = default_config()
    assert (base.network, base.embedding_size, base.loss, base.scale, base.sample_ratio) == ("r50", 512, "arcface",
                                                                                             64.0, 1.0)
    assert (base.batch_size, base.lr, base.lr_batch_reference, base.momentum, base.weight_decay) == (
        128, 0.1, 512, 0.9, 5e-4)
    assert (base.lr_mode, base.lr_factor, base.fp16, base.ctx, base.models_root) == ("step", 0.1, False, "auto",
                                                                                      "models")
    assert (base.keep_exports, base.pretrained, base.pretrained_partial, base.pretrained_head) == (3, None, False,
                                                                                                 None)
    assert cfg.weight_decay == base.weight_decay      # a preset that does not set a key keeps the default


def test_unknown_preset_lists_the_presets():
    with pytest.raises(ValueError) as err:
        get_config("glint999")
    for name in PRESETS:
        assert name in str(err.value)


def test_preset_with_unknown_key_is_rejected(monkeypatch):
    bad = types.ModuleType("recognition.configs.typo")
    bad.config = edict(lr_stpes=(1, 2))
    monkeypatch.setitem(sys.modules, "recognition.configs.typo", bad)
    monkeypatch.setattr(config_module, "list_presets", lambda: ["typo"])
    with pytest.raises(ValueError, match="typo.py sets unknown key.*lr_stpes"):
        get_config("typo")


def test_flags_override_the_preset(data_root):
    cfg = config_from_args(["--dataset", "glint360k", "--network", "r18", "--sample-ratio", "0.1",
                            "--batch-size", "32", "--lr", "0.2", "--num-epochs", "2.5", "--max-steps", "7",
                            "--lr-mode", "step", "--lr-steps", "1,2", "--warmup-epochs", "0.5", "--ctx", "gpu",
                            "--fp16", "--bank-location", "host", "--interclass-filter", "0.4", "--scale", "30",
                            "--embedding-size", "256", "--dropout", "0.1", "--seed", "3", "--frequent", "5",
                            "--verbose", "0", "--checkpoint-every", "9", "--val-targets", "lfw,cfp_fp",
                            "--models-root", "runs", "--resume"])
    assert (cfg.network, cfg.sample_ratio, cfg.batch_size, cfg.lr, cfg.num_epochs, cfg.max_steps) == (
        "r18", 0.1, 32, 0.2, 2.5, 7)
    assert (cfg.lr_mode, cfg.lr_steps, cfg.warmup_epochs, cfg.ctx, cfg.fp16, cfg.bank_location) == (
        "step", (1.0, 2.0), 0.5, "gpu", True, "host")
    assert (cfg.interclass_filter, cfg.scale, cfg.embedding_size, cfg.dropout, cfg.seed) == (0.4, 30.0, 256, 0.1, 3)
    assert (cfg.frequent, cfg.verbose, cfg.checkpoint_every, cfg.val_targets, cfg.resume) == (
        5, 0, 9, ("lfw", "cfp_fp"), True)
    assert cfg.output == "runs/glint360k_r18_cosface"
    # flags not given keep the preset's values
    assert (cfg.loss, cfg.margins, cfg.weight_decay, cfg.lr_batch_reference) == ("cosface", (1.0, 0.0, 0.4),
                                                                                 1e-4, 1024)


def test_absent_flags_keep_the_preset(data_root):
    cfg = config_from_args(["--dataset", "synthetic"])
    assert (cfg.network, cfg.sample_ratio, cfg.margins, cfg.scale, cfg.fp16, cfg.resume) == (
        "mbf", 0.5, (1.0, 0.3, 0.0), 32.0, False, False)
    assert config_from_args(["--dataset", "synthetic", "--no-fp16", "--val-targets", ""]).val_targets == ()


def test_loss_and_margins(data_root):
    assert config_from_args(["--dataset", "glint360k", "--loss", "arcface"]).margins == (1.0, 0.5, 0.0)
    # an explicit --loss replaces a preset's own margins
    assert config_from_args(["--dataset", "synthetic", "--loss", "combined"]).margins == (1.0, 0.3, 0.2)
    cfg = config_from_args(["--dataset", "ms1mv2", "--loss", "cosface", "--margins", "1.0,0.2,0.1"])
    assert (cfg.loss, cfg.margins) == ("cosface", (1.0, 0.2, 0.1))
    with pytest.raises(ValueError, match="--margins takes 3"):
        config_from_args(["--dataset", "ms1mv2", "--margins", "1.0,0.5"])
    with pytest.raises(ValueError, match="--margins takes 3"):
        config_from_args(["--dataset", "ms1mv2", "--margins", "1,a,0"])


@pytest.mark.parametrize("flag, value, choices", [("--network", "r101", NETWORKS), ("--loss", "sphere", LOSSES)])
def test_unknown_network_or_loss_lists_the_choices(data_root, flag, value, choices):
    with pytest.raises(ValueError) as err:
        config_from_args(["--dataset", "webface", flag, value])
    assert repr(value) in str(err.value)
    for choice in choices:
        assert choice in str(err.value)


@pytest.mark.parametrize("flags, message", [
    (["--sample-ratio", "0"], "sample_ratio must be > 0.0"),
    (["--sample-ratio", "1.5"], "sample_ratio"),
    (["--batch-size", "0"], "batch_size must be >= 1"),
    (["--lr", "-0.1"], "lr must be > 0"),
    (["--max-steps", "0"], "max_steps"),
    (["--num-classes", "10"], "--num-classes is for synthetic-reader presets"),
])
def test_bad_values_are_rejected(data_root, flags, message):
    with pytest.raises(ValueError, match=message):
        config_from_args(["--dataset", "webface"] + flags)


def test_num_classes_for_synthetic_reader():
    assert config_from_args(["--dataset", "bench_1m", "--num-classes", "5000"]).num_classes == 5000


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("PFC_DATA_ROOT", raising=False)
    with pytest.raises(ValueError, match="--data-dir DIR or set PFC_DATA_ROOT"):
        config_from_args(["--dataset", "ms1mv3"])
    from recognition.data.rec_format import write_property
    given = tmp_path / "mine"
    given.mkdir()
    write_property(str(given / "property"), 93431, (112, 112))
    assert config_from_args(["--dataset", "ms1mv3", "--data-dir", str(given)]).data_dir == str(given)
    monkeypatch.setenv("PFC_DATA_ROOT", str(tmp_path))
    with pytest.raises(ValueError, match="ms1m-retinaface-t1 of dataset ms1mv3 does not exist"):
        config_from_args(["--dataset", "ms1mv3"])
    (tmp_path / "ms1m-retinaface-t1").mkdir()
    with pytest.raises(ValueError, match="property file not found: .*ms1m-retinaface-t1"):
        config_from_args(["--dataset", "ms1mv3"])
    write_property(str(tmp_path / "ms1m-retinaface-t1" / "property"), 93431, (112, 112))
    assert config_from_args(["--dataset", "ms1mv3"]).data_dir == str(tmp_path / "ms1m-retinaface-t1")
    # --data-dir wins over the environment
    assert config_from_args(["--dataset", "ms1mv3", "--data-dir", str(given)]).data_dir == str(given)
    # a synthetic-reader preset needs no data folder
    assert config_from_args(["--dataset", "bench_10m"]).data_dir is None


def test_help_names_presets_networks_and_losses():
    text = config_module.build_arg_parser().format_help()
    for word in ("bench_100m", "glint360k", "r200", "mbf", "combined", "--sample-ratio", "--bank-location"):
        assert word in text


def test_parser_defaults_are_none_so_presets_win():
    args = config_module.build_arg_parser().parse_args(["--dataset", "webface"])
    assert all(v is None for k, v in vars(args).items() if k != "dataset")


def test_activation_choices_are_the_backbones():
    from symbols.common import ACT_TYPES
    assert config_module.ACTIVATIONS == ACT_TYPES
    with pytest.raises(SystemExit):
        config_from_args(["--dataset", "bench_1m", "--act-type", "swish"])


def _horovodrun_option_strings():
    """The option strings of horovodrun's own parser (built by horovod.runner.launch.parse_args)."""
    import argparse
    from unittest import mock
    from horovod.runner import launch
    seen = {}

    def capture(parser, *args, **kwargs):
        seen["parser"] = parser
        raise SystemExit(0)
    with mock.patch.object(argparse.ArgumentParser, "parse_args", capture), pytest.raises(SystemExit):
        launch.parse_args()
    return [o for action in seen["parser"]._actions for o in action.option_strings]


def test_train_flags_survive_horovodruns_parser():
    """Python's argparse reads every '--x' on horovodrun's command line, also after the training command, and
    rejects one that abbreviates two of its own options. Only --network does; --backbone stands in for it."""
    horovod_options = _horovodrun_option_strings()
    ours = [o for action in config_module.build_arg_parser()._actions for o in action.option_strings]
    ambiguous = sorted(o for o in ours if o not in horovod_options
                       and sum(h.startswith(o) for h in horovod_options) > 1)
    assert ambiguous == ["--network"]
    cfg = config_from_args(["--dataset", "bench_1m", "--backbone", "r18"])
    assert cfg.network == "r18"


def test_fine_tuning_device_and_export_flags(data_root):
    cfg = config_from_args(["--dataset", "glint360k", "--pretrained", "zoo/r100/model,1", "--pretrained-partial",
                            "--pretrained-head", "runs/x/checkpoints/step_000002000", "--keep-exports", "5"])
    assert (cfg.pretrained, cfg.pretrained_partial, cfg.pretrained_head, cfg.keep_exports, cfg.ctx) == (
        "zoo/r100/model,1", True, "runs/x/checkpoints/step_000002000", 5, "auto")
    assert config_from_args(["--dataset", "glint360k", "--ctx", "cpu"]).ctx == "cpu"
    for flags, message in ((["--pretrained", "zoo/r100/model"], "--pretrained: model must be given as PREFIX,EPOCH"),
                           (["--pretrained", "zoo/model,x"], "PREFIX,EPOCH"),
                           (["--pretrained-partial"], "--pretrained-partial needs --pretrained"),
                           (["--keep-exports", "-1"], "keep_exports must be >= 0")):
        with pytest.raises(ValueError, match=message):
            config_from_args(["--dataset", "glint360k"] + flags)
    with pytest.raises(SystemExit):
        config_from_args(["--dataset", "glint360k", "--ctx", "tpu"])


def test_ffc_flags(data_root):
    cfg = config_from_args(["--dataset", "bench_1m", "--method", "ffc", "--queue-size", "300", "--ffc-alpha", "0.9",
                            "--ffc-loss", "sv", "--margin", "0.3", "--scale", "30"])
    assert (cfg.method, cfg.queue_size, cfg.ffc_alpha, cfg.ffc_loss, cfg.ffc_margin, cfg.scale) == (
        "ffc", 300, 0.9, "sv", 0.3, 30.0)
    assert cfg.output.endswith("bench_1m_mbf_ffc_sv")
    assert config_from_args(["--dataset", "bench_1m"]).method == "pfc"
    for flags, message in ((["--queue-size", "0"], "queue_size"), (["--ffc-alpha", "1.5"], "ffc_alpha"),
                           (["--margin", "-0.1"], "ffc_margin"), (["--batch-size", "5"], "must be even")):
        with pytest.raises(ValueError, match=message):
            config_from_args(["--dataset", "bench_1m", "--method", "ffc"] + flags)
    with pytest.raises(SystemExit):
        config_from_args(["--dataset", "bench_1m", "--method", "arcface"])


def test_config_is_resolved_then_read_only(tmp_path):
    """finalize() takes num_classes from the data's property file; the result cannot be written to."""
    import copy
    import pickle
    from recognition.data.rec_format import write_property
    write_property(str(tmp_path / "property"), 1234, (112, 112))
    cfg = config_from_args(["--dataset", "ms1mv3", "--data-dir", str(tmp_path)])
    assert cfg.num_classes == 1234 and cfg.bank_pipeline is True
    for write in (lambda: setattr(cfg, "lr", 1.0), lambda: cfg.__setitem__("lr", 1.0), lambda: cfg.update(lr=1),
                  lambda: cfg.pop("lr"), lambda: delattr(cfg, "lr")):
        with pytest.raises(TypeError, match="read-only"):
            write()
    with pytest.raises(AttributeError):
        cfg.not_a_key        # noqa: B018 - reading an undeclared key fails too
    for copied in (copy.deepcopy(cfg), pickle.loads(pickle.dumps(cfg)), cfg.copy()):
        assert dict(copied) == dict(cfg) and type(copied) is type(cfg)
    thawed = cfg.thaw()
    thawed.lr = 0.5
    assert cfg.lr != 0.5


def test_a_method_flag_with_another_method_is_refused(data_root):
    with pytest.raises(ValueError, match="--sample-ratio belongs to --method pfc; this run trains with --method ffc"):
        config_from_args(["--dataset", "glint360k_ffc", "--sample-ratio", "0.1"])
    with pytest.raises(ValueError, match="--queue-size belongs to --method ffc"):
        config_from_args(["--dataset", "glint360k", "--queue-size", "10"])
