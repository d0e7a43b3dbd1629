"""Partial FC training entry point.

    horovodrun -np 8 python recognition/train.py --dataset glint360k --backbone r100     (the 8 GPUs: --ctx auto)
    horovodrun -np 16 -H host1:8,host2:8 python recognition/train.py --dataset ms1mv3 --sample-ratio 0.1
    python recognition/train.py --dataset synthetic --data-dir demo_output/data      (one process)
    horovodrun -np 8 python recognition/train.py --dataset ms1mv3 --pretrained r100/model,1   (fine-tuning)

Flags override the preset (recognition/configs/<dataset>.py); `--help` lists them.
"""
import faulthandler
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from recognition.config import config_from_args  # noqa: E402
from recognition.dist import host_name, on_every_rank  # noqa: E402


def main(argv=None):
    config_error, cfg = None, None
    try:
        cfg = config_from_args(argv)
    except ValueError as err:         # also when a host cannot read the data folder: agreed below
        config_error = err
    import horovod.mxnet as hvd
    hvd.init()
    try:    # every rank stops alike when the configuration failed on some (no rank waits in a collective)
        on_every_rank(lambda: _reraise(config_error), "reading the configuration")
    except ValueError as err:
        sys.stderr.write("train.py: error (host %s): %s\n" % (host_name(), config_error or err))
        return 2
    try:    # after MXNet's own handler (it chains to it): a crash in native code names every thread's Python stack
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError):     # stderr without a file descriptor (e.g. captured in-process)
        pass
    logging.basicConfig(level=logging.INFO if hvd.rank() == 0 else logging.WARNING,
                        format="%%(asctime)s [rank %d] %%(message)s" % hvd.rank(), datefmt="%H:%M:%S")
    from recognition.trainer import Trainer, TrainingError
    trainer = None
    try:
        trainer = Trainer(cfg)
        if cfg.resume:
            trainer.resume()
    except (ValueError, OSError) as err:        # bad data, folders, checkpoints: the same on every rank
        sys.stderr.write("train.py: error (rank %d, host %s): %s\n" % (hvd.rank(), host_name(), err))
        if trainer is not None:
            trainer.close()
        return 2
    try:
        loss = trainer.fit()
    except TrainingError as err:
        sys.stderr.write("train.py: error (rank %d, host %s): %s\n" % (hvd.rank(), host_name(), err))
        return 2
    if hvd.rank() == 0:
        logging.info("done: %d steps, last loss %.4f, output in %s", trainer.step, loss, cfg.output)
    return 0


def _reraise(error):
    if error is not None:
        raise error


if __name__ == "__main__":
    sys.exit(main())
