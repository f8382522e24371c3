"""Training: setup, the step loop, evaluation, checkpoints and the run's files.

The Python entry point is :func:`loraq.train` (``loraq/api/train.py``); this
package holds what it runs.
"""
