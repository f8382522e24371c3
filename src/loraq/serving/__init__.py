"""``loraq serve``: one base, many adapters, an OpenAI-compatible HTTP server that batches requests for different
adapters together.

* :mod:`~loraq.serving.protocol`: OpenAI's request fields -> a checked job; errors in OpenAI's shape.
* :mod:`~loraq.serving.responses`: results and stream chunks in OpenAI's shape.
* :mod:`~loraq.serving.adapters`: adapters registered (checked against the base) and installed (an LRU).
* :mod:`~loraq.serving.scheduler`: the decode thread -- continuous batching on
  :class:`loraq.generation.engine.DecodeBatch`, rows routed to their adapters.
* :mod:`~loraq.serving.metrics`: Prometheus counters.
* :mod:`~loraq.serving.app`: the FastAPI routes; :mod:`~loraq.serving.server`: the socket, uvicorn, lifecycle.
"""
