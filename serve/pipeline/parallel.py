"""One job across several devices: diffusers' own context parallelism (Ulysses / ring sequence
parallel, `ModelMixin.enable_parallelism` with `ContextParallelConfig`) on the SkyReels-V2 DiT.

diffusers 0.42.1 gives `WanTransformer3DModel` a `_cp_plan` but not `SkyReelsV2Transformer3DModel`
(same blocks, same rope). `skyreels_cp_plan` is Wan's plan fitted to SkyReels-V2, declared the way
diffusers declares plans (no hand-written attention sharding; the all-to-all / ring attention is
diffusers' dispatcher's):

- `rope`: both outputs (cos, sin: (1, S, 1, d)) split on the sequence, once per forward;
- `blocks.0`: the token sequence split on entry (each rank holds S / N tokens from there on);
- `blocks.<i>`: the per-token modulation of diffusion forcing (`temb` (B, 6, S, D), 4-D) split
  for every block; the T2V one ((B, 6, D), 3-D) has no sequence and is left whole (diffusers' hook
  skips an input whose dimensions are not the expected ones);
- `norm_out`: gathered back to the whole sequence before the output modulation, whose diffusion-
  forcing shift/scale are per token over the whole sequence (Wan gathers at `proj_out`; gathering
  one module earlier costs the tiny head on every rank and serves T2V and DF with one plan).

The text (cross-attention keys/values) is not split. A causal-block mask (DF `causal_block_size`
> 1) is a full-sequence attention mask, which diffusers' context-parallel attention does not take:
`serve.frames.parallel_refusal` refuses it (a 400 per request, a config error for a model's defaults).

On a CPU the group runs over gloo. diffusers' `_resolve_parallel_config` computes the rank's device
as `rank % torch.accelerator.device_count()`, which is 0 on a CPU-only torch (ZeroDivisionError,
diffusers/models/modeling_utils.py, `_resolve_parallel_config`); `enable_context_parallel` counts
the CPU as one device there (`_cpu_device_count`), nothing else changes.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import logging
import os
import socket
from typing import Any

import torch

from serve.config import LeversConfig, ModelConfig, ParallelConfig
from serve.errors import ConfigError

logger = logging.getLogger(__name__)

# how long a rank waits for the others (the group's start, and each collective)
GROUP_TIMEOUT_S = 900


def skyreels_cp_plan(num_layers: int) -> dict:
    """The context-parallel plan of a `SkyReelsV2Transformer3DModel` with `num_layers` blocks."""
    from diffusers.models._modeling_parallel import ContextParallelInput, ContextParallelOutput

    plan: dict = {
        "rope": {0: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True),
                 1: ContextParallelInput(split_dim=1, expected_dims=4, split_output=True)},
        "norm_out": ContextParallelOutput(gather_dim=1, expected_dims=3),
    }
    for i in range(num_layers):
        block = {"temb": ContextParallelInput(split_dim=2, expected_dims=4, split_output=False)}
        if i == 0:
            block["hidden_states"] = ContextParallelInput(split_dim=1, expected_dims=3, split_output=False)
        plan[f"blocks.{i}"] = block
    return plan


@contextlib.contextmanager
def _cpu_device_count():
    """On a CPU-only torch, count the CPU as one accelerator device while diffusers builds its mesh."""
    if torch.cuda.is_available() or torch.accelerator.device_count() > 0:
        yield
        return
    original = torch.accelerator.device_count
    torch.accelerator.device_count = lambda: 1
    try:
        yield
    finally:
        torch.accelerator.device_count = original


def enable_context_parallel(transformer, plan: ParallelConfig) -> None:
    """Split `transformer`'s sequence over the initialised torch.distributed group (its world size
    must be `plan.sequence_degree`) with diffusers' `enable_parallelism`; attention on a backend
    that supports it ("native" unless one that does is set)."""
    from diffusers import ContextParallelConfig
    from diffusers.models.attention_dispatch import _AttentionBackendRegistry

    if not torch.distributed.is_initialized():
        raise ConfigError("context parallelism needs an initialised torch.distributed group")
    world = torch.distributed.get_world_size()
    if world != plan.sequence_degree:
        raise ConfigError(f"parallel: ulysses {plan.ulysses} x ring {plan.ring} = {plan.sequence_degree} ranks, "
                          f"but the group has {world}")
    heads = transformer.config.num_attention_heads
    if heads % plan.ulysses:
        raise ConfigError(f"parallel.ulysses {plan.ulysses} must divide the model's {heads} attention heads",
                          param="parallel.ulysses")
    backend = getattr(transformer, "_cinevivid_attention_backend", None) or "native"
    if backend not in _AttentionBackendRegistry._supports_context_parallel:
        raise ConfigError(f"attention backend {backend!r} does not support context parallelism; use one of "
                          f"{sorted(_AttentionBackendRegistry._supports_context_parallel)}", param="attention_backend")
    with _cpu_device_count():
        transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=plan.ulysses, ring_degree=plan.ring),
                                       cp_plan=skyreels_cp_plan(len(transformer.blocks)))


# -- the Serve wiring: one Transformer replica over several devices ---------------------------------
#
# The replica's deployment gets ulysses x ring x cfg placement-group bundles (`serve.app.deployment_plan`,
# each the deployment's `ray_actor_options`); Serve puts the replica in bundle 0 and it starts one
# `ParallelWorker` actor in each other bundle. Rank k = cfg_group x sequence_degree + sequence_rank:
# the replica is rank 0, group 0's leader. Each cfg group is its own torch.distributed group (its
# leader hosts the rendezvous; NCCL on GPUs, gloo on a CPU), split by diffusers' context parallelism.
# The ranks of a group receive the same rows, so each forward's collectives line up; the groups
# share nothing but the rows rank 0 hands them and the outputs their leaders hand back.


def free_address() -> str:
    """host:port of a free TCP port on this node's Ray address (a group's rendezvous)."""
    import ray

    host = ray.util.get_node_ip_address()
    with socket.socket() as s:
        s.bind((host, 0))
        return f"{host}:{s.getsockname()[1]}"


def join_group(address: str, rank: int, world: int, device: torch.device) -> None:
    """This process joins the torch.distributed group of `world` ranks whose rank 0 hosts `address`."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, init_method=f"tcp://{address}", rank=rank, world_size=world,
                                         timeout=datetime.timedelta(seconds=GROUP_TIMEOUT_S))


