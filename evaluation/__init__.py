"""ADM-compatible evaluation: image batches, Inception features, FID/sFID/IS/precision/recall.

Entry points: `python -m evaluation.evaluator REF SAMPLE` and `python -m evaluation.reference IMAGE_DIR`.
"""
