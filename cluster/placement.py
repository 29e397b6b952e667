"""Where each role runs: one Ray placement group for the teacher engine, the student engine and
the trainer workers, built from the config's resources.

    plan = plan_placement(cfg)          # pure: no Ray, used by --dry-run too
    print(plan.describe())
    with ray_session(cfg.cluster, plan) as private, placement_group_for(plan, cfg.cluster, private) as pg:
        strategy = plan.strategy_for(pg, "student engine")

Bundle i of the group hosts exactly one actor, with the resources it asks for. A teacher behind
an OpenAI-compatible server is not placed (it runs wherever the server runs).
"""
from __future__ import annotations

import math
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from switchkd.rollout.errors import SwitchkdError
from switchkd.rollout.local_ray import init_ray

TEACHER, STUDENT, TRAINER = "teacher engine", "student engine", "trainer rank"


class ClusterError(SwitchkdError, RuntimeError):
    """The cluster cannot host the plan, or cannot be reached; one line for the user."""


@dataclass(frozen=True)
class Bundle:
    role: str            # TEACHER, STUDENT, or "trainer rank N"
    resources: dict      # Ray resources, e.g. {"CPU": 1.0, "GPU": 2.0}
    detail: str          # what runs there, for the plan printout


@dataclass(frozen=True)
class PlacementPlan:
    bundles: list[Bundle]
    strategy: str
    trainer_device: str
    notes: list[str] = field(default_factory=list)

    def index(self, role: str) -> int:
        """Bundle index of ``role`` (the first trainer bundle for TRAINER)."""
        for i, b in enumerate(self.bundles):
            if b.role == role or (role == TRAINER and b.role.startswith(TRAINER)):
                return i
        raise KeyError(role)

    def has(self, role: str) -> bool:
        return any(b.role == role for b in self.bundles)

    def totals(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for b in self.bundles:
            for k, v in b.resources.items():
                out[k] = out.get(k, 0.0) + v
        return out

    def strategy_for(self, pg, role: str):
        """Ray scheduling strategy that puts ``role``'s actor in its bundle."""
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        return PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=self.index(role))

    def describe(self) -> str:
        """The plan as the lines `switchkd train --dry-run` prints."""
        lines = [f"placement group: {len(self.bundles)} bundles, strategy {self.strategy}"]
        for i, b in enumerate(self.bundles):
            res = ", ".join(f"{k} {v:g}" for k, v in b.resources.items())
            lines.append(f"  bundle {i}: {b.role:<16} {{{res}}}  {b.detail}")
        lines.append("  total: " + ", ".join(f"{k} {v:g}" for k, v in self.totals().items()))
        return "\n".join(lines + [f"note: {n}" for n in self.notes])


NODE_RESOURCE_SHARE = 0.01   # what a bundle asks of a node-pinning custom resource: 1 per node hosts 100 bundles


def uses_private_ray(cluster) -> bool:
    """No cluster to join (no cluster.address, not inside a `ray job submit`): the run's Ray is this
    host alone, the private one ray_session starts (or a session the caller already runs)."""
    return cluster.address is None and not os.environ.get("RAY_ADDRESS")


def _resources(cpus: float, gpus: float, node_resource: str | None = None) -> dict:
    res = {"CPU": float(cpus)} if cpus > 0 else {}
    if gpus > 0:
        res["GPU"] = float(gpus)
    if node_resource:
        res[node_resource] = NODE_RESOURCE_SHARE
    return res or {"CPU": 0.001}  # Ray bundles cannot be empty


def plan_placement(cfg) -> PlacementPlan:
    """The bundles of ``cfg`` (a cluster.config.Config), in order: teacher, student, trainer ranks."""
    from switchkd.trainer.ds_config import resolve_device

    bundles, notes = [], []
    r, c = cfg.rollout, cfg.cluster
    for role, engine, path in ((TEACHER, r.teacher, cfg.model.teacher), (STUDENT, r.student, cfg.model.student)):
        if role == TEACHER and engine.server.url is not None:
            notes.append(f"the teacher runs behind a server ({engine.server.url}); it is not placed")
            continue
        bundles.append(Bundle(role, _resources(engine.num_cpus, engine.num_gpus, c.engine_resource),
                              f"vLLM {engine.device}, TP={engine.tensor_parallel_size}, {path}"))
    tc = cfg.trainer
    device = resolve_device(tc, local=False)
    for rank in range(tc.num_workers):
        bundles.append(Bundle(f"{TRAINER} {rank}", _resources(tc.cpus_per_worker, 1 if device == "cuda" else 0,
                                                               c.trainer_resource),
                              f"DeepSpeed ZeRO-{tc.zero_stage} on {device}, {tc.num_workers} worker(s)"))
    private = uses_private_ray(c)
    for key in ("engine_resource", "trainer_resource"):
        if getattr(c, key) and private:
            raise ClusterError(f"cluster.{key}={getattr(c, key)}: a private Ray has no custom resources; join a "
                               f"cluster whose nodes declare it (--address, or `ray job submit`)")
    if cfg.sync.transport == "shm":
        notes.append("sync.transport=shm: trainer rank 0 and the student engine must share a node "
                     "(checked once placed; use sync.transport=collective across nodes)")
    for name, path in (("model.teacher", cfg.model.teacher), ("model.student", cfg.model.student)):
        if not (Path(path) / "config.json").is_file():
            notes.append(f"{name}={path}: no model there yet (prepare it before training)")
    plan = PlacementPlan(bundles, cfg.cluster.placement_strategy, device, notes)
    if private:  # a private Ray of the configured size
        need = plan.totals()
        for key, res in (("num_cpus", "CPU"), ("num_gpus", "GPU")):
            have = getattr(cfg.cluster, key)
            if have is not None and need.get(res, 0.0) > have:
                raise ClusterError(f"cluster.{key}={have}: the private Ray would be too small, the plan needs "
                                   f"{res} {need[res]:g} (engines + trainer workers); raise it or leave it null")
    return plan