def join_and_split(transformer, address: str, seq_rank: int, plan: ParallelConfig, device: torch.device) -> None:
    """Join the cfg group's torch.distributed group at `address` as `seq_rank` and split
    `transformer`'s sequence over it: what rank 0 and each worker do to their own DiT."""
    join_group(address, seq_rank, plan.sequence_degree, device)
    enable_context_parallel(transformer, plan)


def split_rows(rows: int, groups: int) -> list[tuple[int, int]]:
    """Rows [start, stop) of each cfg group: as even as can be, the first groups taking the extra row
    (a cfg-batched forward of B jobs has 2B rows: B conditional to group 0, B unconditional to group 1)."""
    bounds, start = [], 0
    for g in range(groups):
        stop = start + rows // groups + (1 if g < rows % groups else 0)
        bounds.append((start, stop))
        start = stop
    return bounds


def take_rows(kwargs: dict[str, Any], rows: int, start: int, stop: int, device=None) -> dict[str, Any] | None:
    """The forward arguments of rows [start, stop): every tensor or list whose first dimension is the
    batch's `rows` is sliced (a per-batch value such as one shared fps is kept whole); on `device`
    when given. None when there are no rows."""
    if stop <= start:
        return None
    out = {}
    for key, value in kwargs.items():
        if isinstance(value, torch.Tensor):
            if value.dim() and value.shape[0] == rows:
                value = value[start:stop]
            value = value.to(device) if device is not None else value
        elif isinstance(value, (list, tuple)) and len(value) == rows and rows > 1:
            value = list(value[start:stop])
        out[key] = value
    return out


