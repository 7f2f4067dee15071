"""Hyperparameter sweeps of any training job with Ray Tune (the ``sweep`` job): the config and search space
(:mod:`.config`, :mod:`.space`), the sweep checked before any trial (:mod:`.prepare`), the driver
(:mod:`.run`), the callback through which a trial's run reports to Tune (:mod:`.tune_callback`), and the
results table, best spec and plots (:mod:`.outputs`). It drives the jobs through :mod:`visuray.jobspec`."""
