"""FFC on the synthetic identities of the CPU demo (tools/make_synthetic.py; ``make demo METHOD=ffc``).

The data, backbone and verification of ``synthetic``; the head is FFC's queue, a third of the demo's 300
identities (larger than the 96 identities one global step of 2 x 32 inserts). A CPU demo makes about a hundred
steps, so the gallery net follows the probe faster than the reference's alpha = 0.99 (a lag of ~100 steps).
"""
import copy

from recognition.configs.synthetic import config as synthetic

config = copy.deepcopy(synthetic)
config.method = "ffc"
config.queue_size = 100
config.ffc_loss = "arcface"
config.ffc_margin = 0.3
config.ffc_alpha = 0.9
config.scale = 32.0