class ParallelWorker:
    """One rank of a parallel Transformer replica other than the replica itself: the same DiT, loaded
    the same way, in its own bundle of the replica's placement group. It runs the forwards rank 0
    sends it, in order; the leader of a cfg group (its sequence rank 0) returns that group's output."""

    def __init__(self, model: dict, levers: dict, torch_threads: int | None, cfg_group: int, seq_rank: int):
        from serve.pipeline.loading import torch_device
        from serve.runtime.threads import apply_torch_threads

        self.model_cfg = ModelConfig.model_validate(model)
        self.levers = LeversConfig.model_validate(levers)
        self.plan = self.model_cfg.parallel
        self.cfg_group, self.seq_rank = cfg_group, seq_rank
        self.device = torch_device(self.model_cfg)
        apply_torch_threads(torch_threads, self.device, f"transformer rank {self.rank}")
        self.transformer = None

    @property
    def rank(self) -> int:
        return self.cfg_group * self.plan.sequence_degree + self.seq_rank

    def address(self) -> str:
        """The rendezvous of this worker's cfg group (asked of a group leader)."""
        return free_address()

    def load(self, address: str | None) -> int:
        """Load the DiT; with a sequence split, join the group at `address` and split it."""
        from serve.pipeline.levers import load_transformer

        split = functools.partial(join_and_split, address=address, seq_rank=self.seq_rank, plan=self.plan,
                                  device=self.device)
        self.transformer = load_transformer(self.model_cfg, self.levers, self.device,
                                            split if self.plan.sequence_degree > 1 else None)
        self.seen = RankStats(self.rank, self.transformer)
        return self.rank

    @torch.no_grad()
    def forward(self, kwargs: dict[str, Any] | None):
        if kwargs is None:  # no rows for this group in this forward
            return None
        kwargs = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
        out = self.transformer(**kwargs, return_dict=False)[0]
        return out.cpu() if self.seq_rank == 0 else None

    def stats(self) -> dict:
        return self.seen.as_dict()


