"""One run's configuration: base defaults, then a dataset preset, then command-line flags; resolved once, frozen.

    cfg = config_from_args(["--dataset", "glint360k", "--network", "r50", "--sample-ratio", "0.1"])

``configs/base.py`` defines the keys every run has; each training method declares its own keys and flags
(``TrainingMethod.config_defaults`` / ``add_arguments``, e.g. ``recognition/partial_fc/method.py``), merged here
for every registered method, so a preset may set any of them. ``configs/<preset>.py`` overrides some keys; a
flag given on the command line overrides both (a flag's ``dest`` is its key; flags not given leave the key as
it is). ``finalize`` then validates every key, derives the rest (margins, the data folder, the number of classes
from the data's ``property`` file, the output folder) and returns a ``FrozenConfig``: read-only from then on.
The data folder comes from ``--data-dir``, else ``$PFC_DATA_ROOT/<the preset's data_folder>``: there are no
personal paths in code.
"""
import argparse
import copy
import importlib
import os
import pkgutil

from easydict import EasyDict as edict

import symbols
from recognition import configs
from recognition.config_checks import check_choice, check_range, parse_numbers
from recognition.data import rec_format
from recognition.methods import method_class, method_names, registered_methods
from symbols.common import ACT_TYPES

LOSS_SCALES = ("auto", "dynamic", "none")
ACTIVATIONS = ACT_TYPES
NETWORKS = symbols.NETWORKS
DATA_ROOT_ENV = "PFC_DATA_ROOT"
READERS = ("record", "synthetic")
LR_MODES = ("step", "poly")
CONTEXTS = ("auto", "cpu", "gpu")


class FrozenConfig(edict):
    """A resolved configuration: read it as an EasyDict (``cfg.lr`` or ``cfg["lr"]``); any write raises.
    Lists are stored as tuples, so nothing inside can change either."""

    def __init__(self, values=None):
        for key, value in (values or {}).items():
            value = tuple(value) if isinstance(value, list) else value
            dict.__setitem__(self, key, value)
            object.__setattr__(self, key, value)

    def _read_only(self, *args, **kwargs):
        raise TypeError("the configuration is read-only once finalize() resolved it; set keys in a preset, "
                        "with a flag, or on the EasyDict before finalize()")

    __setattr__ = __setitem__ = __delattr__ = __delitem__ = _read_only
    update = pop = popitem = setdefault = clear = _read_only

    def __reduce__(self):
        return FrozenConfig, (dict(self),)

    def __deepcopy__(self, memo):
        return FrozenConfig(copy.deepcopy(dict(self), memo))

    def copy(self):
        return FrozenConfig(dict(self))

    def thaw(self):
        """A writable EasyDict copy (to change keys and finalize() again)."""
        return edict(copy.deepcopy(dict(self)))


def list_presets():
    """Names of the presets, one per module of recognition/configs (``base`` holds the defaults, not a preset)."""
    return sorted(m.name for m in pkgutil.iter_modules(configs.__path__)
                  if m.name != "base" and not m.name.startswith("_"))


def default_config():
    """configs/base.py's keys plus every registered training method's own keys, with their defaults."""
    cfg = copy.deepcopy(importlib.import_module("recognition.configs.base").config)
    for cls in registered_methods():
        own = cls.config_defaults()
        taken = sorted(set(own) & set(cfg))
        if taken:
            raise ValueError("training method %r declares key(s) %s that already exist" % (cls.name, ", ".join(taken)))
        cfg.update(copy.deepcopy(own))
    return cfg


def get_config(dataset):
    """The defaults merged with preset ``dataset`` (a writable EasyDict, not yet finalized). Raises ValueError for
    an unknown preset (listing the presets) or for a preset that sets a key nobody defines (a typo would
    otherwise be ignored)."""
    presets = list_presets()
    if dataset not in presets:
        raise ValueError("unknown dataset preset %r; choose one of: %s" % (dataset, ", ".join(presets)))
    cfg = default_config()
    preset = importlib.import_module("recognition.configs." + dataset).config
    unknown = sorted(set(preset) - set(cfg))
    if unknown:
        raise ValueError("preset recognition/configs/%s.py sets unknown key(s) %s (see configs/base.py and the "
                         "training methods' config_defaults)" % (dataset, ", ".join(unknown)))
    cfg.update(copy.deepcopy(preset))
    cfg.dataset = dataset
    return edict(cfg)


