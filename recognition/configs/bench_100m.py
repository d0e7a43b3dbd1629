"""Benchmark preset: 100,000,000 identities on the synthetic reader (random images and labels, no files)."""
from easydict import EasyDict as edict

config = edict()
config.reader = "synthetic"
config.num_classes = 100000000
config.sample_ratio = 0.01
# 100M x 512 float32 centres + momentum = 410 GB: more than a node's memory unless spread over many
# ranks, so a file on local disk read with pread / pwrite (--bank-location host on a large enough cluster)
config.bank_location = "disk"
config.network = "mbf"
config.batch_size = 64
config.val_targets = []             # nothing to verify on random images
config.verbose = 0
config.checkpoint_every = 1000
