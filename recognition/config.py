"""One run's configuration (an EasyDict): base defaults, then a dataset preset, then command-line flags.

    cfg = config_from_args(["--dataset", "glint360k", "--network", "r50", "--sample-ratio", "0.1"])

``configs/base.py`` defines every key; ``configs/<preset>.py`` overrides some; a flag given on the command line
overrides both (flags default to None, so an absent flag never hides a preset's value). The data folder comes
from ``--data-dir``, else ``$PFC_DATA_ROOT/<the preset's data_folder>``: there are no personal paths in code.
"""
import argparse
import copy
import importlib
import os
import pkgutil

from easydict import EasyDict as edict

from recognition import configs

LOSS_SCALES = ("auto", "dynamic", "none")
ACTIVATIONS = ("prelu", "prelu_conv", "relu")   # symbols.common.ACT_TYPES
NETWORKS = ("r18", "r34", "r50", "r100", "r200", "mbf")
LOSSES = {"arcface": (1.0, 0.5, 0.0), "cosface": (1.0, 0.0, 0.4), "combined": (1.0, 0.3, 0.2)}
DATA_ROOT_ENV = "PFC_DATA_ROOT"
READERS = ("record", "synthetic")
LR_MODES = ("step", "poly")
BANK_LOCATIONS = ("device", "host", "disk")
CONTEXTS = ("auto", "cpu", "gpu")
METHODS = ("pfc", "ffc")
FFC_LOSSES = ("arcface", "cosface", "sv")


def list_presets():
    """Names of the presets, one per module of recognition/configs (``base`` holds the defaults, not a preset)."""
    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__)
                  if m.name != "base" and not m.name.startswith("_"))


def get_config(dataset):
    """The base defaults merged with preset ``dataset``. Raises ValueError for an unknown preset (listing the
    presets) or for a preset that sets a key the base does not define (a typo would otherwise be ignored)."""
    presets = list_presets()
    if dataset not in presets:
        raise ValueError("unknown dataset preset %r; choose one of: %s" % (dataset, ", ".join(presets)))
    cfg = copy.deepcopy(importlib.import_module("recognition.configs.base").config)
    preset = importlib.import_module("recognition.configs." + dataset).config
    unknown = sorted(set(preset) - set(cfg))
    if unknown:
        raise ValueError("preset recognition/configs/%s.py sets unknown key(s) %s (see configs/base.py)"
                         % (dataset, ", ".join(unknown)))
    cfg.update(copy.deepcopy(preset))
    cfg.dataset = dataset
    return edict(cfg)