class RankStats:
    """What one rank's DiT has run: forwards, and the batch rows and the token count its first block's
    self-attention saw in the last one (a sequence split shows as a part of the video's tokens)."""

    def __init__(self, rank: int, transformer):
        self.rank, self.forwards, self.rows, self.tokens = rank, 0, 0, 0
        transformer.blocks[0].attn1.register_forward_pre_hook(self._saw, with_kwargs=True)

    def _saw(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        self.forwards += 1
        self.rows, self.tokens = int(hidden.shape[0]), int(hidden.shape[1])

    def as_dict(self) -> dict:
        import ray

        return {"rank": self.rank, "forwards": self.forwards, "rows": self.rows, "tokens": self.tokens,
                "pid": os.getpid(), "placement_group": ray.get_runtime_context().get_placement_group_id()}


class ParallelGroupBroken(RuntimeError):
    """A worker of a parallel replica failed or is gone: the job in flight fails as
    `stage_unavailable` (the job service runs it again), the replica reports itself unhealthy, and
    Serve replaces it (with a new placement group and new workers)."""

    replica_unusable = True  # serve.pipeline.scheduler: the replica cannot run another job


class ParallelTransformer:
    """Rank 0's view of the split DiT: called like the module (`transformer(hidden_states=...,
    return_dict=False)`), it hands each cfg group its rows, runs group 0's on its own module with
    the group-0 workers, and returns the rows' outputs joined in order. Everything else (config,
    dtype, blocks) is the module's."""

    def __init__(self, module, plan: ParallelConfig, workers: dict[tuple[int, int], Any], device):
        self.module, self.plan, self.workers, self.device = module, plan, workers, device
        self.broken: str | None = None
        self.seen = RankStats(0, module)

    def rank_stats(self, timeout_s: float = 30.0) -> list[dict]:
        """Every rank's `RankStats`, rank 0 first (asked of the workers: call it between forwards)."""
        import ray

        return [self.seen.as_dict(), *ray.get([w.stats.remote() for _, w in sorted(self.workers.items())],
                                              timeout=timeout_s)]

    def __getattr__(self, name):
        return getattr(self.__dict__["module"], name)

    def __call__(self, *, hidden_states: torch.Tensor, return_dict: bool = False, **kwargs):
        import ray

        if self.broken:
            raise ParallelGroupBroken(self.broken)
        args = {"hidden_states": hidden_states, **kwargs}
        rows = hidden_states.shape[0]
        bounds = split_rows(rows, self.plan.cfg)
        pending = []  # (cfg group, the refs of its workers' outputs, its leader's first)
        for g, (start, stop) in enumerate(bounds):
            part = take_rows(args, rows, start, stop, device=torch.device("cpu"))
            members = [w for (wg, _), w in sorted(self.workers.items()) if wg == g]
            if not members:
                continue
            ref = ray.put(part)
            refs = [w.forward.remote(ref) for w in members]
            pending.append((g, refs))
        try:  # any failure leaves the ranks out of step (a collective half done): the group is broken
            outputs = {0: self.module(**take_rows(args, rows, *bounds[0]), return_dict=False)[0]}
            leaders = {refs[0]: g for g, refs in pending if g}
            waiting = [ref for _, refs in pending for ref in refs]
            while waiting:  # the first worker that failed ends the wait (not the slowest one)
                ready, waiting = ray.wait(waiting, num_returns=1, timeout=GROUP_TIMEOUT_S)
                if not ready:
                    raise TimeoutError(f"no answer from a worker in {GROUP_TIMEOUT_S} s")
                out = ray.get(ready[0])
                if ready[0] in leaders:
                    outputs[leaders[ready[0]]] = out
        except Exception as exc:  # a rank died or raised: this replica cannot run another forward
            self.broken = f"a rank of the parallel replica failed: {type(exc).__name__}: {exc}"
            raise ParallelGroupBroken(self.broken) from exc
        joined = torch.cat([outputs[g].to(self.device) for g in sorted(outputs) if outputs[g] is not None])
        return (joined,)


class ParallelGroup:
    """Starts a parallel replica's workers in its placement group (from the replica's `__init__`),
    then, once the replica has its own DiT, splits it with theirs (`join`, as `load_transformer`'s
    `before_compile`) and wraps it (`wrap`)."""

    def __init__(self, model: dict, levers: dict, torch_threads: int | None, device):
        import ray
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        self.plan = ModelConfig.model_validate(model).parallel
        self.device = device
        pg = ray.util.get_current_placement_group()
        if pg is None or pg.bundle_count < self.plan.devices:
            raise ConfigError(f"parallel: this replica spans {self.plan.devices} devices but has "
                              f"{pg.bundle_count if pg else 'no'} placement-group bundles; deploy it through "
                              "serve.app (deployment_plan gives it one bundle per device)")
        bundle = pg.bundle_specs[1]
        worker_cls = ray.remote(ParallelWorker)
        self.workers: dict[tuple[int, int], Any] = {}
        for rank in range(1, self.plan.devices):
            g, r = divmod(rank, self.plan.sequence_degree)
            self.workers[(g, r)] = worker_cls.options(
                num_cpus=bundle.get("CPU", 0), num_gpus=bundle.get("GPU", 0),
                resources={k: v for k, v in bundle.items() if k not in ("CPU", "GPU", "memory")} or None,
                scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=rank),
            ).remote(model, levers, torch_threads, g, r)

    def join(self, transformer) -> None:
        """Every worker loads its DiT (joining its group's rendezvous); rank 0 joins group 0 and splits its own."""
        import ray

        seq = self.plan.sequence_degree
        addresses = {0: free_address() if seq > 1 else None}
        for g in range(1, self.plan.cfg):
            addresses[g] = ray.get(self.workers[(g, 0)].address.remote()) if seq > 1 else None
        loads = [w.load.remote(addresses[g]) for (g, _), w in self.workers.items()]
        if seq > 1:
            join_and_split(transformer, addresses[0], 0, self.plan, self.device)
        ray.get(loads, timeout=GROUP_TIMEOUT_S)  # a worker that failed to load fails the replica's start
        logger.info("parallel replica: %d devices (ulysses %d x ring %d x cfg %d)", self.plan.devices,
                    self.plan.ulysses, self.plan.ring, self.plan.cfg)

    def wrap(self, transformer) -> ParallelTransformer:
        return ParallelTransformer(transformer, self.plan, self.workers, self.device)
