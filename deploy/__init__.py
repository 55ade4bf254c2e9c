"""Headless edge deployment: HTTP service, watched folder, audit log (see docs/edge.md).

One job per module:

* ``api``: the FastAPI application (:func:`deploy.api.create_app`); ``middleware``: request id, token, body
  limits, admission, metrics and last-resort errors; ``errors``: the error classes and JSON shape;
* ``auth``: bearer token and the bind rule; ``limits``: upload/pixel/bank-name checks; ``archive``: zip checks;
* ``worker``: the single inference worker and its bounded queue; ``jobs``: bank builds in the background;
* ``metrics``: Prometheus exposition (the audit log: :mod:`eagle.audit`; the annotated PNG: :mod:`eagle.annotate`);
* ``watch``: the watched folder; ``serve``: uvicorn; ``cli``: ``eagle serve|watch|audit``;
  ``healthcheck``: the container's probe.

Layers, data flow and where each rule lives: docs/architecture.md.
"""
