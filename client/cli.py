"""`cinevivid generate` and `cinevivid videos list|get|rm`: the HTTP client on the command line.
The handlers here take the parsed arguments; their parsers are in `serve.ops.cli`.
Server and key from --server/--api-key, which default to $CINEVIVID_URL/$CINEVIVID_API_KEY.
Errors (the service unreachable, its error envelope, no key) propagate to `serve.ops.cli.main`,
which prints them as one line."""

from __future__ import annotations

import json
import sys
from itertools import islice

from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

from client.http import END_STATUSES, APIError, CineVividClient
from serve.contracts import COMPLETED, DELETED, IN_PROGRESS
from serve.errors import MissingCredentials

NO_KEY = ("no API key: pass --api-key cv-... or set CINEVIVID_API_KEY (`make run` prints the demo user's key; "
          "`cinevivid keys create NAME` makes one)")


def _client(args) -> CineVividClient:
    if not args.api_key:
        raise MissingCredentials(NO_KEY, param="api_key")
    return CineVividClient(args.server, args.api_key)


def progress_bar(quiet: bool = False) -> Progress:
    """The live progress of `generate` on stderr: stage (or job status), bar, percent, the last
    denoising step ("step 3/20") and the time so far. Disabled by `quiet`. Where stderr is no
    terminal, it writes its final state once."""
    return Progress(TextColumn("{task.description:<12}"), BarColumn(bar_width=30),
                    TextColumn("{task.percentage:>5.1f}%"), TextColumn("{task.fields[step]}"),
                    TimeElapsedColumn(), console=Console(stderr=True), disable=quiet)


def progress_fields(kind: str, data: dict) -> dict:
    """What one SSE event changes on the progress bar."""
    fields: dict = {"completed": float(data.get("progress") or 0)}
    if kind == "status":
        fields["description"] = str(data.get("status") or "")
    elif kind == "stage" and data.get("stage"):
        fields["description"] = str(data["stage"])
    elif kind == "step":
        fields["description"] = str(data.get("stage") or "transformer")
        fields["step"] = f"step {data.get('step')}/{data.get('total_steps')}"
    elif kind == "window":  # a long video: one more window is playable
        fields["step"] = (f"window {int(data.get('window') or 0) + 1}/{data.get('num_windows')}, "
                          f"{data.get('playable_s')} s playable")
    return fields


def cmd_generate(args) -> int:
    ext = {"seconds": args.seconds, "size": args.size, "seed": args.seed, "num_frames": args.frames,
           "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "fps": args.fps,
           "negative_prompt": args.negative_prompt, "model": args.model,
           "base_num_frames": args.base_num_frames, "overlap_history": args.overlap_history,
           "ar_step": args.ar_step, "causal_block_size": args.causal_block_size,
           "addnoise_condition": args.addnoise_condition}
    if args.voiceover:
        ext["voiceover"] = {"text": args.voiceover, "voice": args.voice, "provider": args.voice_provider}
        ext["voiceover"] = {k: v for k, v in ext["voiceover"].items() if v is not None}
    images = {"input_reference": args.image, "last_frame": args.last_frame}
    return _submit_and_wait(args, lambda cv: cv.create_video(
        args.prompt, **{k: v for k, v in images.items() if v is not None}, **ext))


def cmd_extend(args) -> int:
    ext = {"seed": args.seed, "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale,
           "negative_prompt": args.negative_prompt, "model": args.model}
    if args.voiceover:
        ext["voiceover"] = {k: v for k, v in {"text": args.voiceover, "voice": args.voice}.items() if v is not None}
    return _submit_and_wait(args, lambda cv: cv.extend_video(args.video_id, args.prompt, seconds=args.seconds, **ext))


def _submit_and_wait(args, submit) -> int:
    """Submit a video job (`submit(client)`), follow its progress, download it to `args.output`."""
    out = sys.stderr
    with _client(args) as cv:
        video = submit(cv)
        vid = video["id"]
        print(f"{vid}: {video['status']} ({video['size']}, {video['seconds']} s, seed {video.get('seed')})",
              file=out)
        final = None
        with progress_bar(args.quiet) as bar:
            task = bar.add_task(video["status"], total=100, step="")
            for kind, data in cv.events(vid, timeout=args.timeout):
                bar.update(task, **progress_fields(kind, data))
                if kind == "status" and data.get("status") in END_STATUSES:
                    final = data
        if final is None or final.get("status") != COMPLETED:
            video = cv.get_video(vid) if (final or {}).get("status") != DELETED else {"error": None}
            err = video.get("error") or {}
            print(f"error: {vid} did not complete: {err.get('code')}: {err.get('message')}", file=out)
            return 1
        path = cv.download(vid, args.output)
        print(f"saved {path} ({path.stat().st_size} bytes)", file=out)
        print(vid)
    return 0


def cmd_videos_list(args) -> int:
    with _client(args) as cv:
        rows = list(islice(cv.iter_videos(limit=min(args.limit, 100)), max(args.limit, 0)))
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for v in rows:
        print(f"{v['id']}  {v['status']:<11} {v['progress']:>3}%  {v['size']:>9}  {v['seconds']:>6}s  "
              f"{v['prompt'][:50]!r}")
    return 0


def cmd_videos_get(args) -> int:
    with _client(args) as cv:
        v = cv.get_video(args.video_id)
        print(json.dumps(v, indent=2))
        if args.output:
            if v["status"] != COMPLETED and not (args.variant == "preview" and v["status"] == IN_PROGRESS):
                print(f"error: {args.video_id} is {v['status']}", file=sys.stderr)
                return 1
            cv.download(args.video_id, args.output, variant=args.variant)
            print(f"saved {args.output}", file=sys.stderr)
    return 0


def cmd_videos_rm(args) -> int:
    code = 0
    with _client(args) as cv:
        for vid in args.video_ids:
            try:
                cv.delete_video(vid)
                print(f"deleted {vid}")
            except APIError as exc:  # the others are still tried
                print(f"error: {vid}: {exc.code}: {exc.message} (HTTP {exc.status})", file=sys.stderr)
                code = 1
    return code
