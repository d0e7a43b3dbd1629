"""``build_reader``: the training-data reader a configuration names."""
from recognition.data import record_reader, synthetic_reader

IMAGE_SIZE = (112, 112)         # what the backbones (symbols/) take


def build_reader(cfg, rank, size):
    """The training data reader named by ``cfg.reader``: RecordIO files or synthetic images."""
    if cfg.reader == "synthetic":
        return synthetic_reader.SyntheticReader(cfg.batch_size, cfg.num_classes, steps_per_epoch=cfg.synthetic_steps,
                                                rank=rank, num_ranks=size, seed=cfg.seed)
    if not cfg.data_dir:
        raise ValueError("dataset %r needs its data folder: pass --data-dir DIR or set PFC_DATA_ROOT" % cfg.dataset)
    found = record_reader.open_record_set(cfg.data_dir, prefix=cfg.rec_prefix)
    if found["num_classes"] != cfg.num_classes:     # the config read the same property file when it was built
        raise ValueError("%s says %d classes, the config %d: the file changed since the run started"
                         % (found["property"], found["num_classes"], cfg.num_classes))
    if tuple(found["image_size"]) != IMAGE_SIZE:
        raise ValueError("%s says %dx%d images; the backbones here take %dx%d aligned faces (re-pack with "
                         "tools/pack_rec.py --image-size 112,112)" % ((found["property"],) + tuple(found["image_size"])
                                                                     + IMAGE_SIZE))
    return record_reader.RecordReader(found["rec"], cfg.batch_size, cfg.num_classes, rank=rank, num_ranks=size,
                                      seed=cfg.seed, preprocess_threads=cfg.preprocess_threads,
                                      max_damaged=cfg.max_damaged)
