"""The handle client from another Ray driver process, as a Ray job would use it."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import GRAPH_APP
from media_probe import probe_mp4

ROOT = Path(__file__).resolve().parent.parent


def test_generate_and_stream_from_a_separate_driver(graph_app, ray_cluster, tmp_path):
    out = tmp_path / "from_driver.mp4"
    script = textwrap.dedent(f"""
        import ray
        from client.handle import GeneratorClient
        from serve.errors import InvalidSpecError
        ray.init(address={ray_cluster['address']!r}, log_to_driver=False)
        client = GeneratorClient({GRAPH_APP!r})
        result = client.generate({{"prompt": "from another driver", "seed": 4, "num_inference_steps": 2}})
        open({str(out)!r}, "wb").write(result.mp4)
        steps = [e.step for e in client.stream({{"prompt": "streamed", "num_inference_steps": 3}}) if e.type == "step"]
        print("STEPS", steps)
        try:
            client.generate({{"prompt": "bad", "num_frames": 6}})
        except InvalidSpecError as exc:
            print("ERROR", exc.param, exc.code)
    """)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "STEPS [1, 2, 3]" in proc.stdout
    assert "ERROR num_frames invalid_request" in proc.stdout
    info = probe_mp4(out.read_bytes())
    assert info["video"][0]["frames"] == 9
