"""Python client for other Ray drivers and jobs: calls the Generator through a Serve handle.

    from client.handle import GeneratorClient

    client = GeneratorClient.connect()   # the stack `cinevivid up` runs: its cluster, token and app
    result = client.generate({"prompt": "a red fox in the snow", "seed": 7, "num_frames": 9})
    open("fox.mp4", "wb").write(result.mp4)
    for event in client.stream({"prompt": "a red fox"}):      # stage/step events, then the result
        print(event.type, event.stage, event.stage_status, event.step, event.progress)

A long (diffusion-forcing) video streams a "window" event as each window's frames are final:
`event.window` of `event.num_windows`, `event.playable_s`, `event.fragment` (fragmented-MP4 bytes:
append them to a file and it plays so far) and, with `"return_frames": True`, `event.frames` (uint8
(F, H, W, 3), that window's new frames):

    with open("long.preview.mp4", "wb") as preview:
        for event in client.stream({"prompt": "a long walk", "num_frames": 257, "base_num_frames": 97,
                                    "overlap_history": 17, "return_frames": True}):
            if event.type == "window":
                preview.write(event.fragment); preview.flush()
                print(f"window {event.window + 1}/{event.num_windows}: {event.frames.shape[0]} frames, "
                      f"{event.playable_s:.1f} s playable")

Image-to-video and extension take what they start from beside the spec: `image=` (and
`last_image=`) an RGB uint8 array (H, W, 3) or the bytes (or path) of a PNG/JPEG/WebP file, fitted
to the video's size; `video=` the MP4 to extend (bytes or path), its size and frame rate kept, the
result being that video followed by `num_frames - 1` new frames:

    result = client.generate({"prompt": "the cat wakes up", "model": "cinevivid-tiny-i2v"}, image="cat.png")
    longer = client.generate({"prompt": "and walks away", "num_frames": 33}, video=result.mp4)

`connect()` reads what `cinevivid up` recorded in CINEVIVID_CACHE_DIR (the cluster's address, its
auth token, the app's name) and calls `ray.init` with it; without a running stack it raises
serve.errors.StackNotRunning saying what to do. In a driver Ray already points at that cluster (a
job sent with `ray job submit` after `eval "$(cinevivid env)"`, or a script run after that eval),
`GeneratorClient("cinevivid")` alone works too.

Errors arrive as the typed exceptions of `serve.errors` (InvalidSpecError naming the field,
StageError naming the stage, GenerationCancelled, ...), not as raw Ray errors.
"""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator, Iterator

from ray import serve

from serve.contracts import GenerationInputs, GenerationResult, GenerationSpec, ProgressEvent
from serve.errors import CineVividError, GenerationCancelled, OverloadedError, unwrap_error
from serve.stages import GENERATOR


def _typed(exc: BaseException) -> BaseException:
    err = unwrap_error(exc)
    if isinstance(err, CineVividError):
        return err
    name = type(exc).__name__
    if "BackPressure" in name or "Overloaded" in name:
        return OverloadedError(f"the generation graph is at capacity: {exc}")
    if "Cancelled" in name:  # RequestCancelledError, TaskCancelledError
        return GenerationCancelled("the generation was cancelled")
    return exc


class GenerationStream:
    """The ProgressEvents of one generation, ending with the "result" event. `cancel()` stops the
    generation within one denoising step; iterating on after it ends with GenerationCancelled.
    Leaving the iteration early (break, close) cancels it too."""

    def __init__(self, response_generator):
        self._gen = response_generator
        self._cancelled = False

    def __iter__(self) -> Iterator[ProgressEvent]:
        return self

    def __next__(self) -> ProgressEvent:
        try:
            return next(self._gen)
        except StopIteration:
            if self._cancelled:
                raise GenerationCancelled("the generation was cancelled") from None
            raise
        except Exception as exc:  # noqa: BLE001
            raise _typed(exc) from None

    def cancel(self) -> None:
        self._cancelled = True
        self._gen.cancel()

    def close(self) -> None:
        self._gen.cancel()

    def __del__(self):
        try:
            self._gen.cancel()
        except Exception:  # noqa: BLE001
            pass