@contextmanager
def ray_session(cluster, plan: PlacementPlan):
    """Ray for the run: join cluster.address (or the cluster a `ray job submit` runs in), else start
    a private one bound to 127.0.0.1 with no dashboard, sized to at least what the plan needs.
    Yields whether it started a private one. A session this function started or joined is shut
    down (left) on exit, whatever the exit; a private one's processes all stop with it."""
    import ray

    if ray.is_initialized():  # the caller's session (tests, notebooks): theirs to stop
        yield False
        return
    address = cluster.address or os.environ.get("RAY_ADDRESS")
    try:
        if address:
            init_ray(address, log_to_driver=True)
        else:
            need = plan.totals()
            cpus = cluster.num_cpus or max(os.cpu_count() or 1, math.ceil(need.get("CPU", 0)))
            init_ray(num_cpus=cpus, num_gpus=cluster.num_gpus, log_to_driver=True)
    except ConnectionError as e:
        raise ClusterError(f"cluster.address={address}: cannot connect to Ray ({e})") from None
    try:
        yield not address
    finally:
        ray.shutdown()


@contextmanager
def placement_group_for(plan: PlacementPlan, cluster, private_ray: bool):
    """Reserve the plan's bundles (ClusterError if Ray cannot within cluster.placement_timeout_s);
    the group is removed on exit, which also frees every actor placed in it, unless ``private_ray``
    (ray_session started a Ray for this run alone, which goes down whole right after)."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    pg = placement_group([b.resources for b in plan.bundles], strategy=plan.strategy)
    try:
        try:
            ray.get(pg.ready(), timeout=cluster.placement_timeout_s)
        except ray.exceptions.GetTimeoutError:
            raise ClusterError(f"Ray could not place {plan.totals()} ({len(plan.bundles)} bundles, {plan.strategy}) "
                               f"within cluster.placement_timeout_s={cluster.placement_timeout_s:g} s; the cluster "
                               f"has {ray.cluster_resources()}") from None
        yield pg
    finally:
        # A private Ray may already be going (its daemons killed by something else, e.g. the OOM
        # killer): removing the group would then wait for its GCS forever.
        if not private_ray:
            remove_placement_group(pg)


def bundle_nodes(pg) -> dict[int, str]:
    """Node id of each bundle of a ready placement group."""
    from ray.util import placement_group_table

    return dict(placement_group_table(pg)["bundles_to_node_id"])


def record_placement(pg, plan: PlacementPlan, out_dir: Path) -> dict[str, dict]:
    """Where Ray placed each role: {role: {"node_id", "node_ip"}}, written to OUT_DIR/placement.json."""
    import json

    import ray

    from switchkd.rollout.io import atomic_write_bytes

    ips = {n["NodeID"]: n["NodeManagerAddress"] for n in ray.nodes()}
    placed = {b.role: {"node_id": node, "node_ip": ips.get(node, "?")}
              for b, node in zip(plan.bundles, (bundle_nodes(pg)[i] for i in range(len(plan.bundles))))}
    atomic_write_bytes(Path(out_dir) / "placement.json", (json.dumps(placed, indent=2) + "\n").encode())
    return placed


def lost_nodes(placed: dict[str, dict], wait_s: float) -> dict[str, list[str]]:
    """The nodes of ``placed`` (record_placement's) that Ray reports dead: {node_id: [roles]}.
    A node killed a moment ago is only marked dead after Ray's health checks fail, so this
    polls for up to ``wait_s`` seconds before answering that none is lost."""
    import ray

    deadline = time.monotonic() + wait_s
    while True:
        alive = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
        lost: dict[str, list[str]] = {}
        for role, where in placed.items():
            if where["node_id"] not in alive:
                lost.setdefault(where["node_id"], []).append(role)
        if lost or time.monotonic() >= deadline:
            return lost
        time.sleep(1.0)


def node_lost_error(placed: dict[str, dict], lost: dict[str, list[str]], step: int) -> ClusterError:
    """One line naming each lost node, what it hosted and how the run continues."""
    nodes = "; ".join(f"node {node} ({placed[roles[0]]['node_ip']}), which hosted the {', '.join(roles)}"
                      for node, roles in lost.items())
    return ClusterError(f"Ray lost {nodes}, at step {step}: the run stopped and released its actors and "
                        f"placement group; restart the node (or add capacity) and continue from the last "
                        f"checkpoint with --resume")
