"""Memory before a run: the predicted peak of a training run, without loading a weight.

* :mod:`~loraq.planning.shapes`: the model's shape from config.json (a meta-device skeleton) and its files' headers;
* :mod:`~loraq.planning.rows`: the batches the data makes (the longest padded batch, exact-match prompts);
* :mod:`~loraq.planning.estimate` and :mod:`~loraq.planning.activations`: the terms of the peak;
* :mod:`~loraq.planning.fit`: the memory available here and the largest batch / sequence length that fit;
* :mod:`~loraq.planning.plan`: all of it for a TrainConfig (``loraq plan``, :func:`loraq.plan`);
* :mod:`~loraq.planning.preflight`: ``--batch-size auto`` and the check that stops a run that cannot fit
  before it loads anything.
"""
