"""Per-stage time of a tiny job through the Serve handle (`GenerationResult.timings`), medians of 7.

    python -m loadtests.bench_stages
"""
import os
import statistics
import time


def main() -> None:
    import ray
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    from ray import serve
    ray.init(address="local", num_cpus=8, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "2"}})
    serve.start(http_options={"host": "127.0.0.1", "port": 0})
    from serve.app import build_app
    from client.handle import GeneratorClient
    args = {"name": "t", "with_ingress": False, "tts": {"providers": ["none"]},
            "deployments": {k: {"ray_actor_options": {"num_cpus": 0.1}} for k in ("text_encoder","transformer","vae","generator")}}
    serve.run(build_app(args), name="t", route_prefix=None)
    c = GeneratorClient("t")
    spec = {"prompt": "a red fox running through fresh snow, golden hour", "negative_prompt": "", "seed": 1234,
            "width": 64, "height": 64, "num_frames": 9, "num_inference_steps": 4}
    for _ in range(2): c.generate(spec)
    rows = {}
    for _ in range(7):
        t0 = time.time(); r = c.generate(spec); total = time.time() - t0
        for t in r.timings: rows.setdefault(t.stage, []).append(t.seconds * 1000)
        rows.setdefault("call total", []).append(total * 1000)
    print({k: round(statistics.median(v), 1) for k, v in rows.items()})


if __name__ == "__main__":
    main()
