"""The runtime's guards, without a cluster: stage-call deadlines (serve/runtime/deadlines.py) and the
worker-process setup hook that keeps Serve replicas' gRPC servers on loopback
(serve/runtime/loopback_grpc.py), including its loud failure when a Ray upgrade moves the code it
patches. The end-to-end checks are in tests/test_chaos.py (a SIGSTOP'd replica) and the socket scans
of tests/test_session_cluster.py and tests/test_ops_dashboard.py (no listener beyond loopback)."""

from __future__ import annotations

import time
import types

import pytest

from serve.config import AppArgs, LivenessConfig
from serve.runtime import loopback_grpc
from serve.runtime.deadlines import Deadline, OverdueCalls, stage_deadline_s
from serve.stages import GENERATOR, TEXT_ENCODER, TRANSFORMER, VAE

pytestmark = pytest.mark.fast


def test_a_stage_deadline_is_the_steps_times_the_per_step_bound_with_a_floor():
    assert stage_deadline_s(50, per_step_s=60.0, floor_s=300.0) == 3000.0
    assert stage_deadline_s(2, per_step_s=60.0, floor_s=300.0) == 300.0
    assert stage_deadline_s(0, per_step_s=60.0, floor_s=300.0) == 300.0  # a call whose cost has no steps
    cfg = LivenessConfig()
    assert (cfg.stage_deadline_per_step_s, cfg.stage_deadline_floor_s) == (60.0, 300.0)
    with pytest.raises(ValueError):
        LivenessConfig(stage_deadline_floor_s=0)


def test_check_health_fails_while_a_call_is_overdue_and_recovers_when_it_ends():
    calls = OverdueCalls()
    slow = calls.start("denoise of job a", 0.05)
    fine = calls.start("denoise of job b", 60.0)
    calls.check()  # nothing overdue yet
    time.sleep(0.1)
    with pytest.raises(RuntimeError, match=r"1 call\(s\) past their deadline: denoise of job a"):
        calls.check()
    calls.restart(slow)  # e.g. the batch started: the denoising's own deadline
    calls.check()
    calls.extend_to(slow, 0.01)  # never shortens
    calls.check()
    calls.end(slow)
    calls.end(fine)
    calls.end(None)
    calls.check()
    assert len(calls) == 0


def test_a_callers_deadline_restarts_and_extends():
    d = Deadline(0.05)
    time.sleep(0.06)
    assert d.remaining() < 0
    d.restart()
    assert 0 < d.remaining() <= 0.05
    d.extend_to(10.0)
    assert d.remaining() > 9


# ---- loopback gRPC -------------------------------------------------------------------------------
def test_the_installed_ray_binds_replica_grpc_the_way_the_hook_patches():
    import ray.serve._private.replica as replica

    loopback_grpc.check_replica_code(replica)  # raises if a Ray upgrade moved it


def _fake_replica_module(source: str, binder=None) -> types.ModuleType:
    module = types.ModuleType("fake_replica")
    module.add_port_to_grpc_server = binder or (lambda server, address: (server, address))
    module.__source__ = source
    return module


@pytest.fixture
def fake_source(monkeypatch):
    """inspect.getsource of a fake module answers its `__source__`."""
    real = loopback_grpc.inspect.getsource
    monkeypatch.setattr(loopback_grpc.inspect, "getsource",
                        lambda obj: obj.__source__ if hasattr(obj, "__source__") else real(obj))


def test_the_hook_rewrites_the_any_address_to_loopback(fake_source):
    module = _fake_replica_module('x = add_port_to_grpc_server(self._server, "[::]:0")')
    assert loopback_grpc.patch_replica_module(module)
    assert module.add_port_to_grpc_server("srv", "[::]:0") == ("srv", "127.0.0.1:0")
    assert module.add_port_to_grpc_server("srv", "10.0.0.5:7000") == ("srv", "10.0.0.5:7000")
    patched = module.add_port_to_grpc_server
    loopback_grpc.patch_replica_module(module)  # idempotent: not wrapped twice
    assert module.add_port_to_grpc_server is patched


