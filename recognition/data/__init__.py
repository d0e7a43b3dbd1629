"""Training data: the InsightFace RecordIO layout and the tools' I/O (``rec_format``), the RecordIO reader
(``record_reader``: ImageRecordIter, exact resume, damaged records) and the synthetic reader of benchmarks
(``synthetic_reader``). ``build_reader`` picks the reader a config names; it imports them lazily, so tools
that only touch the file layout stay light."""
import logging

log = logging.getLogger("recognition.data")


def build_reader(cfg, rank, size):
    """The training data reader named by ``cfg.reader``: RecordIO files or synthetic images."""
    from recognition.data import record_reader, synthetic_reader
    if cfg.reader == "synthetic":
        return synthetic_reader.SyntheticReader(cfg.batch_size, cfg.num_classes, steps_per_epoch=cfg.synthetic_steps,
                                                rank=rank, num_ranks=size, seed=cfg.seed)
    if not cfg.data_dir:
        raise ValueError("dataset %r needs its data folder: pass --data-dir DIR or set PFC_DATA_ROOT" % cfg.dataset)
    found = record_reader.open_record_set(cfg.data_dir, prefix=cfg.rec_prefix)
    if cfg.num_classes is not None and found["num_classes"] != cfg.num_classes:
        log.warning("%s: property says %d classes, the preset %d; using the file's", cfg.data_dir,
                    found["num_classes"], cfg.num_classes)
    cfg.num_classes = found["num_classes"]
    return record_reader.RecordReader(found["rec"], cfg.batch_size, cfg.num_classes, rank=rank, num_ranks=size,
                                      seed=cfg.seed, preprocess_threads=cfg.preprocess_threads)
