"""Images/s of the training reader (RecordReader: mx.io.ImageRecordIter + the random mirror) on 1 and 2 ranks,
against a plain single-threaded Python loop (mx.recordio + cv2.imdecode) over the same records.

    OMP_NUM_THREADS=1 python tools/benchmark_data.py [--data-dir DIR] [--images 4096] [--content faces|noise] \\
        [--batch-size 128] [--threads 2] [--epochs 2]

Without --data-dir it first writes --images 112x112 JPEGs (synthetic faces of tools/make_synthetic.py, or
uniform noise, which is about 5x larger and slower to decode) into a temporary folder. Each reader setting runs
in fresh processes; the 2-rank setting runs rank 0 and rank 1 of 2 at the same time, each reading its half,
and its images/s is all images read over the slower rank's time. Timed: whole epochs after the reader is made
(making it, which checks every record's header, is reported as open_s). The Python loop does the same work per
image as the reader's output needs: read, decode, BGR->RGB, HWC->CHW float32. Prints a table, then one JSON line.
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import cli  # noqa: E402


def python_loop(rec_path, limit=None):
    """(images, seconds) of a single-threaded decode of the records of an images-only file, in file order."""
    import cv2
    import mxnet as mx
    from recognition.data import rec_format
    reader = mx.recordio.MXIndexedRecordIO(rec_format.index_path(rec_path), rec_path, "r")
    keys = sorted(reader.keys)[:limit]
    start = time.perf_counter()
    for key in keys:
        header, payload = mx.recordio.unpack(reader.read_idx(key))
        bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        chw = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB).transpose(2, 0, 1).astype(np.float32)
        assert chw.shape[0] == 3
    seconds = time.perf_counter() - start
    reader.close()
    return len(keys), seconds


def reader_worker(rec_path, num_classes, rank, num_ranks, batch_size, threads, epochs):
    """Time ``epochs`` epochs of RecordReader as rank ``rank`` of ``num_ranks``; returns a dict."""
    from recognition.data.record_reader import RecordReader
    start = time.perf_counter()
    reader = RecordReader(rec_path, batch_size, num_classes, rank=rank, num_ranks=num_ranks,
                          preprocess_threads=threads)
    open_s = time.perf_counter() - start
    images, start = 0, time.perf_counter()
    for epoch in range(epochs):
        for batch in reader.epoch(epoch):
            batch.data.wait_to_read()
            images += batch.data.shape[0] - batch.pad
    return {"rank": rank, "images": images, "seconds": time.perf_counter() - start, "open_s": open_s}


def run_workers(commands, what):
    """Start every command at once (one thread each); the JSON object each prints last, in order."""
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", MXNET_CPU_WORKER_NTHREADS="1"))
             for cmd in commands]
    results = []
    for proc in procs:
        out, _ = proc.communicate()
        if proc.returncode:
            raise RuntimeError("%s worker failed with exit code %d" % (what, proc.returncode))
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def run_ranks(args, rec_path, num_classes, num_ranks):
    """Run ``num_ranks`` reader processes at once; (images/s over the slower rank's time, per-rank results)."""
    results = run_workers([[sys.executable, os.path.abspath(__file__), "--worker", rec_path, str(num_classes),
                            str(rank), str(num_ranks), "--batch-size", str(args.batch_size), "--threads",
                            str(args.threads), "--epochs", str(args.epochs)] for rank in range(num_ranks)], "reader")
    total = sum(r["images"] for r in results)
    return total / max(r["seconds"] for r in results), results


def make_data(folder, images, content):
    """A training set of ``images`` 112x112 JPEGs in ``folder``; returns its open_record_set dict."""
    from recognition.data import rec_format, record_reader
    if content == "faces":
        from tools.make_synthetic import make_dataset
        make_dataset(folder, identities=max(1, images // 16), images=16, holdout=0, progress=False)
    else:
        rng = np.random.default_rng(0)
        with rec_format.RecordSetWriter(os.path.join(folder, "train"), 1000, layouts=("iter",)) as writer:
            for i in range(images):
                pixels = rng.integers(0, 256, (112, 112, 3), dtype=np.uint8)
                writer.add(int(rng.integers(1000)), rec_format.encode_image(pixels, "jpg", 95))
    return record_reader.open_record_set(folder)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="a folder with train_iter.rec/.idx and property (default: make one)")
    p.add_argument("--images", type=int, default=4096, help="images to make when there is no --data-dir")
    p.add_argument("--content", choices=("faces", "noise"), default="faces", help="what the made images show")
    p.add_argument("--batch-size", type=int, default=128, help="per rank")
    p.add_argument("--threads", type=int, default=2, help="preprocess_threads of each rank's reader")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--worker", nargs=4, metavar=("REC", "CLASSES", "RANK", "RANKS"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error("--data-dir %s is not a folder" % args.data_dir)
    if min(args.images, args.batch_size, args.threads, args.epochs) < 1:
        p.error("--images, --batch-size, --threads and --epochs must be >= 1")
    if args.worker:
        rec, classes, rank, ranks = args.worker
        print(json.dumps(reader_worker(rec, int(classes), int(rank), int(ranks), args.batch_size, args.threads,
                                       args.epochs)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        found = dataset_info(args, tmp)
        n, seconds = python_loop(found["rec"])
        rows = [("python loop, 1 thread", n / seconds, "%d images in %.2f s" % (n, seconds))]
        figures = {"python_loop_img_s": n / seconds}
        for ranks in (1, 2):
            speed, results = run_ranks(args, found["rec"], found["num_classes"], ranks)
            detail = ", ".join("rank %d: %d images in %.2f s (open %.2f s)" % (r["rank"], r["images"], r["seconds"],
                                                                              r["open_s"]) for r in results)
            rows.append(("RecordReader, %d rank(s) x %d threads" % (ranks, args.threads), speed, detail))
            figures["reader_%drank_img_s" % ranks] = speed
    print("%-36s %10s  %s" % ("reader", "images/s", "detail"))
    for name, speed, detail in rows:
        print("%-36s %10.0f  %s" % (name, speed, detail))
    figures.update(num_images=found["num_images"], batch_size=args.batch_size, threads=args.threads,
                   epochs=args.epochs, content=args.content if not args.data_dir else args.data_dir,
                   cpus=os.cpu_count())
    print(json.dumps(figures))


def dataset_info(args, tmp):
    from recognition.data import record_reader
    if args.data_dir:
        return record_reader.open_record_set(args.data_dir)
    return make_data(tmp, args.images, args.content)


if __name__ == "__main__":
    sys.exit(cli.run(main, "benchmark_data.py"))
