"""Glint360K: 360,232 identities, 17,091,657 images.

Recipe of arcface_torch's configs/glint360k_r100.py: r100, CosFace (1, 0, 0.4), weight decay 1e-4,
lr 0.1 for a global batch of 1024 (128 x 8 GPUs), 20 epochs of polynomial decay, no warmup.
"""
from easydict import EasyDict as edict

config = edict()
config.data_folder = "glint360k"
config.num_classes = 360232
config.num_images = 17091657
config.network = "r100"
config.loss = "cosface"
config.weight_decay = 1e-4
config.fc_weight_decay = 1e-4
config.lr = 0.1
config.lr_batch_reference = 1024
config.num_epochs = 20
config.warmup_epochs = 0.0
config.lr_mode = "poly"
