"""Time to the first batch when training resumes at 0 %, 50 % and 90 % of an epoch (``RecordReader.epoch(e, S)``),
on several ranks at once, against reaching the same step by reading the epoch from its start and dropping the
batches before S (what ``epoch()`` did before issue 15).

    OMP_NUM_THREADS=1 python tools/benchmark_resume.py [--data-dir DIR] [--images 20000] [--ranks 2] \\
        [--batch-size 64] [--threads 2] [--fractions 0 0.5 0.9] [--steps 20]

--data-dir: a folder with train_iter.rec/.idx and property; when it holds none, --images synthetic 112x112 face
JPEGs (tools/make_synthetic.py) are written there first and kept (default: a temporary folder). Each fraction
runs in fresh processes, one per rank, started together, as a restarted job would. Each process makes its reader
(open_s: it checks every record header of its part), times ``epoch(1, S)`` up to its first batch (first_s), then
the next --steps batches of that resumed pass (images/s), then reaches step S again from step 0 (skip_s) and
checks that both ways give the same batch S (images, labels, pad). The table shows the slowest rank of each
figure; one JSON line follows.
"""
import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def resume_worker(rec, num_classes, rank, num_ranks, batch_size, threads, fraction, steps, epoch=1):
    """Figures of one rank resuming at ``fraction`` of ``epoch``; returns a dict."""
    from recognition.data.record_reader import RecordReader
    began = time.perf_counter()
    reader = RecordReader(rec, batch_size, num_classes, rank=rank, num_ranks=num_ranks, preprocess_threads=threads)
    open_s = time.perf_counter() - began
    start_step = int(fraction * reader.steps_per_epoch)

    began = time.perf_counter()
    resumed = reader.epoch(epoch, start_step)
    first = next(resumed)
    first.data.wait_to_read()
    first_s = time.perf_counter() - began
    images, began = 0, time.perf_counter()
    for _, batch in zip(range(steps), resumed):
        batch.data.wait_to_read()
        images += batch_size - batch.pad
    rest_img_s = images / (time.perf_counter() - began)
    resumed.close()

    began = time.perf_counter()
    for step, batch in enumerate(reader.epoch(epoch)):
        batch.data.wait_to_read()
        if step == start_step:
            break
    skip_s = time.perf_counter() - began
    same = (np.array_equal(batch.data.asnumpy(), first.data.asnumpy()) and np.array_equal(batch.label, first.label)
            and batch.pad == first.pad)
    reader.close()
    return {"rank": rank, "start_step": start_step, "steps_per_epoch": reader.steps_per_epoch, "open_s": open_s,
            "first_s": first_s, "rest_img_s": rest_img_s, "skip_s": skip_s, "same_batch": bool(same)}


def run_fraction(args, found, fraction):
    """Run every rank of one resume at once; the per-rank dicts."""
    from tools.benchmark_data import run_workers
    return run_workers([[sys.executable, os.path.abspath(__file__), "--worker", found["rec"],
                         str(found["num_classes"]), str(rank), str(fraction), "--ranks", str(args.ranks),
                         "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--steps",
                         str(args.steps)] for rank in range(args.ranks)], "resume")


def find_or_make_data(data_dir, images):
    """open_record_set of ``data_dir``, after writing ``images`` synthetic faces there if it holds no set."""
    from recognition.data import record_reader
    if not os.path.isfile(os.path.join(data_dir, "train_iter.rec")):
        from tools.make_synthetic import make_dataset
        print("writing %d synthetic face images into %s" % (images, data_dir), flush=True)
        os.makedirs(data_dir, exist_ok=True)
        make_dataset(data_dir, identities=max(1, images // 16), images=16, holdout=0, progress=True)
    return record_reader.open_record_set(data_dir)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", help="a data folder (made there and kept when it holds no set)")
    p.add_argument("--images", type=int, default=20000, help="images to make when there is no set")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64, help="per rank")
    p.add_argument("--threads", type=int, default=2, help="preprocess_threads of each rank's reader")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.5, 0.9], help="where in the epoch to resume")
    p.add_argument("--steps", type=int, default=20, help="batches of the resumed pass timed after its first")
    p.add_argument("--worker", nargs=4, metavar=("REC", "CLASSES", "RANK", "FRACTION"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        rec, classes, rank, fraction = args.worker
        print(json.dumps(resume_worker(rec, int(classes), int(rank), args.ranks, args.batch_size, args.threads,
                                       float(fraction), args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix="bench-resume-") as tmp:
        found = find_or_make_data(args.data_dir or tmp, args.images)
        load_before, rows = os.getloadavg()[0], []
        for fraction in args.fractions:
            results = run_fraction(args, found, fraction)
            rows.append({"fraction": fraction, "start_step": [r["start_step"] for r in results],
                         "steps_per_epoch": results[0]["steps_per_epoch"],
                         "open_s": max(r["open_s"] for r in results), "first_s": max(r["first_s"] for r in results),
                         "rest_img_s": min(r["rest_img_s"] for r in results),
                         "skip_s": max(r["skip_s"] for r in results),
                         "same_batch": all(r["same_batch"] for r in results)})
            print("resumed at %3.0f %%: first batch after %.2f s" % (100 * fraction, rows[-1]["first_s"]), flush=True)
    print("%-9s %-12s %8s %10s %12s %10s %6s" % ("resume at", "step", "open s", "first s", "rest img/s", "skip s",
                                                  "same"))
    for row in rows:
        print("%7.0f %%  %-12s %8.2f %10.2f %12.0f %10.2f %6s" % (
            100 * row["fraction"], "%d / %d" % (max(row["start_step"]), row["steps_per_epoch"]), row["open_s"],
            row["first_s"], row["rest_img_s"], row["skip_s"], row["same_batch"]))
    print(json.dumps({"rows": rows, "num_images": found["num_images"], "ranks": args.ranks,
                      "batch_size": args.batch_size, "threads": args.threads, "cpus": os.cpu_count(),
                      "load_before": load_before, "load_after": os.getloadavg()[0]}))


if __name__ == "__main__":
    main()
