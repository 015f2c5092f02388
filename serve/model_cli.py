"""`cinevivid models ...`: build the embedded tiny model, show where models come from."""

from __future__ import annotations

import json


def _make_tiny(args) -> int:
    from serve.tiny_model import make_tiny_model

    path = make_tiny_model(args.path, seed=args.seed, overwrite=args.overwrite)
    print(path)
    return 0


def _cache(args) -> int:
    from serve.app import default_app_args
    from serve.model_cache import model_cache_stats

    print(json.dumps(model_cache_stats(default_app_args().model), indent=2))
    return 0


def register(subparsers) -> None:
    models = subparsers.add_parser("models", help="model utilities")
    msub = models.add_subparsers(dest="models_command", required=True)
    tiny = msub.add_parser("make-tiny", help="write the tiny random-weight SkyReels-V2 pipeline to PATH")
    tiny.add_argument("path")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--overwrite", action="store_true")
    tiny.set_defaults(func=_make_tiny)
    cache = msub.add_parser("cache", help="models on disk (tiny model, Hugging Face cache)")
    cache.set_defaults(func=_cache)
