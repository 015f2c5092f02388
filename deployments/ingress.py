"""The `Ingress` deployment: the HTTP entry point. It serves the Starlette app of serve.api.routes
through Ray Serve and runs the job dispatcher that drives the `Generator` deployment."""

from __future__ import annotations

import logging
import os

from ray import serve
from ray.serve.handle import DeploymentHandle

from serve.api.routes import create_app
from serve.jobs.generation_backend import GeneratorHandleBackend
from serve.jobs.service import JobService
from serve.runtime.replica import setup_replica_logging
from serve.stages import INGRESS

logger = logging.getLogger(__name__)


@serve.deployment(name=INGRESS.deployment)
@serve.ingress()
class Ingress:
    def __init__(self, generator: DeploymentHandle, app_args: dict, scaling: dict | None = None):
        setup_replica_logging()  # the dispatcher's and the API's lines go to this replica's log file
        # Serve starts this replica's own uvicorn after __init__; by default uvicorn takes
        # X-Forwarded-For from any 127.0.0.1 peer as the client. The app sees the real TCP peer and
        # believes X-Forwarded-For only from `trusted_proxies` (serve.api.throttle.client_address).
        os.environ["FORWARDED_ALLOW_IPS"] = ""
        # Configuration errors (e.g. no JWT secret in production mode) fail the deployment here.
        # `scaling` (serve.app.scaling_facts): the dispatch limit and each model's Transformer range
        self.service = JobService(app_args, GeneratorHandleBackend(generator), scaling=scaling)
        self.http_app = create_app(self.service)  # (not `app`: Serve's ASGI wrapper owns that name)

    def __serve_build_asgi_app__(self):
        # The app's lifespan (run by Serve on the replica) starts the dispatcher and stops it,
        # releasing running jobs back to the queue, when the replica shuts down.
        return self.http_app

    async def check_health(self) -> None:
        # The replica is unhealthy only if its dispatcher died; a down database or stage is
        # reported by /health (degraded), not by restarting the ingress.
        exc = self.service.dispatcher.failed()
        if exc is not None:
            raise RuntimeError(f"the job dispatcher stopped: {exc!r}")
