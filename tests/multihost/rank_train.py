"""One rank of a multi-host test: writes down where Horovod placed it and which device ``--ctx auto`` would give
it on a host with 2 GPUs and with 1 GPU (MXNet's GPU count mocked: this machine has none), then runs
recognition/train.py with the tiny test backbone on the CPU.

    python tests/multihost/rank_train.py REPORT_DIR TRAIN_ARGS...
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def devices_with_mocked_gpus(local_rank):
    """{GPU count: the device ``--ctx auto`` gives this rank, or the error} for hosts with 2 and 1 GPUs."""
    import mxnet as mx
    from recognition.trainer import choose_context
    real, chosen = mx.context.num_gpus, {}
    try:
        for count in (2, 1):
            mx.context.num_gpus = lambda: count
            try:
                chosen[count] = str(choose_context("auto", local_rank)[0])
            except ValueError as err:
                chosen[count] = "error: %s" % err
    finally:
        mx.context.num_gpus = real
    return chosen


def report(folder):
    import horovod.mxnet as hvd
    hvd.init()
    found = {"rank": hvd.rank(), "size": hvd.size(), "local_rank": hvd.local_rank(), "local_size": hvd.local_size(),
             "cross_rank": hvd.cross_rank(), "host": os.environ.get("HOROVOD_HOSTNAME"), "pid": os.getpid(),
             "ssh_connection": os.environ.get("SSH_CONNECTION"), "gloo_iface": os.environ.get("HOROVOD_GLOO_IFACE"),
             "nccl_iface": os.environ.get("NCCL_SOCKET_IFNAME"),
             "devices": devices_with_mocked_gpus(hvd.local_rank())}
    path = os.path.join(folder, "rank%d.json" % hvd.rank())
    with open(path + ".tmp", "w") as f:
        json.dump(found, f)
    os.replace(path + ".tmp", path)


if __name__ == "__main__":
    report(sys.argv[1])
    from tests.conftest import patch_backbone
    patch_backbone()
    from recognition.train import main
    sys.exit(main(sys.argv[2:]))