@pytest.mark.parametrize("source", [
    'x = add_port_to_grpc_server(self._server, "0.0.0.0:0")',  # a new address
    'x = self._server.add_insecure_port("[::]:0")',  # bound another way
    "",
])
def test_the_hook_fails_loudly_when_a_ray_upgrade_moves_the_code(fake_source, source):
    module = _fake_replica_module(source)
    with pytest.raises(loopback_grpc.RayReplicaCodeMoved, match="cannot keep them on loopback"):
        loopback_grpc.patch_replica_module(module)
    del module.add_port_to_grpc_server  # the name itself gone
    module.__source__ = 'add_port_to_grpc_server(self._server, "[::]:0")'
    with pytest.raises(loopback_grpc.RayReplicaCodeMoved):
        loopback_grpc.check_replica_code(module)


def test_the_hook_changes_nothing_on_a_node_that_is_not_loopback(monkeypatch):
    import ray.serve._private.replica as replica

    original = replica.add_port_to_grpc_server
    monkeypatch.setattr(loopback_grpc, "_node_ip", lambda: "10.1.2.3")
    loopback_grpc.bind_loopback()
    assert replica.add_port_to_grpc_server is original
    monkeypatch.setattr(loopback_grpc, "_node_ip", lambda: "127.0.0.1")
    try:
        loopback_grpc.bind_loopback()
        assert replica.add_port_to_grpc_server is not original
    finally:
        monkeypatch.setattr(replica, "add_port_to_grpc_server", original)


def test_every_deployment_gets_the_hook_and_a_configured_one_wins():
    from serve.app import build_app

    app = build_app(AppArgs(with_ingress=False))
    seen = {}

    def walk(node):
        d = node._bound_deployment
        seen[d.name] = (d.ray_actor_options or {}).get("runtime_env", {})
        for arg in [*node._bound_deployment.init_args, *node._bound_deployment.init_kwargs.values()]:
            for child in (arg.values() if isinstance(arg, dict) else [arg]):
                if hasattr(child, "_bound_deployment"):
                    walk(child)
    walk(app)
    assert {s.deployment for s in (GENERATOR, TRANSFORMER, VAE, TEXT_ENCODER)} <= set(seen), seen
    from ray._private.ray_constants import WORKER_PROCESS_SETUP_HOOK_ENV_VAR as HOOK_VAR

    assert all(env.get("worker_process_setup_hook") == loopback_grpc.HOOK for env in seen.values()), seen
    assert all(env["env_vars"][HOOK_VAR] == loopback_grpc.HOOK for env in seen.values()), seen
    assert loopback_grpc.with_hook({"worker_process_setup_hook": "mine.hook", "env_vars": {"A": "1"}}) == {
        "worker_process_setup_hook": "mine.hook", "env_vars": {"A": "1", HOOK_VAR: "mine.hook"}}


# ---- the Generator's side: a stage stream that stops answering --------------------------------
async def test_a_stage_stream_past_its_deadline_fails_as_an_unavailable_stage():
    """The Generator's `_within` hands a stage stream's items on while the deadline allows, and
    raises StageUnavailable naming the stage (the error the job service retries) once it passes."""
    import asyncio

    from deployments.generator import Generator, _Run
    from serve.contracts import ResolvedSpec
    from serve.errors import StageUnavailable

    gen = Generator.func_or_class
    run = _Run(spec=ResolvedSpec.model_construct(), job_id="j", deadline_s=0.3)

    async def hangs_after_two():
        yield 1
        yield 2
        await asyncio.Event().wait()  # a frozen replica: never another item

    got = []
    with pytest.raises(StageUnavailable, match="the vae replica did not answer within its deadline") as err:
        async for item in gen._within(gen, hangs_after_two(), Deadline(0.3), "vae", run):
            got.append(item)
    assert got == [1, 2] and err.value.stage == "vae"

    async def finishes():
        for i in range(3):
            await asyncio.sleep(0.01)
            yield i
    assert [i async for i in gen._within(gen, finishes(), Deadline(5.0), "vae", run)] == [0, 1, 2]
