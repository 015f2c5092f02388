"""The `cinevivid` command line: the whole argparse tree, composed here. The commands' handlers
live with what they drive: `serve.ops.launcher` (up, down, env, logs, submit), `serve.ops.kuberay`
(kuberay), `serve.ops.admin` (users, keys), `serve.ops.models` (models), `serve.ops.config_doc`
(config), `client.cli` (generate, videos). They are imported when their command runs, so `--help`
loads neither Ray nor torch nor the database layer.

Any error a command meets (the service unreachable, an HTTP error envelope, no API key, no stack)
is one line on stderr, `error: ...`, and exit status 1; `--debug` shows the traceback instead.

    python -m serve.ops.cli --help          # or the `cinevivid` entry point
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable

from serve.config import DEFAULT_CONFIG, DEFAULT_DASHBOARD_PORT, DEFAULT_HOST, DEFAULT_HTTP_PORT, DEFAULT_URL
from serve.config import Settings
from serve.ops.cli_errors import one_line

GPUS_PER_WORKER = 8  # serve.ops.kuberay's default (a test checks they agree)
CONFIG_DOC_PATH = "docs/configuration.md"  # serve.ops.config_doc.DOC_PATH (a test checks they agree)


def lazy(target: str) -> Callable[[argparse.Namespace], int]:
    """The handler "module:function", imported when the command runs."""
    module, _, name = target.partition(":")

    def run(args: argparse.Namespace) -> int:
        return getattr(importlib.import_module(module), name)(args)

    run.__qualname__ = run.__name__ = name
    run.target = target
    return run


def _command(sub: argparse._SubParsersAction, name: str, summary: str,
             func: str | None = None, **kw) -> argparse.ArgumentParser:
    """A (sub)command whose one-line `summary` is both its line in the parent's --help and the
    description of its own; `func` ("module:function") handles it."""
    p = sub.add_parser(name, help=summary, description=summary, **kw)
    if func is not None:
        p.set_defaults(func=lazy(func))
        debug_arg(p, default=argparse.SUPPRESS)  # also after the command: `cinevivid videos list --debug`
    return p


def debug_arg(p: argparse.ArgumentParser, default=False) -> None:
    p.add_argument("--debug", action="store_true", default=default,
                   help="on an error, show the traceback instead of one line")


def _group(sub: argparse._SubParsersAction, name: str, summary: str) -> argparse._SubParsersAction:
    """A command with sub-commands of its own (`users add`, ...)."""
    return _command(sub, name, summary).add_subparsers(dest=f"{name}_command", required=True,
                                                       metavar="COMMAND")


def _server_args(p: argparse.ArgumentParser) -> None:
    """For the commands that talk to the HTTP API."""
    settings = Settings()
    p.add_argument("--server", default=settings.url or DEFAULT_URL, metavar="URL",
                   help=f"the service's URL (default: $CINEVIVID_URL, else {DEFAULT_URL})")
    p.add_argument("--api-key", default=settings.api_key, metavar="KEY",
                   help="an API key, cv-... (default: $CINEVIVID_API_KEY)")


def _database_args(p: argparse.ArgumentParser) -> None:
    """For the commands that work straight on the database."""
    p.add_argument("--database-url", default=None,
                   help="default: $CINEVIVID_DATABASE_URL, else the SQLite file in the data dir")
    p.add_argument("--data-dir", default=None, help="default: $CINEVIVID_DATA_DIR")


def dashboard_args(p: argparse.ArgumentParser) -> None:
    """The Ray dashboard of a cluster `up` (or `make run`) starts."""
    p.add_argument("--dashboard-host", default=DEFAULT_HOST, metavar="HOST",
                   help=f"bind the Ray dashboard to this address (default: {DEFAULT_HOST}, this machine only)")
    p.add_argument("--dashboard-port", type=int, default=None, metavar="PORT",
                   help=f"the Ray dashboard's port (default: {DEFAULT_DASHBOARD_PORT} if free, else a free one)")
    p.add_argument("--no-dashboard", action="store_true", help="start the Ray cluster without its dashboard")


def _add_launcher(sub: argparse._SubParsersAction) -> None:
    up = _command(sub, "up", "start Ray if needed, deploy the Serve config, wait for /health", "serve.ops.launcher:cmd_up")
    up.add_argument("--config", default=Settings().serve_config or DEFAULT_CONFIG,
                    help=f"the Serve config file (default: $CINEVIVID_SERVE_CONFIG, else {DEFAULT_CONFIG})")
    up.add_argument("--detach", action="store_true", help="return once healthy, leaving it running")
    up.add_argument("--num-cpus", type=int, default=None, help="CPUs for a Ray cluster started here")
    up.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for healthy (default: 600)")
    up.add_argument("--address", default=None, help="use this running Ray cluster instead of starting one")
    up.add_argument("--replace", action="store_true", help="allow removing other Serve apps of that cluster")
    up.add_argument("--port", type=int, default=None, metavar="PORT",
                    help=f"the HTTP port (default: http_options.port of the config, {DEFAULT_HTTP_PORT})")
    up.add_argument("--host", default=None, metavar="HOST",
                    help="bind the HTTP port to this address (default: http_options.host of the config, "
                         f"{DEFAULT_HOST}; 0.0.0.0 opens it to the network)")
    up.add_argument("--node-ip-address", default=None, metavar="IP",
                    help="make the Ray cluster started here reachable at IP so other nodes can join (its "
                         "ports then listen on every interface, guarded by the cluster token); default: "
                         f"{DEFAULT_HOST} only")
    dashboard_args(up)

    pl = _command(sub, "plan", "show a config's GPUs x replicas per deployment against a cluster, before deploying",
                  "serve.ops.plan:cmd_plan", epilog="Exit status 1 when the minimum replicas do not fit the given cluster.")
    pl.add_argument("config", nargs="?", default=Settings().serve_config or DEFAULT_CONFIG,
                    help=f"the Serve config file (default: $CINEVIVID_SERVE_CONFIG, else {DEFAULT_CONFIG})")
    pl.add_argument("--gpus", type=int, default=None, help="plan against a node with this many GPUs")
    pl.add_argument("--cpus", type=float, default=None, help="... and this many CPUs (with --gpus)")
    pl.add_argument("--address", default=None, help="plan against this running Ray cluster (e.g. auto)")

    down = _command(sub, "down", "stop Serve (and the Ray cluster `up` started)", "serve.ops.launcher:cmd_down")
    down.add_argument("--address", default=None,
                      help="the cluster to stop Serve on (default: the one `up` started)")

    _command(sub, "env", "print shell exports that point ray.init() and the ray CLI at the stack `up` started, "
             "and its paths", "serve.ops.stack_cmds:cmd_env",
             epilog='eval "$(cinevivid env)" sets RAY_ADDRESS, RAY_AUTH_MODE and RAY_AUTH_TOKEN_PATH; the comment '
                    "lines name the stack's session dir, logs, Prometheus service-discovery file and token.")
    logs = _command(sub, "logs", "print the log folder of the stack `up` started (Ray's and Serve's logs)",
                    "serve.ops.stack_cmds:cmd_logs", epilog="e.g. tail -f $(cinevivid logs --serve)/*.log")
    logs.add_argument("--serve", action="store_true", help="Serve's folder (controller, replicas, HAProxy)")
    logs.add_argument("--list", action="store_true", help="list the files instead")
    prom = _command(sub, "prometheus-config", "print a Prometheus config that scrapes the stack `up` started",
                    "serve.ops.stack_cmds:cmd_prometheus_config",
                    epilog="configs/prometheus/prometheus.yml with this stack's HTTP port and Ray service-discovery "
                           "file; e.g. cinevivid prometheus-config -o prometheus.yml")
    prom.add_argument("-o", "--output", default=None, help="write it here (default: stdout)")
    sub_ = _command(sub, "submit", "run a command as a Ray job on the stack `up` started (ray job submit, wired up)",
                    "serve.ops.stack_cmds:cmd_submit",
                    epilog="e.g. cinevivid submit -- python my_job.py: the cluster's address and token, the "
                           "folder uploaded as the job's working dir, this virtualenv's python for `python`.")
    sub_.add_argument("--working-dir", default=".", help="the folder Ray uploads as the job's (default: .)")
    sub_.add_argument("--no-wait", action="store_true", help="return once submitted (ray job logs ID follows it)")
    sub_.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- COMMAND ...", help="the job's command")


def _add_kuberay(sub: argparse._SubParsersAction) -> None:
    k = _command(sub, "kuberay", "write a KubeRay RayService manifest for a Serve config", "serve.ops.kuberay:cmd_kuberay",
                 epilog="The worker group is sized from the deployments' GPU fractions at their largest "
                        "replica counts, packed into --gpus-per-worker GPU pods. The manifests for the "
                        "presets are in configs/kuberay/.")
    k.add_argument("--config", required=True, help="the Serve config file, e.g. configs/<preset>.yaml")
    k.add_argument("-o", "--output", default=None, help="write the manifest here (default: stdout)")
    k.add_argument("--name", default=None, help="the RayService's name (default: cinevivid-<config file name>)")
    k.add_argument("--image", default=None,
                   help="the container image with CineVivid installed (default: cinevivid:<version>)")
    k.add_argument("--gpus-per-worker", type=int, default=GPUS_PER_WORKER,
                   help=f"GPUs per worker pod (default: {GPUS_PER_WORKER})")
    k.add_argument("--secret", default="cinevivid",
                   help="the Secret with jwt-secret, database-url, elevenlabs-api-key (default: cinevivid)")
    k.add_argument("--data-pvc", default="cinevivid-data",
                   help="the ReadWriteMany PersistentVolumeClaim for the data dir (default: cinevivid-data)")


def _add_admin(sub: argparse._SubParsersAction) -> None:
    users = _group(sub, "users", "manage users (against the database)")
    add = _command(users, "add", "add a user; the password is read from stdin or generated", "serve.ops.admin:cmd_users_add",
                   epilog="The password: generated with --generate, else read from stdin (a pipe, or "
                          "--password-stdin), else asked for; an empty one means: generate one (printed once).")
    add.add_argument("name", metavar="NAME", help="the user name")
    add.add_argument("--admin", action="store_true", help="give the admin role")
    add.add_argument("--password-stdin", action="store_true", help="read the password from stdin")
    add.add_argument("--generate", action="store_true", help="generate a password and print it")
    _database_args(add)
    ls = _command(users, "list", "list users", "serve.ops.admin:cmd_users_list")
    _database_args(ls)

    keys = _group(sub, "keys", "manage API keys (against the database)")
    create = _command(keys, "create", "create an API key for user NAME and print it (once)", "serve.ops.admin:cmd_keys_create")
    create.add_argument("name", metavar="NAME", help="the user")
    create.add_argument("--key-name", default="", help="a label for the key")
    _database_args(create)
    revoke = _command(keys, "revoke", "revoke an API key by id", "serve.ops.admin:cmd_keys_revoke")
    revoke.add_argument("key_id", metavar="KEY_ID", help="the key's id (`keys create` prints it on stderr)")
    _database_args(revoke)
    kl = _command(keys, "list", "list a user's API keys", "serve.ops.admin:cmd_keys_list")
    kl.add_argument("name", metavar="NAME", help="the user")
    _database_args(kl)


def _add_config(sub: argparse._SubParsersAction) -> None:
    c = _command(sub, "config", "print the app's configuration reference, generated from its pydantic models",
                 "serve.ops.config_doc:cmd_config",
                 epilog=f"Regenerate the manual's page with: cinevivid config --markdown > {CONFIG_DOC_PATH}")
    what = c.add_mutually_exclusive_group(required=True)
    what.add_argument("--schema", action="store_true",
                      help="the JSON schema of serve_config.yaml's `args:` (AppArgs.model_json_schema())")
    what.add_argument("--markdown", action="store_true",
                      help=f"every field with its type, default and bounds, as Markdown ({CONFIG_DOC_PATH})")


def _add_models(sub: argparse._SubParsersAction) -> None:
    ms = _group(sub, "models", "model utilities")
    tiny = _command(ms, "make-tiny", "write the tiny random-weight SkyReels-V2 pipelines: T2V to PATH, I2V to "
                    "PATH-i2v, DF to PATH-df", "serve.ops.models:cmd_make_tiny")
    tiny.add_argument("path", metavar="PATH", help="the diffusers folder of the T2V model")
    tiny.add_argument("--variant", choices=["all", "t2v", "i2v", "df"], default="all",
                      help="which to write (default: all three)")
    tiny.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: 0)")
    tiny.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    _command(ms, "cache", "models on disk (tiny model, Hugging Face cache)", "serve.ops.models:cmd_cache")


def _add_client(sub: argparse._SubParsersAction) -> None:
    g = _command(sub, "generate", "generate a video over HTTP with a live progress bar", "client.cli:cmd_generate")
    g.add_argument("prompt", help="what the video shows")
    g.add_argument("-o", "--output", default="out.mp4", help="where to save the MP4 (default: out.mp4)")
    g.add_argument("--seconds", type=float, default=None, help="length in seconds")
    g.add_argument("--frames", type=int, default=None, help="num_frames (4k+1)")
    g.add_argument("--size", default=None, help="WIDTHxHEIGHT")
    g.add_argument("--seed", type=int, default=None, help="random seed")
    g.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    g.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    g.add_argument("--fps", type=int, default=None, help="frames per second")
    g.add_argument("--negative-prompt", default=None, help="what the video should not show")
    g.add_argument("--model", default=None, help="the model to use (default: the service's)")
    # long video by diffusion forcing (each defaults to the model's; see docs/long-video.md)
    g.add_argument("--base-num-frames", type=int, default=None, help="long video: frames per window (4k+1)")
    g.add_argument("--overlap-history", type=int, default=None,
                   help="long video: frames each window carries over from the one before (4k+1)")
    g.add_argument("--ar-step", type=int, default=None, help="long video: 0 synchronous, >0 asynchronous (e.g. 5)")
    g.add_argument("--causal-block-size", type=int, default=None,
                   help="long video: latent frames per causal block (e.g. 5 with --ar-step 5)")
    g.add_argument("--addnoise-condition", type=float, default=None,
                   help="long video: noise on the carried frames (e.g. 20)")
    g.add_argument("--voiceover", default=None, help="text to speak over the video")
    g.add_argument("--voice", default=None, help="the voice-over's voice")
    g.add_argument("--voice-provider", default=None, choices=["elevenlabs", "piper", "none"],
                   help="the voice-over's TTS backend")
    g.add_argument("--image", default=None, metavar="PATH",
                   help="image-to-video: the first frame (PNG, JPEG or WebP), fitted to the video's size")
    g.add_argument("--last-frame", default=None, metavar="PATH",
                   help="image-to-video: an end frame too (with --image)")
    g.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _server_args(g)

    e = _command(sub, "extend", "extend one of your completed videos by a new segment, over HTTP",
                 "client.cli:cmd_extend")
    e.add_argument("video_id", metavar="VIDEO_ID", help="the video to extend (completed, yours)")
    e.add_argument("prompt", help="what the new segment shows")
    e.add_argument("--seconds", type=float, required=True, help="length of the new segment in seconds")
    e.add_argument("-o", "--output", default="out.mp4", help="where to save the MP4 (default: out.mp4)")
    e.add_argument("--seed", type=int, default=None, help="random seed")
    e.add_argument("--steps", type=int, default=None, help="num_inference_steps")
    e.add_argument("--guidance-scale", type=float, default=None, help="classifier-free guidance scale")
    e.add_argument("--negative-prompt", default=None, help="what the video should not show")
    e.add_argument("--model", default=None, help="a model that extends (default: the first that does)")
    e.add_argument("--voiceover", default=None, help="text to speak over the new segment")
    e.add_argument("--voice", default=None, help="the voice-over's voice")
    e.add_argument("--timeout", type=float, default=None, help="give up waiting after this many seconds")
    e.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _server_args(e)

    vs = _group(sub, "videos", "list, show or delete your videos")
    ls = _command(vs, "list", "list your videos, newest first", "client.cli:cmd_videos_list")
    ls.add_argument("--limit", type=int, default=20, help="at most this many (default: 20)")
    ls.add_argument("--json", action="store_true", help="print them as JSON")
    _server_args(ls)
    get = _command(vs, "get", "show a video as JSON, and optionally download it", "client.cli:cmd_videos_get")
    get.add_argument("video_id", metavar="VIDEO_ID", help="the video's id")
    get.add_argument("-o", "--output", default=None, help="also download the content here")
    get.add_argument("--variant", default="video", choices=["video", "thumbnail", "preview"],
                     help="what to download (default: video); preview: the playable part so far of a long "
                          "video still in progress")
    _server_args(get)
    rm = _command(vs, "rm", "delete videos", "client.cli:cmd_videos_rm")
    rm.add_argument("video_ids", nargs="+", metavar="VIDEO_ID", help="the videos' ids")
    _server_args(rm)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cinevivid", description="CineVivid text-to-video serving stack")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    debug_arg(parser)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_models(sub)
    _add_launcher(sub)
    _add_kuberay(sub)
    _add_admin(sub)
    _add_config(sub)
    _add_client(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # warnings and errors only (no alembic INFO lines on `users`/`keys`); -v for everything
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # no per-request log lines on the terminal
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - every error becomes one line; --debug shows where it came from
        if args.debug:
            raise
        print(f"error: {one_line(exc, args)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