def build_arg_parser():
    """Every flag of recognition/train.py. Defaults are None so that only flags actually given override."""
    p = argparse.ArgumentParser(prog="train.py", description="Partial FC face-recognition training (MXNet + "
                                "Horovod). Launch with: horovodrun -np N python recognition/train.py --dataset ...")
    add = p.add_argument
    add("--dataset", required=True, help="preset: " + ", ".join(list_presets()))
    # --backbone: the same flag under a name horovodrun's own parser accepts (Python's argparse reads
    # "--network" after the command as an abbreviation of horovodrun's --network-interface(s), an error)
    add("--method", choices=METHODS, help="training method: pfc (Partial FC, default) or ffc (dynamic class queue)")
    add("--network", "--backbone", dest="network", help="backbone: " + ", ".join(NETWORKS)
        + " (write --backbone after horovodrun: it rejects --network)")
    add("--loss", help="margin preset: " + ", ".join("%s %s" % kv for kv in LOSSES.items()))
    add("--margins", help="m1,m2,m3 of s*(cos(m1*theta+m2)-m3) on the target logit; overrides --loss")
    add("--scale", type=float, help="logit scale s")
    add("--sample-ratio", type=float, help="share of each rank's class centres sampled per step, in (0, 1]")
    add("--interclass-filter", type=float, help="Partial FC v2: a negative with cosine above this counts as cosine 0, "
        "with no gradient, as arcface_torch does (0: off)")
    add("--bank-location", choices=BANK_LOCATIONS, help="where class centres and their momentum live")
    add("--bank-dir", help="folder of the bank file for --bank-location disk (rows read and written with "
        "pread / pwrite; default: a temporary folder)")
    add("--queue-size", type=int, help="FFC: slots of the dynamic class queue")
    add("--ffc-alpha", type=float, help="FFC: EMA rate of the gallery net (g <- a*g + (1-a)*probe)")
    add("--ffc-loss", choices=FFC_LOSSES, help="FFC: margin type over the queue")
    add("--margin", type=float, help="FFC: margin m of --ffc-loss (Partial FC takes --margins)")
    add("--batch-size", type=int, help="samples per rank per step (FFC: identities of the id loader and images "
        "of the instance loader per rank)")
    add("--lr", type=float, help="base learning rate, for the preset's lr_batch_reference global samples "
        "(scaled linearly to the actual global batch)")
    add("--num-epochs", type=float)
    add("--max-steps", type=int, help="stop after this many steps (the lr schedule spans the run)")
    add("--lr-mode", choices=LR_MODES)
    add("--lr-steps", help="comma-separated epochs at which lr *= 0.1 (step mode)")
    add("--warmup-epochs", type=float, help="linear warmup length in epochs (fractions allowed)")
    add("--embedding-size", type=int)
    add("--dropout", type=float)
    add("--act-type", choices=ACTIVATIONS, help="backbone activation: prelu (InsightFace's LeakyReLU op), "
        "prelu_conv (the same function and parameters, 1.6-4x faster to train on a CPU), relu")
    add("--bn-eps", type=float, help="BatchNorm eps of the backbone (default 2e-5, InsightFace's MXNet models; "
        "--pretrained follows the checkpoint's graph)")
    add("--fp16", action=argparse.BooleanOptionalAction, default=None, help="float16 trunk (GPU)")
    add("--loss-scale", choices=LOSS_SCALES, help="auto: dynamic loss scaling when --fp16, none otherwise")
    add("--ctx", choices=CONTEXTS, help="auto (default: mx.gpu(local_rank) when MXNet sees a GPU, else the CPU), "
        "or force cpu / gpu")
    add("--models-root", help="outputs go to MODELS_ROOT/<dataset>_<network>_<loss>")
    add("--output", help="exact output folder (overrides the --models-root naming)")
    add("--data-dir", help="dataset folder with train.rec/.idx/property (default: $%s/<preset folder>)"
        % DATA_ROOT_ENV)
    add("--val-dir", help="folder of the .bin verification sets (default: the data folder)")
    add("--val-targets", help="comma-separated .bin names, e.g. lfw,cfp_fp,agedb_30 ('' for none)")
    add("--num-classes", type=int, help="identities of a synthetic-reader preset")
    add("--resume", action="store_true", default=None, help="continue from the newest complete checkpoint")
    add("--seed", type=int)
    add("--frequent", type=int, help="log a line every N steps")
    add("--verbose", type=int, help="verify every N steps (0: never)")
    add("--checkpoint-every", type=int, help="save every N steps (and at the end)")
    add("--keep-exports", type=int, help="legacy model-NNNN.params exports kept, the newest N (0: all); the "
        "best-verifying weights stay in best-0000.params")
    add("--pretrained", help="PREFIX,EPOCH: start the backbone from legacy checkpoint PREFIX-EPOCH.params (this "
        "project's or InsightFace's MXNet models; the classifier fc7 is never taken)")
    add("--pretrained-partial", action="store_true", default=None, help="with --pretrained: load the parameters "
        "that fit and warn about the rest (default: any misfit is an error)")
    add("--pretrained-head", help="start the head from this project's checkpoint folder (checkpoints/step_*, "
        "any world size; a checkpoints/ folder means its newest)")
    add("--preprocess-threads", type=int, help="JPEG decoding threads per rank")
    return p


# flags copied verbatim onto the key of the same name (the others need parsing)
_DIRECT = ("method", "queue_size", "ffc_alpha", "ffc_loss", "network", "loss", "scale", "sample_ratio",
           "interclass_filter", "bank_location", "bank_dir", "batch_size", "lr", "num_epochs", "max_steps", "lr_mode",
           "warmup_epochs", "embedding_size", "dropout", "fp16", "ctx", "models_root", "output", "data_dir",
           "val_dir", "resume", "seed", "frequent", "verbose", "checkpoint_every", "preprocess_threads", "act_type",
           "loss_scale", "keep_exports", "pretrained", "pretrained_partial", "pretrained_head", "bn_eps")


def _numbers(flag, text, count=None):
    try:
        values = tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        values = None
    if values is None or (count is not None and len(values) != count):
        raise ValueError("%s takes %s comma-separated numbers, got %r" % (flag, count or "some", text))
    return values


def config_from_args(argv=None):
    """Parse ``argv`` (default sys.argv[1:]), merge the flags over the preset, validate, derive dependent keys.
    Bad values raise ValueError naming the flag or key and the valid choices."""
    args = build_arg_parser().parse_args(argv)
    cfg = get_config(args.dataset)
    for key in _DIRECT:
        value = getattr(args, key)
        if value is not None:
            cfg[key] = value
    if args.margins is not None:
        cfg.margins = _numbers("--margins", args.margins, 3)
    elif args.loss is not None:
        cfg.margins = None      # an explicit --loss replaces the preset's margins
    if args.margin is not None:
        cfg.ffc_margin = args.margin
    if args.lr_steps is not None:
        cfg.lr_steps = _numbers("--lr-steps", args.lr_steps)
    if args.val_targets is not None:
        cfg.val_targets = [t.strip() for t in args.val_targets.split(",") if t.strip()]
    if args.num_classes is not None:
        if cfg.reader != "synthetic":
            raise ValueError("--num-classes is for synthetic-reader presets; %s takes it from its property file"
                             % cfg.dataset)
        cfg.num_classes = args.num_classes
    return finalize(cfg)


