"""FFC on Glint360K (360,232 identities): a queue of 30 k identities (about 8 %), ArcFace m = 0.5, s = 32, the
gallery net an EMA of the probe with alpha = 0.99 (FFC's reference); schedule and backbone of ``glint360k``."""
import copy

from recognition.configs.glint360k import config as glint360k

config = copy.deepcopy(glint360k)
config.method = "ffc"
config.queue_size = 30000
config.ffc_loss = "arcface"
config.ffc_margin = 0.5
config.ffc_alpha = 0.99
config.scale = 32.0
