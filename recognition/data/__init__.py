"""Training data: the InsightFace RecordIO layout and the tools' I/O (``rec_format``), the readers' contract
(``reader``: ``BatchReader``, ``Batch``), the RecordIO reader (``record_reader``: ImageRecordIter, exact resume,
damaged records), the synthetic reader of benchmarks (``synthetic_reader``), FFC's identity loader and its index
(``id_loader``, ``identity_index``); ``build.build_reader`` picks the reader a config names."""
