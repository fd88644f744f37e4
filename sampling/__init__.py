"""The sampling run as a library: what sample_ddp.py, launch.pipeline, launch.sweep and train.py's evaluation
compose, in one order (see sampling.run).

  config      SampleConfig (every option and default), the checks that need no file, the run's identity
  options     the sampler's flags (one parser for the three sampling commands) -> a checked SampleConfig
  network     the model and its codec, loaded once per process; the sampler on the checkpoint's schedule
  plan        the run folder opened, what it holds checked, what this rank still owes
  stream      batches of (indices, labels, uint8 images) for those indices
  consumers   PNGs or image shards, and the in-job features, from that stream
  finish      rank 0 at the end: grid.png, <run>.npz, <run>.metrics.json
  run         the pieces composed: one run folder, and the whole command
"""
