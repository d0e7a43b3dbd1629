"""Images/s of FFC's id loader (recognition/data/id_loader.py) against RecordReader on one images-only set, and
records/s of the two ways to read a record by key (mx.recordio.MXIndexedRecordIO, rec_format.RecordFile).

    python tools/make_synthetic.py /tmp/x --identities 300 --images 20       # the demo-sized set
    OMP_NUM_THREADS=1 python tools/benchmark_id_loader.py /tmp/x [--batch-size 64] [--images 12000] [--rounds 3]

    python tools/benchmark_id_loader.py --index-scale 17091657 --identities 360232    # Glint360K's counts

One process, one rank. Every reader setting (id loader / RecordReader, 1 and 2 decoding threads) is timed in
each of --rounds rounds, the settings interleaved so the machine's load hits them alike; the table gives each
setting's best round. A timed run reads at least --images images (whole passes / epochs, the reader made
beforehand and not timed) and counts both of the id loader's images per identity. Prints a table and one JSON line.

--index-scale N: the identity index at scale instead. Writes N records of 56 bytes (RecordIO framing, the
images-only header and labels, an 8-byte payload: no image) of --identities classes in a random order into a
temporary folder (in a child process), then times reading the .idx, building the index from the record headers,
writing it, reading it back, making an IdentityLoader from the file (offsets of every key) and, for comparison,
opening the file with mx.recordio.MXIndexedRecordIO (a Python dict of every key); wall and CPU seconds (the CPU
figure is the one to trust on a loaded machine) and the peak memory (max RSS) after each stage.
"""
import argparse
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from utils import cli  # noqa: E402


def time_id_loader(rec, image_size, batch_size, threads, images):
    from recognition.data.id_loader import IdentityLoader
    with IdentityLoader(rec, batch_size, image_size=image_size, decode_threads=threads, progress=False) as loader:
        done, pass_index, start = 0, 0, time.perf_counter()
        while done < images:
            for batch in loader.batches(pass_index):
                batch.a.wait_to_read()
                done += 2 * batch.a.shape[0]
            pass_index += 1
        return done, time.perf_counter() - start


def time_record_reader(rec, num_classes, image_size, batch_size, threads, images):
    from recognition.data.record_reader import RecordReader
    reader = RecordReader(rec, batch_size, num_classes, image_size=image_size, preprocess_threads=threads)
    done, epoch, start = 0, 0, time.perf_counter()
    while done < images:
        for batch in reader.epoch(epoch):
            batch.data.wait_to_read()
            done += batch.data.shape[0] - batch.pad
        epoch += 1
    seconds = time.perf_counter() - start
    reader.close()
    return done, seconds


def time_reads(rec, count, seed=0):
    """Records/s of reading ``count`` records in a random key order: MXIndexedRecordIO.read_idx against
    RecordFile.read at the offset; also the seconds MXIndexedRecordIO takes to open (it parses the .idx)."""
    import mxnet as mx
    from recognition.data import rec_format
    keys, offsets = rec_format.read_index(rec_format.index_path(rec))
    pick = np.random.default_rng(seed).integers(0, len(keys), count)
    start = time.perf_counter()
    reader = mx.recordio.MXIndexedRecordIO(rec_format.index_path(rec), rec, "r")
    open_s = time.perf_counter() - start
    start = time.perf_counter()
    for i in pick:
        reader.read_idx(int(keys[i]))
    mx_s = time.perf_counter() - start
    reader.close()
    with rec_format.RecordFile(rec) as f:
        start = time.perf_counter()
        for i in pick:
            f.read(offsets[i])
        ours_s = time.perf_counter() - start
    return {"mx_indexed_rec_s": count / mx_s, "record_file_rec_s": count / ours_s, "mx_open_s": open_s}


