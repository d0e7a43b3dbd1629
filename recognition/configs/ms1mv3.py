"""MS1MV3 (ms1m-retinaface-t1): 93,431 identities, 5,179,510 images.

Recipe of arcface_torch's configs/ms1mv3_r100.py: r100, ArcFace (1, 0.5, 0), weight decay 5e-4,
lr 0.2 for a global batch of 1024 (128 x 8 GPUs), 25 epochs of polynomial decay, no warmup.
"""
from easydict import EasyDict as edict

config = edict()
config.data_folder = "ms1m-retinaface-t1"
config.num_classes = 93431
config.num_images = 5179510
config.network = "r100"
config.loss = "arcface"
config.lr = 0.2
config.lr_batch_reference = 1024
config.num_epochs = 25
config.warmup_epochs = 0.0
config.lr_mode = "poly"
