"""FFC on the synthetic identities of the CPU demo (tools/make_synthetic.py): ``make demo METHOD=ffc``.

The data, backbone and verification of ``synthetic``; the head is FFC's queue, a third of the demo's 300
identities. The optimisation keys are the demo's own settings (tools/demo.sh passes only the data and output
folders), chosen to train in about 5 minutes on 2 cores (docs/ffc.md, "The CPU demo"): 16 identities and 16
images per rank (an FFC step pushes 3 x 1.5 B rows through the backbones, so a smaller B buys more updates for
the same time), 40 steps (0.214 of an epoch of the instance loader), a linear decay from 3 warm-up steps,
verification only once, by the demo after training. The gallery net follows the probe with a lag of ~5 steps
(alpha 0.8; the reference's 0.99 is a lag of ~100 steps, for runs of many thousands).
"""
import copy

from recognition.configs.synthetic import config as synthetic

config = copy.deepcopy(synthetic)
config.method = "ffc"
config.queue_size = 100
config.ffc_loss = "arcface"
config.ffc_margin = 0.3
config.ffc_alpha = 0.8
config.scale = 32.0
config.batch_size = 16
config.lr = 0.6                    # for lr_batch_reference 128: 0.15 at the demo's global batch of 32
config.num_epochs = 0.214          # 40 steps of 2 x 16 instance images
config.warmup_epochs = 0.016       # 3 steps
config.lr_power = 1.0              # poly with power 1: a linear decay to 0
config.verbose = 0                 # the demo verifies the exported checkpoint after training
config.frequent = 5
config.checkpoint_every = 40       # one checkpoint, at the end
