"""Benchmark preset: 1,000,000 identities on the synthetic reader (random images and labels, no files)."""
from easydict import EasyDict as edict

config = edict()
config.reader = "synthetic"
config.num_classes = 1000000
config.sample_ratio = 0.1
# 1M x 512 float32 centres + momentum = 4 GB: fits one accelerator (or host memory on CPU)
config.bank_location = "device"
config.network = "mbf"
config.batch_size = 64
config.val_targets = []             # nothing to verify on random images
config.verbose = 0
config.checkpoint_every = 1000
