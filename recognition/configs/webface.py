"""CASIA-WebFace (faces_webface_112x112): 10,572 identities, 494,414 images.

Recipe of the early arcface_torch WebFace setting: r50, ArcFace, lr 0.1 for a global batch of 512,
34 epochs, lr x 0.1 at epochs 20, 28 and 32.
"""
from easydict import EasyDict as edict

config = edict()
config.data_folder = "faces_webface_112x112"
config.num_classes = 10572
config.num_images = 494414
config.network = "r50"
config.loss = "arcface"
config.lr = 0.1
config.lr_batch_reference = 512
config.num_epochs = 34
config.lr_mode = "step"
config.lr_steps = (20, 28, 32)
