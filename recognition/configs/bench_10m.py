"""Benchmark preset: 10,000,000 identities on the synthetic reader (random images and labels, no files)."""
from easydict import EasyDict as edict

config = edict()
config.reader = "synthetic"
config.num_classes = 10000000
config.sample_ratio = 0.01
# 10M x 512 float32 centres + momentum = 41 GB: host memory, the sampled rows go to the device
config.bank_location = "host"
config.network = "mbf"
config.batch_size = 64
config.val_targets = []             # nothing to verify on random images
config.verbose = 0
config.checkpoint_every = 1000
