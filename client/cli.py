"""`cinevivid generate` and `cinevivid videos list|get|rm`: the HTTP client on the command line.
Server and key from --server/--api-key or $CINEVIVID_URL/$CINEVIVID_API_KEY."""

from __future__ import annotations

import json
import logging
import sys

from client.http import DEFAULT_URL, APIError, CineVividClient


def _client(args) -> CineVividClient:
    return CineVividClient(args.server, args.api_key)


def _bar(progress: float, label: str, width: int = 30) -> str:
    filled = int(width * progress / 100)
    return f"\r[{'#' * filled}{'.' * (width - filled)}] {progress:5.1f}% {label:<28}"


def _cmd_generate(args) -> int:
    ext = {"seconds": args.seconds, "size": args.size, "seed": args.seed, "num_frames": args.frames,
           "num_inference_steps": args.steps, "guidance_scale": args.guidance_scale, "fps": args.fps,
           "negative_prompt": args.negative_prompt, "model": args.model}
    if args.voiceover:
        ext["voiceover"] = {"text": args.voiceover, "voice": args.voice, "provider": args.voice_provider}
        ext["voiceover"] = {k: v for k, v in ext["voiceover"].items() if v is not None}
    out = sys.stderr
    try:
        with _client(args) as cv:
            video = cv.create_video(args.prompt, **ext)
            vid = video["id"]
            print(f"{vid}: {video['status']} ({video['size']}, {video['seconds']} s, seed {video.get('seed')})",
                  file=out)
            final = None
            for kind, data in cv.events(vid, timeout=args.timeout):
                label = data.get("status") if kind == "status" else (
                    f"step {data.get('step')}/{data.get('total_steps')}" if kind == "step" else data.get("stage") or "")
                if not args.quiet:
                    out.write(_bar(float(data.get("progress", 0)), str(label)))
                    out.flush()
                if kind == "status" and data.get("status") in ("completed", "failed", "deleted"):
                    final = data
            if not args.quiet:
                out.write("\n")
            if final is None or final.get("status") != "completed":
                video = cv.get_video(vid) if (final or {}).get("status") != "deleted" else {"error": None}
                err = video.get("error") or {}
                print(f"error: {vid} did not complete: {err.get('code')}: {err.get('message')}", file=out)
                return 1
            path = cv.download(vid, args.output)
            print(f"saved {path} ({path.stat().st_size} bytes)", file=out)
            print(vid)
    except APIError as exc:
        print(f"error: {exc}", file=out)
        return 1
    return 0


def _cmd_list(args) -> int:
    try:
        with _client(args) as cv:
            rows = list(cv.iter_videos(limit=min(args.limit, 100)))[: args.limit]
    except APIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for v in rows:
        print(f"{v['id']}  {v['status']:<11} {v['progress']:>3}%  {v['size']:>9}  {v['seconds']:>6}s  "
              f"{v['prompt'][:50]!r}")
    return 0


def _cmd_get(args) -> int:
    try:
        with _client(args) as cv:
            v = cv.get_video(args.video_id)
            print(json.dumps(v, indent=2))
            if args.output:
                if v["status"] != "completed":
                    print(f"error: {args.video_id} is {v['status']}", file=sys.stderr)
                    return 1
                cv.download(args.video_id, args.output, variant=args.variant)
                print(f"saved {args.output}", file=sys.stderr)
    except APIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _cmd_rm(args) -> int:
    code = 0
    with _client(args) as cv:
        for vid in args.video_ids:
            try:
                cv.delete_video(vid)
                print(f"deleted {vid}")
            except APIError as exc:
                print(f"error: {vid}: {exc}", file=sys.stderr)
                code = 1
    return code


def _conn_args(p) -> None:
    p.add_argument("--server", default=None, help=f"default: $CINEVIVID_URL or {DEFAULT_URL}")
    p.add_argument("--api-key", default=None, help="default: $CINEVIVID_API_KEY")


def register(subparsers) -> None:
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request log lines on the terminal
    g = subparsers.add_parser("generate", help="generate a video over HTTP with a live progress bar")
    g.add_argument("prompt")
    g.add_argument("-o", "--output", default="out.mp4")
    g.add_argument("--seconds", type=float, default=None)
    g.add_argument("--frames", type=int, default=None, help="num_frames (4k+1)")
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    g.add_argument("--guidance-scale", type=float, default=None)
    g.add_argument("--fps", type=int, default=None)
    g.add_argument("--negative-prompt", default=None)
    g.add_argument("--model", default=None)
    g.add_argument("--voiceover", default=None, help="text to speak over the video")
    g.add_argument("--voice", default=None)
    g.add_argument("--voice-provider", default=None, choices=["elevenlabs", "piper", "none"])
    g.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _conn_args(g)
    g.set_defaults(func=_cmd_generate)

    v = subparsers.add_parser("videos", help="list, show or delete your videos")
    vs = v.add_subparsers(dest="videos_command", required=True)
    ls = vs.add_parser("list")
    ls.add_argument("--limit", type=int, default=20)
    ls.add_argument("--json", action="store_true")
    _conn_args(ls)
    ls.set_defaults(func=_cmd_list)
    get = vs.add_parser("get")
    get.add_argument("video_id")
    get.add_argument("-o", "--output", default=None, help="also download the content here")
    get.add_argument("--variant", default="video", choices=["video", "thumbnail"])
    _conn_args(get)
    get.set_defaults(func=_cmd_get)
    rm = vs.add_parser("rm")
    rm.add_argument("video_ids", nargs="+")
    _conn_args(rm)
    rm.set_defaults(func=_cmd_rm)
