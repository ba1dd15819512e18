"""python -m gpen restore --ray: the same restore job on a Ray cluster (or a local Ray on one machine).

    python -m gpen restore photos/ clips/ -o out --ray local          # one actor per CPU slot / GPU here
    python -m gpen restore /shared/in -o /shared/out --ray HEAD:6379  # an existing cluster

The CLI plans the jobs exactly as the plain run does (inputs never written, existing results skipped
unless --overwrite, bad files refused from their headers) and hands the jobs left to `run_on_ray`.
A pool of `Restorer` actors (one per GPU, or one per CPU slot where the cluster has none) each load the
model and the detector once; files go to whichever actor is free; each actor writes its results
itself, atomically (temporary file beside the result, then renamed), with the library's own
`restore_file` / `restore_clip`, so results are those of the plain run. A task that fails is tried
once more, on another actor where there is one; a file that fails twice is reported with its reason.
Inputs and outputs must be at the same paths on every node (shared storage).

Ray is an optional dependency: pip install .[cluster]  (or -r requirements-cluster.txt).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ATTEMPTS = 2  # a file is tried this many times before it is reported failed


def _ray():
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray: pip install .[cluster]  (or pip install -r requirements-cluster.txt)") \
            from None
    return ray


class Restorer:
    """One worker: the model and detector loaded once, then any number of files restored."""

    def __init__(self, args, threads: int = 0):
        import torch

        from .cli import keep_freed_memory, load_models
        from .loader import resolve_device

        if threads > 0:
            torch.set_num_threads(threads)  # actors sharing a machine must not each take every core
        keep_freed_memory()
        self.args = args
        self.detect = args.face_align and not args.aligned
        self.device = resolve_device(args.device)
        self.model, self.detector = load_models(args, self.device, self.detect)

    def where(self) -> str:
        import socket

        return f"{socket.gethostname()}:{os.getpid()} ({self.device})"

    def restore(self, job, overwrite: bool, info=None) -> str:
        """Restore one file (photo or clip) into job.target, atomically; returns the summary line."""
        from .cli import is_video, restore_clip, restore_file

        if job.target.exists() and not overwrite:  # finished by an earlier attempt, or another run
            return f"skipped: {job.target} exists (--overwrite replaces it)"
        if is_video(job.source):
            return restore_clip(job, self.model, self.detector, self.args, info, job.source.name)
        return restore_file(job, self.model, self.detector, self.args)


@dataclass
class Outcome:
    """What happened to one job: 'done', or 'failed' with the reasons of each attempt."""

    job: object
    status: str = "pending"
    summary: str = ""
    errors: list[str] = field(default_factory=list)
    actors: list[int] = field(default_factory=list)  # the pool slots it ran on


def pool_shape(ray, address: str | None, cpus_per_actor: int) -> tuple[int, dict]:
    """How many actors, and the resources each asks for: one GPU each where the cluster has GPUs,
    else `cpus_per_actor` CPUs each, as many as the cluster's CPUs allow."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        return gpus, {"num_gpus": 1, "num_cpus": 1}
    cpus = int(resources.get("CPU", 1))
    return max(1, cpus // cpus_per_actor), {"num_cpus": cpus_per_actor}


def connect(address: str | None, num_cpus: int | None = None):
    """ray.init for `address` ('local' or None: a Ray on this machine; else a cluster's address),
    unless this process is connected already (a test's ray.init, a notebook's)."""
    ray = _ray()
    if ray.is_initialized():
        return ray
    if address in (None, "", "local"):
        root = str(Path(__file__).resolve().parents[1])  # workers import gpen from this checkout too
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


def run_on_ray(jobs: list, args, address: str | None = "local", report=None, videos: dict | None = None,
               task_timeout: float | None = None) -> dict:
    """Restore `jobs` (the CLI's planned and admitted Jobs) on a pool of Ray actors.

    Returns {job: Outcome}; each outcome is also told to `report` (the CLI's Report) as it happens.
    A task that raises, or runs past `task_timeout` seconds, is retried once (on another actor when
    the pool has several); a file that fails twice is reported failed with both reasons.
    """
    ray = connect(address, getattr(args, "ray_cpus", None))
    cpus_per_actor = max(1, getattr(args, "ray_cpus_per_actor", 1) or 1)
    size, resources = pool_shape(ray, address, cpus_per_actor)
    size = max(1, min(size, len(jobs), getattr(args, "ray_actors", 0) or size))
    threads = 0 if "num_gpus" in resources else cpus_per_actor
    actor_class = ray.remote(**resources, max_restarts=1, max_task_retries=0)(Restorer)
    videos = videos or {}
    overwrite = bool(args.overwrite)
    outcomes = {job: Outcome(job) for job in jobs}
    if not jobs:
        return outcomes

    actors = [actor_class.remote(args, threads) for _ in range(size)]
    print(f"ray: {size} actor(s), each {resources}", file=sys.stderr, flush=True)
    queue = list(jobs)  # (re)tries wait here
    idle = list(range(size))
    running: dict = {}  # ObjectRef -> (job, slot, started)

    def start(slot: int, job) -> None:
        ref = actors[slot].restore.remote(job, overwrite, videos.get(job))
        outcomes[job].actors.append(slot)
        running[ref] = (job, slot, time.monotonic())

    def pick(job) -> int:
        tried = outcomes[job].actors
        fresh = [slot for slot in idle if slot not in tried]
        slot = (fresh or idle)[0]
        idle.remove(slot)
        return slot

    def failed(job, slot: int, reason: str) -> None:
        outcome = outcomes[job]
        outcome.errors.append(reason)
        if len(outcome.errors) < ATTEMPTS:
            print(f"ray: {job.source.name} failed on actor {slot} ({reason}); trying again", file=sys.stderr,
                  flush=True)
            queue.insert(0, job)
            return
        outcome.status = "failed"
        if report is not None:
            report.fail(job, RuntimeError(f"failed {len(outcome.errors)} times: " + "; ".join(outcome.errors)))

    try:
        while queue or running:
            while queue and idle:
                job = queue.pop(0)
                start(pick(job), job)
            ready, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in ready:
                job, slot, _ = running.pop(ref)
                idle.append(slot)
                try:
                    summary = ray.get(ref)
                except ray.exceptions.RayActorError as e:
                    failed(job, slot, f"worker lost: {_reason(e)}")
                    continue
                except ray.exceptions.RayTaskError as e:
                    failed(job, slot, _reason(e))
                    continue
                outcome = outcomes[job]
                outcome.summary = summary
                if summary.startswith("skipped: "):
                    outcome.status = "skipped"
                    if report is not None:
                        report.skip(job, summary.removeprefix("skipped: "))
                else:
                    outcome.status = "done"
                    if report is not None:
                        report.done(job, summary)
            if task_timeout is not None:
                now = time.monotonic()
                for ref, (job, slot, started) in list(running.items()):
                    if now - started > task_timeout:
                        running.pop(ref)
                        ray.kill(actors[slot], no_restart=True)
                        actors[slot] = actor_class.remote(args, threads)  # a fresh one takes its place
                        idle.append(slot)
                        failed(job, slot, f"ran past {task_timeout:g} s")
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return outcomes


def _reason(error: Exception) -> str:
    """The worker's own exception message, without Ray's traceback wrapping."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return str(cause) or type(cause).__name__
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
