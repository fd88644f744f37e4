"""ADM-compatible evaluation: image batches, Inception features, FID/sFID/IS/precision/recall; EDM2's FD_DINOv2.

Entry points: `python -m evaluation.evaluator REF SAMPLE`, `python -m evaluation.reference IMAGES` and
`python -m evaluation.compare A.json B.json`.

One concern per module, in the order data flows:
  batches           .npz / PNG-folder batches (streamed), writers, packing
  inputs            every check that needs no network (files, stored statistics, metric needs)
  inception         the network and its weights (offline first)
  dinov2            DINOv2 ViT-L/14 (FD_DINOv2): official weights on timm, EDM2's preprocessing
  networks          the networks the chosen metrics need, as one extractor
  features          FeatureAccumulator: per-rank features of uint8 batches, combined over ranks
  statistics        FeatureStats and InceptionScoreSums: float64 running sums that reduce over ranks
  frechet, precision_recall, bootstrap     the metrics (and their bootstrap spread)
  reference_cache   reference statistics: stored, cached by content, or computed once
  report            evaluate() and report_metrics(reference, features)
  shards            a sampling run's image shards and feature blocks (keyed by global index), its resume plan
  run_metrics       the metrics of a sampling run computed in the sampling job (sample_ddp.py --ref)
  metrics           metric names (CLI choices, report keys, printed names)
  reference_batch   building an ADM reference batch from an image folder or an .npz of images
  protocol          what decides a number (reference, networks, counts, settings), recorded in every report
  cli, evaluator, reference, compare    the commands (argparse -> check -> call)
"""