def write_header_only_set(folder, num_records, num_identities, seed=0):
    """An images-only .rec/.idx of ``num_records`` payload-less-image records (8 zero bytes each), built with
    NumPy in one pass; returns the .rec path."""
    from recognition.data import rec_format
    record = np.dtype([("magic", "<u4"), ("lrec", "<u4"), ("flag", "<u4"), ("label", "<f4"), ("id", "<u8"),
                       ("id2", "<u8"), ("labels", "<f4", 4), ("payload", "u1", 8)])
    classes = np.random.default_rng(seed).integers(0, num_identities, num_records)
    keys = np.arange(num_records, dtype=np.int64)
    data = np.zeros(num_records, record)
    data["magic"], data["lrec"] = rec_format.MAGIC, record.itemsize - 8
    data["flag"], data["id"] = rec_format.ITER_LABEL_WIDTH, keys
    data["labels"] = np.stack([classes % rec_format.LABEL_SPLIT, classes // rec_format.LABEL_SPLIT,
                               keys % rec_format.LABEL_SPLIT, keys // rec_format.LABEL_SPLIT], 1)
    rec = os.path.join(folder, "train_iter.rec")
    data.tofile(rec)
    with open(rec_format.index_path(rec), "w") as f:
        for lo in range(0, num_records, 1 << 20):
            f.write("".join("%d\t%d\n" % (k, k * record.itemsize) for k in range(lo, min(lo + (1 << 20), num_records))))
    return rec


def index_scale(num_records, num_identities, tmp_dir=None):
    """Wall and CPU seconds of each stage of the identity index on a ``num_records``-record file, and the peak
    memory (max RSS, MB) after each; the file is made in a child process, so it weighs on no figure here."""
    import multiprocessing
    import resource
    import tempfile
    import mxnet as mx
    from recognition.data import identity_index, rec_format
    from recognition.data.id_loader import IdentityLoader
    figures = {"records": num_records, "identities": num_identities}
    with tempfile.TemporaryDirectory(prefix="bench-index-", dir=tmp_dir) as folder:
        child = multiprocessing.get_context("fork").Process(target=write_header_only_set,
                                                            args=(folder, num_records, num_identities))
        child.start()
        child.join()
        if child.exitcode:
            raise RuntimeError("making the test file failed (exit code %d)" % child.exitcode)
        rec = os.path.join(folder, "train_iter.rec")
        idx = rec_format.index_path(rec)
        stages = [("read_idx", lambda: rec_format.read_index(idx)),
                  ("build", lambda: identity_index.scan(rec, progress=False)),
                  ("build_and_write", lambda: identity_index.load(rec, progress=False)),
                  ("read_fresh", lambda: identity_index.load(rec, progress=False)),
                  ("loader_open", lambda: IdentityLoader(rec, 128, num_ranks=8, progress=False).close()),
                  ("mx_indexed_open", lambda: mx.recordio.MXIndexedRecordIO(idx, rec, "r").close())]
        for name, stage in stages:
            wall, cpu = time.perf_counter(), time.process_time()
            result = stage()
            figures[name] = {"wall_s": round(time.perf_counter() - wall, 2),
                             "cpu_s": round(time.process_time() - cpu, 2),
                             "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)}
            if name == "build":
                figures["indexed"], figures["left_out"] = len(result.keys), result.left_out
        figures["index_file_mb"] = round(os.path.getsize(identity_index.index_file(rec)) / 2 ** 20, 1)
    return figures


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("data_dir", nargs="?", help="folder with train_iter.rec/.idx and property (make_synthetic.py)")
    p.add_argument("--batch-size", type=int, default=64, help="identities (id loader) / images (RecordReader)")
    p.add_argument("--images", type=int, default=12000, help="images a timed run reads at least")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--index-scale", type=int, metavar="N", help="time the identity index on N records instead")
    p.add_argument("--identities", type=int, default=360232, help="classes of --index-scale's records")
    p.add_argument("--tmp-dir", help="where --index-scale writes its file (default: the system's)")
    args = p.parse_args(argv)
    if args.data_dir and not os.path.isdir(args.data_dir):
        p.error("data folder %s is not a folder" % args.data_dir)
    if args.index_scale:
        print(json.dumps(index_scale(args.index_scale, args.identities, args.tmp_dir)))
        return
    if not args.data_dir:
        p.error("give DATA_DIR, or --index-scale N")
    from tqdm import tqdm
    from recognition.data import identity_index
    from recognition.data.record_reader import open_record_set
    found = open_record_set(args.data_dir)
    rec, size = found["rec"], found["image_size"]
    identity_index.load(rec)                         # build the index first if absent: not part of the timing
    settings = [("id loader", 1), ("id loader", 2), ("RecordReader", 1), ("RecordReader", 2)]
    best = {}
    with tqdm(total=args.rounds * len(settings), desc="benchmark", unit="run") as bar:
        for _ in range(args.rounds):
            for name, threads in settings:
                if name == "id loader":
                    n, seconds = time_id_loader(rec, size, args.batch_size, threads, args.images)
                else:
                    n, seconds = time_record_reader(rec, found["num_classes"], size, args.batch_size, threads,
                                                    args.images)
                best[name, threads] = max(best.get((name, threads), 0.0), n / seconds)
                bar.update()
    reads = time_reads(rec, min(20000, 4 * found["num_images"]))
    print("%-34s %10s" % ("reader (1 rank, batch %d)" % args.batch_size, "images/s"))
    for (name, threads), speed in best.items():
        print("%-34s %10.0f" % ("%s, %d thread(s)" % (name, threads), speed))
    print("read by key, random order: MXIndexedRecordIO %.0f records/s (open %.2f s), RecordFile %.0f records/s"
          % (reads["mx_indexed_rec_s"], reads["mx_open_s"], reads["record_file_rec_s"]))
    figures = {"%s_%dthreads_img_s" % (name.replace(" ", "_"), threads): round(speed, 1)
               for (name, threads), speed in best.items()}
    figures.update(reads, num_images=found["num_images"], batch_size=args.batch_size, rounds=args.rounds,
                   load_avg_1min=os.getloadavg()[0], cpus=os.cpu_count())
    print(json.dumps(figures))


if __name__ == "__main__":
    sys.exit(cli.run(main, "benchmark_id_loader.py"))