def build_arg_parser():
    """Every flag of recognition/train.py: the shared ones, then one group per training method. A flag not given
    is absent from the parsed namespace (``argparse.SUPPRESS``), so only given flags override."""
    p = argparse.ArgumentParser(prog="train.py", argument_default=argparse.SUPPRESS,
                                description="Face-recognition training (MXNet + Horovod). Launch with: horovodrun "
                                "-np N python recognition/train.py --dataset ...")
    add = p.add_argument
    add("--dataset", required=True, help="preset: " + ", ".join(list_presets()))
    add("--method", choices=method_names(), help="training method: %s (default pfc)" % ", ".join(method_names()))
    # --backbone: the same flag under a name horovodrun's own parser accepts (Python's argparse reads
    # "--network" after the command as an abbreviation of horovodrun's --network-interface(s), an error)
    add("--network", "--backbone", dest="network", help="backbone: " + ", ".join(NETWORKS)
        + " (write --backbone after horovodrun: it rejects --network)")
    add("--scale", type=float, help="logit scale s of the margin softmax")
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
    add("--fp16", action=argparse.BooleanOptionalAction, help="float16 trunk (GPU)")
    add("--loss-scale", choices=LOSS_SCALES, help="auto: dynamic loss scaling when --fp16, none otherwise")
    add("--ctx", choices=CONTEXTS, help="auto (default: mx.gpu(local_rank) when MXNet sees a GPU, else the CPU), "
        "or force cpu / gpu")
    add("--models-root", help="outputs go to MODELS_ROOT/<dataset>_<network>_<head>")
    add("--output", help="exact output folder (overrides the --models-root naming)")
    add("--data-dir", help="dataset folder with train.rec/.idx/property (default: $%s/<preset folder>)"
        % DATA_ROOT_ENV)
    add("--val-dir", help="folder of the .bin verification sets (default: the data folder)")
    add("--val-targets", help="comma-separated .bin names, e.g. lfw,cfp_fp,agedb_30 ('' for none)")
    add("--num-classes", type=int, help="identities of a synthetic-reader preset")
    add("--resume", action="store_true", help="continue from the newest intact checkpoint (damaged newer ones "
        "are named and skipped)")
    add("--overwrite", action="store_true", help="replace the earlier run in the output folder (its checkpoints, "
        "exports and log are deleted); without it (or --resume) a folder holding a run is refused")
    add("--elastic", action="store_true", help="elastic training under horovodrun --min-np N --max-np M "
        "--host-discovery-script S: after a lost rank the others go on from the last commit; added hosts join at "
        "the next commit")
    add("--commit-every", type=int, help="--elastic: commit the training state in memory every N steps (a lost "
        "rank costs the steps since the last commit)")
    add("--seed", type=int)
    add("--frequent", type=int, help="log a line every N steps")
    add("--verbose", type=int, help="verify every N steps (0: never)")
    add("--checkpoint-every", type=int, help="save every N steps (and at the end)")
    add("--keep-exports", type=int, help="legacy model-NNNN.params exports kept, the newest N (0: all); the "
        "best-verifying weights stay in best-0000.params")
    add("--pretrained", help="PREFIX,EPOCH: start the backbone from legacy checkpoint PREFIX-EPOCH.params (this "
        "project's or InsightFace's MXNet models; the classifier fc7 is never taken)")
    add("--pretrained-partial", action="store_true", help="with --pretrained: load the parameters that fit and "
        "warn about the rest (default: any misfit is an error)")
    add("--pretrained-head", help="start the head from this project's checkpoint folder (checkpoints/step_*, "
        "any world size; a checkpoints/ folder means its newest)")
    add("--preprocess-threads", type=int, help="JPEG decoding threads per rank")
    add("--max-damaged", type=float, help="largest share of damaged records a rank accepts in its part of the "
        "data set (default 0.01); past it the run stops, naming the file and the first bad records")
    p.method_flags = {}         # config key -> (flag, the method that owns it)
    for cls in registered_methods():
        group = p.add_argument_group("%s (--method %s)" % (cls.__name__, cls.name))
        cls.add_arguments(group)
        p.method_flags.update({a.dest: (a.option_strings[0], cls.name) for a in group._group_actions})
    return p


