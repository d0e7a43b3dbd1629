"""Partial FC training entry point.

    horovodrun -np 8 python recognition/train.py --dataset glint360k --backbone r100     (the 8 GPUs: --ctx auto)
    horovodrun -np 16 -H host1:8,host2:8 python recognition/train.py --dataset ms1mv3 --sample-ratio 0.1
    python recognition/train.py --dataset synthetic --data-dir demo_output/data      (one process)
    horovodrun -np 8 python recognition/train.py --dataset ms1mv3 --pretrained r100/model,1   (fine-tuning)
    horovodrun --gloo --min-np 2 --max-np 4 --host-discovery-script S python recognition/train.py ... --elastic

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
    elastic_driver = os.environ.get("HOROVOD_ELASTIC") == "1"        # horovodrun --min-np ... sets it
    try:
        cfg = config_from_args(argv)
        if cfg.elastic or elastic_driver:
            from recognition.elastic import check_launcher
            check_launcher(cfg.elastic)
    except ValueError as err:         # also when a host cannot read the data folder: agreed below
        config_error = err
    import horovod.mxnet as hvd
    hvd.init()
    if elastic_driver:      # no collective outside the elastic run: a worker that joins later would wait in it alone
        if config_error is not None:    # this worker fails; the driver drops its host and the job goes on without it
            sys.stderr.write("train.py: error (host %s): %s\n" % (host_name(), config_error))
            return 2
        _configure_logging(hvd.rank())
        return _train_elastic(cfg, hvd)
    try:    # every rank stops alike when the configuration failed on some (no rank waits in a collective)
        on_every_rank(lambda: _reraise(config_error), "reading the configuration")
    except ValueError as err:
        sys.stderr.write("train.py: error (host %s): %s\n" % (host_name(), config_error or err))
        return 2
    try:    # after MXNet's own handler (it chains to it): a crash in native code names every thread's Python stack
        faulthandler.enable(all_threads=True)
    except (AttributeError, ValueError):     # stderr without a file descriptor (e.g. captured in-process)
        pass
    _configure_logging(hvd.rank())
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


def _configure_logging(rank, relabel=False):
    """Rank 0 logs progress, the others warnings only; ``relabel``: the rank changed (an elastic restart)."""
    level, fmt = logging.INFO if rank == 0 else logging.WARNING, "%%(asctime)s [rank %d] %%(message)s" % rank
    if not relabel:
        logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S")
        return
    logging.getLogger().setLevel(level)
    for handler in logging.getLogger().handlers:
        handler.setFormatter(logging.Formatter(fmt, datefmt="%H:%M:%S"))


def _train_elastic(cfg, hvd):
    """--elastic: recognition/elastic.py trains, recovering from lost ranks and growing with added hosts."""
    from recognition import elastic
    from recognition.trainer import TrainingError
    try:
        loss = elastic.run(cfg, on_new_world=lambda: _configure_logging(hvd.rank(), relabel=True))
    except (ValueError, OSError, TrainingError, elastic.CommitLost) as err:
        sys.stderr.write("train.py: error (rank %d, host %s): %s\n" % (hvd.rank(), host_name(), err))
        return 2
    if hvd.rank() == 0:
        logging.info("done: last loss %.4f, output in %s", loss, cfg.output)
    return 0


def _reraise(error):
    if error is not None:
        raise error


if __name__ == "__main__":
    sys.exit(main())
