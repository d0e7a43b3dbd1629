"""Synthetic identities written by tools/make_synthetic.py: the Partial FC demo (``make demo``, tools/demo.sh).

A MobileFaceNet with Partial FC sampling half the centres; the softer margin and scale suit the few steps a
CPU run makes. Verification uses holdout.bin (pairs of held-out identities) in the same folder. The optimisation
and logging keys below are the demo's own settings (tools/demo.sh passes only the data and output folders): one
epoch of the demo's 300 x 20 images at 32 images per rank on 2 ranks (93 steps), verified twice on the way.
"""
from easydict import EasyDict as edict

config = edict()
config.data_folder = "synthetic"
config.num_classes = None          # read from the folder's property file
config.network = "mbf"
config.act_type = "prelu_conv"     # PReLU computed with convolutions: ~4x faster mbf training on a CPU
config.loss = "arcface"
config.margins = (1.0, 0.3, 0.0)
config.scale = 32.0
config.sample_ratio = 0.5
config.batch_size = 32
config.lr = 0.2
config.lr_batch_reference = 128
config.num_epochs = 1
config.warmup_epochs = 0.1
config.lr_mode = "poly"
config.preprocess_threads = 1      # the demo's 2 ranks share 2 cores
config.val_targets = ["holdout"]
config.verbose = 47
config.frequent = 10
config.checkpoint_every = 47
