"""Document formats: PAGE and ALTO read (:mod:`.read`, ground truth for training, evaluation and
benchmarks); ALTO, PAGE, hOCR and plain text written (:mod:`.export`, beside the Parquet)."""
