"""One rank of a :func:`tests.harness.run_ranks` job: import the body, run it, pickle its result."""
import faulthandler
import importlib
import os
import pickle
import sys
import traceback


def main():
    module, name, work = sys.argv[1:4]
    import horovod.mxnet as hvd
    # after MXNet's own handler is installed (it chains to it): a crash in native code shows every thread's
    # Python stack in the job's output
    faulthandler.enable(all_threads=True)
    hvd.init()
    with open(os.path.join(work, "kwargs.pkl"), "rb") as f:
        kwargs = pickle.load(f)
    try:
        result = getattr(importlib.import_module(module), name)(**kwargs)
    except BaseException:
        sys.stderr.write("[rank %d] body raised:\n%s" % (hvd.rank(), traceback.format_exc()))
        sys.stderr.flush()
        os._exit(1)  # no atexit handlers: a rank that failed must not wait in horovod's shutdown
    tmp = os.path.join(work, "rank%d.pkl.tmp" % hvd.rank())
    with open(tmp, "wb") as f:
        pickle.dump(result, f)
    os.replace(tmp, os.path.join(work, "rank%d.pkl" % hvd.rank()))


if __name__ == "__main__":
    main()
