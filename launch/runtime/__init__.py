"""The runtime floor: helpers every layer may use, importing nothing of the project.

  dist        the process group (the only caller of torch.distributed), fail-fast, per-rank reports
  partition   global sample indices -> ranks -> batches (the one even-split rule)
  rundir      a sampling run's folder: layout, manifest, lock, image and feature blocks, the resume plan
  preempt     stop signals: finish the batch in flight, exit 3
  files       hashing, atomic writes, downloads, cache folders
  images      ADM's centre crop (training data and reference batches both use it)
  errors      the exit codes and the base class of errors a user can fix
"""