def config_from_args(argv=None):
    """Parse ``argv`` (default sys.argv[1:]), merge the flags over the preset, then ``finalize``. Bad values raise
    ValueError naming the flag or key and the valid choices."""
    parser = build_arg_parser()
    given = vars(parser.parse_args(argv))
    cfg = get_config(given.pop("dataset"))
    method = given.get("method", cfg.method)
    for key, (flag, owner) in sorted(parser.method_flags.items()):
        if key in given and owner != method:
            raise ValueError("%s belongs to --method %s; this run trains with --method %s" % (flag, owner, method))
    if "num_classes" in given and cfg.reader != "synthetic":
        raise ValueError("--num-classes is for synthetic-reader presets; %s takes it from its property file"
                         % cfg.dataset)
    for key, value in given.items():
        cfg[key] = value
    return finalize(cfg)


def finalize(cfg):
    """Validate every choice and range, fill the derived keys (the method's own, data_dir from $PFC_DATA_ROOT,
    num_classes from the data's property file, output = models_root/<dataset>_<network>_<head>) and return the
    configuration frozen."""
    cfg = edict(cfg)
    check_choice(cfg, "method", method_names())
    check_choice(cfg, "network", NETWORKS)
    check_choice(cfg, "reader", READERS)
    check_choice(cfg, "lr_mode", LR_MODES)
    check_choice(cfg, "ctx", CONTEXTS)
    check_choice(cfg, "act_type", ACTIVATIONS)
    check_choice(cfg, "loss_scale", LOSS_SCALES)
    check_range(cfg, "scale", 0.0, low_open=True)
    check_range(cfg, "dropout", 0.0, 1.0)
    check_range(cfg, "bn_eps", 0.0, low_open=True)
    check_range(cfg, "max_damaged", 0.0, 1.0)
    for key in ("batch_size", "embedding_size", "frequent", "checkpoint_every", "lr_batch_reference",
                "preprocess_threads", "keep_checkpoints", "val_batch_size", "synthetic_steps", "commit_every"):
        check_range(cfg, key, 1)
    for key in ("verbose", "warmup_epochs", "seed", "keep_exports", "momentum", "weight_decay", "lr_factor",
                "lr_power"):
        check_range(cfg, key, 0)
    check_range(cfg, "lr", 0.0, low_open=True)
    check_range(cfg, "num_epochs", 0.0, low_open=True)
    if cfg.max_steps is not None:
        check_range(cfg, "max_steps", 1)
    if cfg.pretrained:
        from eval.embedding import parse_model_spec
        try:
            parse_model_spec(cfg.pretrained)
        except ValueError as err:
            raise ValueError("--pretrained: %s" % err) from None
    elif cfg.pretrained_partial:
        raise ValueError("--pretrained-partial needs --pretrained PREFIX,EPOCH")
    if isinstance(cfg.lr_steps, str):
        cfg.lr_steps = parse_numbers("--lr-steps", cfg.lr_steps)
    cfg.lr_steps = tuple(sorted(float(e) for e in cfg.lr_steps))
    if isinstance(cfg.val_targets, str):
        cfg.val_targets = [t.strip() for t in cfg.val_targets.split(",") if t.strip()]
    cfg.val_targets = list(cfg.val_targets)
    if cfg.reader == "synthetic":
        if not isinstance(cfg.num_classes, int) or cfg.num_classes < 1:
            raise ValueError("preset %s (synthetic reader) needs num_classes >= 1, got %r"
                             % (cfg.dataset, cfg.num_classes))
    else:
        cfg.data_dir = _resolve_data_dir(cfg)
        cfg.num_classes = _classes_of_data(cfg)
    method = method_class(cfg.method)
    method.finalize_config(cfg)
    if cfg.output is None:
        cfg.output = os.path.join(cfg.models_root, "%s_%s_%s" % (cfg.dataset, cfg.network, method.output_name(cfg)))
    return FrozenConfig(cfg)


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


def _classes_of_data(cfg):
    """The number of classes of a record data set: its ``property`` file's (a preset's own figure is only a
    hint; a difference is logged)."""
    path = os.path.join(cfg.data_dir, rec_format.PROPERTY)
    try:
        num_classes = rec_format.read_property(path)[0]
    except (FileNotFoundError, ValueError) as err:
        raise ValueError(str(err)) from None
    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        import logging
        logging.getLogger("recognition.train").warning(
            "%s says %d classes, preset %s %d; using the file's", path, num_classes, cfg.dataset, cfg.num_classes)
    return num_classes
