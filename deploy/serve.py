"""Run the edge service under uvicorn: ``eagle serve``.

Order of events: the bind address is checked against the token rule (:func:`deploy.auth.check_bind`) BEFORE
anything heavy is loaded, so a misconfigured box fails in a second with one line; then the pipeline is built
(expert-only when ``EAGLE_MLLM__ENABLED=false``: the MLLM stack is never imported), the application is
created with warm-up (banks and MLLM load in the background while ``/healthz`` already answers and
``/readyz`` says 503), and uvicorn serves it.

SIGTERM / SIGINT (``docker stop``): uvicorn stops accepting connections and waits for the requests in flight
(up to ``EAGLE_SERVICE__SHUTDOWN_TIMEOUT_S``), the worker finishes every accepted inspection, running bank
builds finish, and the audit log is closed.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from deploy.auth import check_bind

if TYPE_CHECKING:
    from fastapi import FastAPI

    from eagle.pipeline import InspectionPipeline
    from eagle.settings import Settings

logger = logging.getLogger(__name__)


def build_app(settings: Settings, *, pipeline: InspectionPipeline | None = None, warm_up: bool = True) -> FastAPI:
    """The service's ASGI application for ``settings`` (a new :class:`eagle.pipeline.Pipeline` unless given).

    Raises:
        deploy.auth.InsecureBindError: the configured host is exposed without a token.
    """
    check_bind(settings.service.host, settings.service.token)
    from deploy.api import create_app

    if pipeline is None:
        from eagle.pipeline import Pipeline

        pipeline = Pipeline(settings)
    return create_app(pipeline, settings, warm_up=warm_up)


def serve(settings: Settings, *, pipeline: InspectionPipeline | None = None) -> None:
    """Serve until SIGTERM/SIGINT, then shut down gracefully (see the module docstring).

    Raises:
        deploy.auth.InsecureBindError: before anything is loaded, if the address is exposed without a token.
    """
    import uvicorn

    app = build_app(settings, pipeline=pipeline)
    service = settings.service
    mode = "expert+MLLM" if settings.mllm.enabled else "expert-only"
    logger.info("EAGLE edge service (%s) on http://%s:%d", mode, service.host, service.port)
    config = uvicorn.Config(
        app,
        host=service.host,
        port=service.port,
        log_level=settings.log_level.lower(),
        timeout_graceful_shutdown=int(service.shutdown_timeout_s),
        server_header=False,
        proxy_headers=False,
        log_config=None,  # keep the logging set up by the `eagle` command
    )
    uvicorn.Server(config).run()
