"""The benchmarks' stack (loadtests/stack.py) is serve_config.yaml as `cinevivid up` deploys it: the
same app args except the deviations it prints, and no thread override of its own."""

from __future__ import annotations

import os
from pathlib import Path

from loadtests.stack import stack_config, set_threads
from serve.ops.deploy import load_serve_config, validate_serve_config
from serve.runtime.threads import default_torch_threads, node_cpus

ROOT = Path(__file__).resolve().parent.parent


def test_the_bench_stack_is_serve_config_with_printed_deviations_only(tmp_path):
    shipped = load_serve_config(ROOT / "serve_config.yaml")
    config, deviations = stack_config(tmp_path, 12345)
    (args,) = validate_serve_config(config).values()
    (want,) = validate_serve_config(shipped).values()
    # everything but the ingress settings (data dir, limits for one-key load generators) is as shipped
    assert args.model_dump(exclude={"ingress"}) == want.model_dump(exclude={"ingress"})
    assert config["applications"][0].get("deployments") == shipped["applications"][0].get("deployments")
    assert config["http_options"]["port"] == 12345
    assert [d.split(":")[0] for d in deviations] == ["http_options.port", "args.ingress"]
    # the stages' thread counts come from the config: unset, i.e. the default
    assert all(getattr(args.deployments, s).torch_threads is None for s in ("text_encoder", "transformer", "vae"))

    config, deviations = stack_config(tmp_path, 12345, threads=3, levers={"cfg_batch": True})
    (args,) = validate_serve_config(config).values()
    assert args.deployments.transformer.torch_threads == 3 and args.levers.cfg_batch
    assert any("torch_threads: 3" in d for d in deviations) and any("args.levers" in d for d in deviations)


def test_the_bench_process_sets_no_thread_count_for_the_replicas(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    import torch

    before = torch.get_num_threads()
    try:
        assert set_threads() == default_torch_threads("cpu") == node_cpus()
        assert "OMP_NUM_THREADS" not in os.environ  # Ray would hand it on to every replica
    finally:
        torch.set_num_threads(before)


def test_default_torch_threads_are_what_the_docs_say():
    assert default_torch_threads("cpu", replica_cpus=0.25, cores=16) == 16  # CPU: the node's cores
    assert default_torch_threads("cuda", replica_cpus=4, cores=16) == 4  # GPU: the replica's num_cpus
    assert default_torch_threads("cuda", replica_cpus=0.2, cores=16) == 1  # at least one


def test_torch_threads_is_refused_on_stages_without_torch():
    import pytest
    from pydantic import ValidationError

    from serve.config import AppArgs

    assert AppArgs.model_validate({"deployments": {"vae": {"torch_threads": 2}}}).deployments.vae.torch_threads == 2
    with pytest.raises(ValidationError, match="deployments.ingress.torch_threads"):
        AppArgs.model_validate({"deployments": {"ingress": {"torch_threads": 2}}})