def _inputs(image=None, last_image=None, video=None) -> GenerationInputs | None:
    """What a job starts from, for the Generator (which checks and fits it)."""
    if image is None and last_image is None and video is None:
        return None

    def data(x):
        return Path(x).read_bytes() if isinstance(x, (str, Path)) else x
    return GenerationInputs(image=data(image), last_image=data(last_image), video_mp4=data(video))


def _spec_dict(spec: GenerationSpec | dict) -> dict:
    if isinstance(spec, GenerationSpec):
        return spec.model_dump(mode="json", exclude_none=True)
    return GenerationSpec.model_validate(spec).model_dump(mode="json", exclude_none=True)


class GeneratorClient:
    """Sync and async calls to the Generator of a running CineVivid application."""

    def __init__(self, app_name: str = "cinevivid", handle=None):
        self.handle = handle or serve.get_deployment_handle(GENERATOR.deployment, app_name=app_name)

    @classmethod
    def connect(cls, app_name: str | None = None, cache_dir: str | Path | None = None,
                log_to_driver: bool = False) -> "GeneratorClient":
        """Join the Ray cluster of the stack `cinevivid up` started (recorded in `cache_dir`,
        default CINEVIVID_CACHE_DIR) with its token, and call its app (default: the recorded one).
        Raises serve.errors.StackNotRunning, saying what to do, when there is no such stack.
        The replicas' log lines stay in their files unless `log_to_driver`."""
        from serve.runtime.cluster_record import connect

        state = connect(cache_dir, log_to_driver=log_to_driver)
        return cls(app_name or state.get("app_name") or "cinevivid")

    # sync ---------------------------------------------------------------------------------------
    def generate(self, spec: GenerationSpec | dict, timeout_s: float | None = None, **inputs) -> GenerationResult:
        """`inputs`: image=, last_image=, video= (see the module doc)."""
        try:
            return self.handle.generate.remote(_spec_dict(spec), inputs=_inputs(**inputs)).result(timeout_s=timeout_s)
        except Exception as exc:  # noqa: BLE001
            raise _typed(exc) from None

    def stream(self, spec: GenerationSpec | dict, **inputs) -> GenerationStream:
        return GenerationStream(self.handle.options(stream=True).stream.remote(_spec_dict(spec),
                                                                               inputs=_inputs(**inputs)))

    def check(self, spec: GenerationSpec | dict, **inputs) -> dict:
        try:
            return self.handle.check.remote(_spec_dict(spec), _inputs(**inputs)).result()
        except Exception as exc:  # noqa: BLE001
            raise _typed(exc) from None

    # async --------------------------------------------------------------------------------------
    async def agenerate(self, spec: GenerationSpec | dict, **inputs) -> GenerationResult:
        try:
            return await self.handle.generate.remote(_spec_dict(spec), inputs=_inputs(**inputs))
        except Exception as exc:  # noqa: BLE001
            raise _typed(exc) from None

    async def astream(self, spec: GenerationSpec | dict, **inputs) -> AsyncIterator[ProgressEvent]:
        gen = self.handle.options(stream=True).stream.remote(_spec_dict(spec), inputs=_inputs(**inputs))
        try:
            async for event in gen:
                yield event
        except Exception as exc:  # noqa: BLE001
            raise _typed(exc) from None
        finally:
            gen.cancel()


def generate(spec: GenerationSpec | dict, app_name: str = "cinevivid") -> GenerationResult:
    return GeneratorClient(app_name).generate(spec)


def stream(spec: GenerationSpec | dict, app_name: str = "cinevivid") -> Iterator[ProgressEvent]:
    return GeneratorClient(app_name).stream(spec)
