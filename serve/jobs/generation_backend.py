"""How the job service reaches the generation graph (its `GenerationBackend`): through the
`Generator` deployment's Serve handle (`stream=True` for progress). Cancelling the stream stops the
generation within a step, and so does this process dying: each call carries its Ray actor id
(`caller=`), which the Generator watches.

Not to be confused with `client.handle.GeneratorClient`, the public client other Ray drivers use."""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol

from serve.contracts import GenerationInputs, ProgressEvent, ResolvedSpec
from serve.runtime.replica import caller_id
from serve.stages import GENERATOR


class GenerationBackend(Protocol):
    def stream(self, spec: ResolvedSpec, job_id: str = "-",
               inputs: GenerationInputs | None = None) -> "GenerationStream": ...
    async def health(self) -> dict[str, dict[str, str]]: ...
    async def voices(self) -> list[dict]: ...
    async def voice_catalog(self) -> dict[str, list[str] | None] | None: ...
    async def model_info(self) -> dict[str, Any]: ...


class GenerationStream(Protocol):
    def __aiter__(self) -> AsyncIterator[ProgressEvent]: ...
    def cancel(self) -> None: ...


class GeneratorHandleBackend:
    """The `GenerationBackend` over a Serve `DeploymentHandle` to the Generator deployment."""

    def __init__(self, handle):
        self.handle = handle
        self.caller = caller_id()  # this replica's actor id (None in a driver)

    def stream(self, spec: ResolvedSpec, job_id: str = "-", inputs: GenerationInputs | None = None):
        return self.handle.options(stream=True).stream.remote(spec, job_id, caller=self.caller, inputs=inputs)

    async def health(self) -> dict[str, dict[str, str]]:
        return await self.handle.health.remote()

    async def voices(self) -> list[dict]:
        return await self.handle.voices.remote()

    async def model_info(self) -> dict[str, Any]:
        return await self.handle.model_info.remote()

    async def voice_catalog(self) -> dict[str, list[str] | None] | None:
        return await self.handle.voice_catalog.remote()

    @classmethod
    def for_app(cls, app_name: str) -> "GeneratorHandleBackend":
        """Reach a running app's Generator from outside it (e.g. the ingress app under bare uvicorn)."""
        from ray import serve

        return cls(serve.get_deployment_handle(GENERATOR.deployment, app_name=app_name))
