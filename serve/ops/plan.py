"""The placement plan of a Serve config: per deployment, its GPUs and CPUs per replica times its
replicas (min and max), the totals, and how the minimum replicas pack onto the cluster's GPUs.

    cinevivid plan configs/skyreels-v2-t2v-14b-540p.yaml --gpus 8     # against 8 GPUs
    cinevivid plan                                                   # against the running cluster

`cinevivid up` runs `check_fits` against the cluster before deploying: a config whose minimum
replicas cannot be placed is refused in seconds, naming the deployment and the arithmetic, instead
of leaving Serve waiting on replicas that stay pending.

Packing follows Ray's rules for GPU requests: a fractional `num_gpus` (< 1) shares one GPU with
others whose fractions sum to at most 1; a whole `num_gpus` takes that many GPUs to itself. The
prediction is first-fit decreasing over the minimum replicas, on one node's GPUs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from serve.app import deployment_plan, replica_range
from serve.ops.deploy import APP_IMPORT_PATH, load_serve_config, validate_serve_config

EPS = 1e-6


class PlanDoesNotFit(RuntimeError):
    """The minimum replicas of a config cannot be placed on the cluster (the message says why)."""


@dataclass(frozen=True)
class PlanRow:
    app: str
    deployment: str
    gpus: float  # per replica (all of its devices)
    cpus: float  # per replica
    devices: int  # per replica: > 1 for a Transformer split over several devices (its bundles)
    min_replicas: int
    max_replicas: int

    @property
    def min_gpus(self) -> float:
        return self.gpus * self.min_replicas

    @property
    def max_gpus(self) -> float:
        return self.gpus * self.max_replicas


def replica_resources(opts: dict[str, Any]) -> tuple[float, float, int]:
    """(GPUs, CPUs, devices) of one replica: its `ray_actor_options`, or, for a replica that spans
    several devices (`models[].parallel`), the sum of its placement-group bundles."""
    bundles = opts.get("placement_group_bundles")
    if bundles:
        return (sum(float(b.get("GPU", 0)) for b in bundles), sum(float(b.get("CPU", 0)) for b in bundles),
                len(bundles))
    actor = opts.get("ray_actor_options") or {}
    return float(actor.get("num_gpus") or 0), float(actor.get("num_cpus") or 0), 1


def plan_rows(config: dict[str, Any]) -> list[PlanRow]:
    """Every CineVivid deployment of the config, with its per-replica resources and replica range
    (`serve.app.deployment_plan`, Serve's own `deployments:` overrides counted)."""
    validated = validate_serve_config(config)
    rows = []
    for app in config.get("applications") or []:
        if app.get("import_path") != APP_IMPORT_PATH:
            continue
        name = app.get("name", "default")
        overrides = {d["name"]: {k: v for k, v in d.items() if k != "name"} for d in app.get("deployments") or []}
        for deployment, opts in deployment_plan(validated[name], overrides).items():
            low, high = replica_range(opts)
            rows.append(PlanRow(name, deployment, *replica_resources(opts), low, high))
    return rows


def pack(rows: list[PlanRow], num_gpus: int, *, replicas: str = "min") -> list[list[tuple[str, float]]]:
    """The GPUs' contents when each deployment runs its `replicas` ("min" or "max") count:
    `num_gpus` lists of (deployment, share). Raises PlanDoesNotFit naming the first replica that
    finds no room, with the arithmetic."""
    gpus: list[list[tuple[str, float]]] = [[] for _ in range(num_gpus)]
    free = [1.0] * num_gpus
    wanted = [(r, n) for r in rows if r.gpus > 0 for n in range(r.min_replicas if replicas == "min" else r.max_replicas)]
    wanted.sort(key=lambda x: -x[0].gpus)  # whole GPUs first, then the largest fractions
    total = sum(r.gpus for r, _ in wanted)
    for row, index in wanted:
        if row.gpus >= 1 - EPS:
            need = math.ceil(row.gpus - EPS)
            whole = [i for i in range(num_gpus) if free[i] >= 1 - EPS][:need]
            if len(whole) < need:
                raise PlanDoesNotFit(_refusal(row, index, total, num_gpus, free, f"{need} whole GPU(s)"))
            for i in whole:
                free[i] = 0.0
                gpus[i].append((row.deployment, 1.0))
            continue
        fit = next((i for i in range(num_gpus) if free[i] >= row.gpus - EPS), None)
        if fit is None:
            raise PlanDoesNotFit(_refusal(row, index, total, num_gpus, free, f"{row.gpus:g} of one GPU"))
        free[fit] -= row.gpus
        gpus[fit].append((row.deployment, row.gpus))
    return gpus


def _refusal(row: PlanRow, index: int, total: float, num_gpus: int, free: list[float], need: str) -> str:
    left = ", ".join(f"{f:.2g}" for f in free) or "none"
    return (f"{row.app}/{row.deployment}: replica {index + 1} of its minimum {row.min_replicas} needs {need}, "
            f"but the cluster's {num_gpus} GPU(s) have {left} free once the larger requests are placed "
            f"(the minimum replicas ask {total:g} GPUs in all: {_sum_text(row)}). Lower min_replicas or num_gpus, "
            f"or add GPUs.")


def _sum_text(row: PlanRow) -> str:
    return f"{row.deployment} {row.gpus:g} x {row.min_replicas}"


def check_fits(rows: list[PlanRow], resources: dict[str, float]) -> list[list[tuple[str, float]]]:
    """Refuse (PlanDoesNotFit) a plan whose minimum replicas do not fit `resources` (Ray's
    `cluster_resources()`: "GPU", "CPU"); returns the predicted GPU packing."""
    cpus = resources.get("CPU")  # None: GPUs only
    need_cpus = sum(r.cpus * r.min_replicas for r in rows)
    if cpus is not None and need_cpus > float(cpus) + EPS:
        parts = " + ".join(f"{r.deployment} {r.cpus:g} x {r.min_replicas}" for r in rows if r.cpus * r.min_replicas)
        raise PlanDoesNotFit(f"the minimum replicas ask {need_cpus:g} CPUs ({parts}), the cluster has {cpus:g}")
    num_gpus = int(round(float(resources.get("GPU", 0))))
    need_gpus = sum(r.min_gpus for r in rows)
    if need_gpus > num_gpus + EPS:
        parts = " + ".join(f"{r.deployment} {r.gpus:g} x {r.min_replicas}" for r in rows if r.min_gpus)
        raise PlanDoesNotFit(f"the minimum replicas ask {need_gpus:g} GPUs ({parts}), the cluster has {num_gpus}")
    return pack(rows, num_gpus)


def format_plan(rows: list[PlanRow], resources: dict[str, float] | None = None) -> str:
    """The plan as a table, the totals, and (given the cluster's resources) the packing or the refusal."""
    w = max([len("deployment")] + [len(f"{r.app}/{r.deployment}") for r in rows])
    spans = any(r.devices > 1 for r in rows)  # a column for the replicas split over several devices
    lines = [f"{'deployment':<{w}} {'GPUs':>5} {'CPUs':>5} {'replicas':>9} {'GPUs min..max':>14}"
             + (f" {'devices':>7}" if spans else "")]
    for r in rows:
        lines.append(f"{r.app + '/' + r.deployment:<{w}} {r.gpus:>5g} {r.cpus:>5g} "
                     f"{f'{r.min_replicas}..{r.max_replicas}':>9} {f'{r.min_gpus:g}..{r.max_gpus:g}':>14}"
                     + (f" {r.devices:>7}" if spans else ""))
    min_g, max_g = sum(r.min_gpus for r in rows), sum(r.max_gpus for r in rows)
    min_c, max_c = sum(r.cpus * r.min_replicas for r in rows), sum(r.cpus * r.max_replicas for r in rows)
    lines.append(f"total: GPUs {min_g:g}..{max_g:g}, CPUs {min_c:g}..{max_c:g} (min..max replicas)")
    if resources is not None:
        n = int(round(float(resources.get("GPU", 0))))
        cpus = resources.get("CPU")
        lines.append(f"cluster: {n} GPU(s)" + (f", {float(cpus):g} CPU(s)" if cpus is not None else ""))
        try:
            packing = check_fits(rows, resources)
        except PlanDoesNotFit as exc:
            lines.append(f"does not fit: {exc}")
        else:
            for i, content in enumerate(packing):
                used = sum(s for _, s in content)
                lines.append(f"  GPU {i}: {used:.2g} used: " + (", ".join(f"{d} {s:g}" for d, s in content) or "-"))
            try:
                pack(rows, n, replicas="max")
                lines.append("fits at the maximum replicas too")
            except PlanDoesNotFit:
                lines.append(f"at the maximum replicas ({max_g:g} GPUs) it does not fit: autoscaling stops "
                             "where the GPUs run out")
    return "\n".join(lines)


def cluster_resources(address: str | None) -> dict[str, float]:
    """The connected (or `address`) cluster's total resources."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address or "auto", logging_level="ERROR", log_to_driver=False)
    return {k: float(v) for k, v in ray.cluster_resources().items()}


def check_cluster_fits(config: dict[str, Any]) -> None:
    """`up`'s pre-deploy check against the connected cluster: raises PlanDoesNotFit."""
    import ray

    check_fits(plan_rows(config), {k: float(v) for k, v in ray.cluster_resources().items()})


def cmd_plan(args) -> int:
    rows = plan_rows(load_serve_config(args.config))
    resources = None
    if args.gpus is not None:
        resources = {"GPU": float(args.gpus), **({"CPU": float(args.cpus)} if args.cpus is not None else {})}
    elif args.address:
        resources = cluster_resources(args.address)
    print(format_plan(rows, resources))
    if resources is not None:
        try:
            check_fits(rows, resources)
        except PlanDoesNotFit:
            return 1
    return 0