def _check_choice(cfg, key, choices):
    if cfg[key] not in choices:
        raise ValueError("unknown %s %r; choose one of: %s" % (key.replace("_", " "), cfg[key], ", ".join(choices)))


def _check_range(cfg, key, low, high=None, low_open=False):
    value = cfg[key]
    bad = value is None or value < low or (low_open and value == low) or (high is not None and value > high)
    if bad:
        raise ValueError("%s must be %s %s%s, got %r" % (key, ">" if low_open else ">=", low,
                                                         "" if high is None else " and <= %s" % high, value))


def finalize(cfg):
    """Validate every choice and range, then fill the derived keys: margins (from loss), data_dir (from
    $PFC_DATA_ROOT for record presets), output (models_root/<dataset>_<network>_<loss>)."""
    _check_choice(cfg, "network", NETWORKS)
    _check_choice(cfg, "loss", tuple(LOSSES))
    _check_choice(cfg, "reader", READERS)
    _check_choice(cfg, "lr_mode", LR_MODES)
    _check_choice(cfg, "bank_location", BANK_LOCATIONS)
    _check_choice(cfg, "ctx", CONTEXTS)
    _check_choice(cfg, "act_type", ACTIVATIONS)
    _check_choice(cfg, "loss_scale", LOSS_SCALES)
    _check_choice(cfg, "method", METHODS)
    _check_choice(cfg, "ffc_loss", FFC_LOSSES)
    cfg.margins = tuple(float(m) for m in (LOSSES[cfg.loss] if cfg.margins is None else cfg.margins))
    if len(cfg.margins) != 3 or cfg.margins[0] <= 0:
        raise ValueError("margins must be (m1, m2, m3) with m1 > 0, got %r" % (cfg.margins,))
    _check_range(cfg, "sample_ratio", 0.0, 1.0, low_open=True)
    _check_range(cfg, "scale", 0.0, low_open=True)
    _check_range(cfg, "interclass_filter", 0.0, 1.0)
    _check_range(cfg, "dropout", 0.0, 1.0)
    _check_range(cfg, "bn_eps", 0.0, low_open=True)
    for key in ("batch_size", "embedding_size", "frequent", "checkpoint_every", "lr_batch_reference",
                "preprocess_threads"):
        _check_range(cfg, key, 1)
    for key in ("verbose", "warmup_epochs", "seed", "ffc_margin", "keep_exports"):
        _check_range(cfg, key, 0)
    _check_range(cfg, "queue_size", 1)
    _check_range(cfg, "ffc_alpha", 0.0, 1.0)
    _check_range(cfg, "ffc_sv_t", 1.0)
    if cfg.method == "ffc" and cfg.batch_size % 2:
        raise ValueError("FFC splits each instance batch into two halves: batch_size must be even, got %d"
                         % cfg.batch_size)
    _check_range(cfg, "lr", 0.0, low_open=True)
    _check_range(cfg, "num_epochs", 0.0, low_open=True)
    if cfg.max_steps is not None:
        _check_range(cfg, "max_steps", 1)
    if cfg.pretrained:
        from eval.embedding import parse_model_spec
        try:
            parse_model_spec(cfg.pretrained)
        except ValueError as err:
            raise ValueError("--pretrained: %s" % err) from None
    elif cfg.pretrained_partial:
        raise ValueError("--pretrained-partial needs --pretrained PREFIX,EPOCH")
    cfg.lr_steps = tuple(sorted(float(e) for e in cfg.lr_steps))
    cfg.val_targets = list(cfg.val_targets)
    if cfg.reader == "synthetic":
        if not isinstance(cfg.num_classes, int) or cfg.num_classes < 1:
            raise ValueError("preset %s (synthetic reader) needs num_classes >= 1, got %r"
                             % (cfg.dataset, cfg.num_classes))
    else:
        cfg.data_dir = _resolve_data_dir(cfg)
    if cfg.output is None:
        head = cfg.loss if cfg.method == "pfc" else "ffc_" + cfg.ffc_loss
        cfg.output = os.path.join(cfg.models_root, "%s_%s_%s" % (cfg.dataset, cfg.network, head))
    return cfg


def _resolve_data_dir(cfg):
    """The record data folder: --data-dir, else $PFC_DATA_ROOT/<data_folder>; it must exist."""
    if cfg.data_dir is None:
        root = os.environ.get(DATA_ROOT_ENV)
        if not root or not cfg.data_folder:
            raise ValueError("dataset %s reads RecordIO files: pass --data-dir DIR or set %s (the data is then "
                             "read from $%s/%s)" % (cfg.dataset, DATA_ROOT_ENV, DATA_ROOT_ENV, cfg.data_folder))
        cfg.data_dir = os.path.join(root, cfg.data_folder)
    if not os.path.isdir(cfg.data_dir):
        raise ValueError("data folder %s of dataset %s does not exist" % (cfg.data_dir, cfg.dataset))
    return cfg.data_dir
