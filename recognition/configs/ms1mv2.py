"""MS1MV2 (InsightFace's faces_emore): 85,742 identities, 5,822,653 images.

Recipe of arcface_torch's configs/ms1mv2_r100.py: r100, ArcFace (1, 0.5, 0), weight decay 5e-4,
lr 0.1 for a global batch of 1024 (128 x 8 GPUs), 20 epochs of polynomial decay, no warmup.
"""
from easydict import EasyDict as edict

config = edict()
config.data_folder = "faces_emore"
config.num_classes = 85742
config.num_images = 5822653
config.network = "r100"
config.loss = "arcface"
config.lr = 0.1
config.lr_batch_reference = 1024
config.num_epochs = 20
config.warmup_epochs = 0.0
config.lr_mode = "poly"
