"""torch's intra-op thread count in a model-stage replica (`deployments.<stage>.torch_threads`).

Ray sets OMP_NUM_THREADS in each worker to its integer `num_cpus` (1 for the fractional CPU shares
of serve_config.yaml), so without this a stage would run torch on one thread whatever the machine.

The default (`torch_threads` unset or 0):
- on a CPU device, every core of the node: the model stages of one job (encoder, DiT, VAE) run one
  after another, so each may use the whole machine while it works; jobs in different stages at
  once then share the cores. `num_cpus` in serve_config.yaml is a scheduling share, not a core count.
- on a GPU, the replica's `num_cpus` (at least 1): the work is on the GPU and several replicas share
  the node's cores, which is what Ray's own OMP_NUM_THREADS gives.

Set it per stage to pin the count (e.g. half the cores each for the DiT and the VAE when many jobs
pipeline through them).
"""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger(__name__)


def node_cpus() -> int:
    """The cores this process may run on (its CPU affinity), else the machine's count."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def assigned_cpus() -> float | None:
    """The replica's `num_cpus` as Ray assigned it; None outside a Ray worker."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        return float(ray.get_runtime_context().get_assigned_resources().get("CPU", 0.0))
    except Exception:  # noqa: BLE001 - outside an actor there is nothing assigned
        return None


def default_torch_threads(device_type: str, replica_cpus: float | None = None, cores: int | None = None) -> int:
    """The documented default (see the module docstring)."""
    cores = cores or node_cpus()
    if device_type == "cpu":
        return cores
    return max(1, min(cores, math.floor(replica_cpus or 1)))


def apply_torch_threads(setting: int | None, device, stage: str) -> int:
    """Set torch's intra-op threads for this process from the stage's `torch_threads` (None/0 = the
    default); call at the start of `__init__`, before any torch work, so that every thread that
    later runs the model (they read the count when they first run parallel work) uses it."""
    import torch

    device_type = getattr(device, "type", str(device))
    threads = int(setting) if setting else default_torch_threads(device_type, assigned_cpus())
    torch.set_num_threads(threads)
    logger.info("%s: torch uses %d intra-op thread(s) (%s; node has %d cores)", stage, threads,
                "torch_threads setting" if setting else f"default for {device_type}", node_cpus())
    return threads
