"""Synthetic identities written by tools/make_synthetic.py (the CPU demo, about 1,000 identities).

A MobileFaceNet with Partial FC sampling half the centres; the softer margin and scale suit the few steps a
CPU run makes. Verification uses holdout.bin (pairs of held-out identities) in the same folder.
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
config.batch_size = 64
config.lr = 0.1
config.lr_batch_reference = 128
config.num_epochs = 4
config.warmup_epochs = 0.2
config.lr_mode = "poly"
config.val_targets = ["holdout"]
config.verbose = 200
config.frequent = 10
config.checkpoint_every = 200
