"""The configuration keys every run has, with their defaults; each training method adds its own
(``TrainingMethod.config_defaults``). A preset overrides what differs; command-line flags override both
(``recognition.config.get_config`` / ``config_from_args``). A preset may only set keys defined here or by a
registered method."""
from easydict import EasyDict as edict

config = edict()
# --- model
config.network = "r50"              # backbone: r18, r34, r50, r100, r200, mbf (symbols.get_symbol)
config.embedding_size = 512         # size of the embedding output fc1 (E)
config.dropout = 0.0                # dropout rate before the embedding FC
config.pretrained = None            # "PREFIX,EPOCH": the backbone starts from this legacy checkpoint (never fc7)
config.pretrained_partial = False   # load what fits of `pretrained` and warn about the rest (else: an error)
config.pretrained_head = None       # a checkpoint folder of this project (checkpoints/step_*) the head starts from
config.act_type = "prelu"           # prelu | prelu_conv (same parameters, faster on CPU) | relu
config.bn_eps = 2e-5                # backbone BatchNorm eps, as InsightFace's MXNet fresnet (arcface_torch: 1e-5)
config.fp16 = False                 # float16 trunk (GPU); the head and master weights stay float32
config.loss_scale = "auto"          # auto (dynamic when fp16) | dynamic | none: float16 gradient loss scaling
# --- training method
config.method = "pfc"               # pfc (Partial FC) | ffc (dynamic class queue + EMA gallery net, recognition/ffc)
# --- head: its keys are declared by the training method (TrainingMethod.config_defaults): Partial FC's in
# recognition/partial_fc/method.py (loss, margins, sample_ratio, interclass_filter, bank_*, fc_weight_decay),
# FFC's in recognition/ffc/method.py (queue_size, ffc_*); a preset may set them like any key here
config.scale = 64.0                 # s, the logit scale of the margin softmax (both methods)
# --- optimisation (SGD with momentum)
config.batch_size = 128             # per rank
config.lr = 0.1                     # base rate for `lr_batch_reference` samples per step; the run uses
config.lr_batch_reference = 512     # lr * global_batch / lr_batch_reference (linear scaling rule)
config.momentum = 0.9
config.weight_decay = 5e-4          # backbone
config.num_epochs = 20              # run length in epochs (fractions allowed)
config.max_steps = None             # stop after this many steps (the LR schedule still spans num_epochs)
config.warmup_epochs = 0.0          # linear warmup to the base rate, in epochs (fractions allowed)
config.lr_mode = "step"             # step (x lr_factor at each of lr_steps) | poly (to 0 at the last step)
config.lr_steps = (8, 14, 18)       # epochs at which lr *= lr_factor ("step" mode)
config.lr_factor = 0.1
config.lr_power = 2.0               # "poly" mode: lr * (1 - progress) ** lr_power
# --- data
config.dataset = None               # the preset's name (set by get_config)
config.reader = "record"            # record (train.rec RecordIO) | synthetic (random images, no files)
config.data_dir = None              # --data-dir, else $PFC_DATA_ROOT/<data_folder>
config.data_folder = None           # the dataset's folder name under $PFC_DATA_ROOT
config.rec_prefix = "train"         # <data_dir>/train.rec, train.idx, property
config.num_classes = None           # identities (None: read from the property file)
config.num_images = None            # images, for the log (the record file is what counts)
config.synthetic_steps = 1000       # steps per "epoch" of the synthetic reader
config.preprocess_threads = 2       # JPEG decoding threads per rank
config.max_damaged = 0.01           # a rank whose share of damaged records exceeds this refuses the data set
# --- verification, logging, checkpoints
config.val_targets = ["lfw", "cfp_fp", "agedb_30"]   # .bin names in val_dir
config.val_dir = None               # folder of the .bin sets (None: data_dir)
config.val_batch_size = 64
config.verbose = 2000               # verify every N steps (0: never)
config.frequent = 50                # log a line every N steps
config.checkpoint_every = 2000      # save a checkpoint every N steps (and at the end)
config.keep_checkpoints = 2         # resumable states kept (checkpoints/step_*)
config.keep_exports = 3             # legacy model-%04d.params exports kept, the newest N (0: all; best-0000 stays)
config.models_root = "models"       # outputs go to models_root/<dataset>_<network>_<loss>
config.output = None                # derived from models_root unless given
config.resume = False               # continue from the newest intact checkpoint in `output`
config.overwrite = False            # replace an earlier run in `output` (else a second run there is refused)
config.elastic = False              # under horovodrun's elastic driver: go on after lost ranks, grow (elastic.py)
config.commit_every = 100           # --elastic: commit the state in memory every N steps (a lost rank loses the rest)
config.ctx = "auto"                 # auto (mx.gpu(local_rank) if MXNet sees a GPU, else cpu) | cpu | gpu
config.seed = 0
