"""ADM-compatible evaluation: image batches, Inception features, FID/sFID/IS/precision/recall.

Entry points: `python -m evaluation.evaluator REF SAMPLE` and `python -m evaluation.reference IMAGE_DIR`.

One concern per module, in the order data flows:
  batches           .npz / PNG-folder batches (streamed), writers, packing
  inputs            every check that needs no network (files, stored statistics, metric needs)
  inception         the network and its weights (offline first)
  features          FeatureAccumulator: per-rank features of uint8 batches, combined over ranks
  statistics        FeatureStats and InceptionScoreSums: float64 running sums that reduce over ranks
  frechet, precision_recall, bootstrap     the metrics (and their bootstrap spread)
  reference_cache   reference statistics: stored, cached by content, or computed once
  report            evaluate() and report_metrics(reference, features)
  shards            a sampling run's image shards and feature blocks (keyed by global index), its resume plan
  run_metrics       the metrics of a sampling run computed in the sampling job (sample_ddp.py --ref)
  metrics           metric names (CLI choices, report keys, printed names)
  reference_batch   building an ADM reference batch from an image folder
  cli, evaluator, reference    the commands (argparse -> check -> call)
"""
