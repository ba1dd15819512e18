"""python -m gpen restore --ray: the same restore job on a Ray cluster (or a local Ray on one machine).

    python -m gpen restore photos/ clips/ -o out --ray local          # one actor per CPU slot / GPU here
    python -m gpen restore /shared/in -o /shared/out --ray HEAD:6379  # an existing cluster

The CLI plans the jobs (jobs.plan_run) as the plain run does (inputs never written, existing results skipped
unless --overwrite, bad files refused from their headers) and hands the jobs left to `run_on_ray`.
A pool of `Worker` actors (one per GPU, or one per CPU slot where the cluster has none) each load the
model and the detector once; files go to whichever actor is free; each actor writes its results
itself, atomically (temporary file beside the result, then renamed), with the library's own
`restore_file` / `restore_clip`, so results are those of the plain run. A task that fails is tried
once more, on another actor where there is one; a file that fails twice is reported with its reason.
An actor that dies (the OOM killer) is replaced by a fresh one, not restarted by Ray. Long clips are
split into segments (segments.py: their folder, lock and records).
Inputs and outputs must be at the same paths on every node (shared storage).

Ray is an optional dependency: pip install .[cluster]  (or -r requirements-cluster.txt).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..devices import resolve_device
from .jobs import is_video, keep_freed_memory, load_models, restore_clip, restore_file
from .segments import Segment, SegmentFolder, segment_folder
from .video import VideoSummary, join_segments

ATTEMPTS = 2  # a file is tried this many times before it is reported failed
# CPU actors run more torch threads than their slots; OpenMP threads that spin while they wait for work
# would then take the cores from each other (2 actors x 2 threads on 2 cores: 8.5 s a GPEN-512 face
# instead of 3.5), so they sleep instead (1% slower alone).
CPU_ACTOR_ENV = {"env_vars": {"OMP_WAIT_POLICY": "PASSIVE"}}


def import_ray():
    """The ray module, or an ImportError that says how to install it."""
    try:
        import ray
    except ImportError:
        raise ImportError("--ray needs Ray: pip install .[cluster]  (or pip install -r requirements-cluster.txt)") \
            from None
    return ray


class Worker:
    """A Ray actor: the model and detector loaded once, then any number of files restored."""

    def __init__(self, args, threads: int = 0):
        if threads > 0:  # actors sharing a machine must not each take every core (see pool_shape)
            torch.set_num_threads(min(threads, os.cpu_count() or threads))
        keep_freed_memory()
        self.args = args
        self.detect = args.face_align and not args.aligned
        self.device = resolve_device(args.device)
        self.model, self.detector = load_models(args, self.device, self.detect)

    def restore(self, task, overwrite: bool, info=None):
        """Restore one file (photo or clip) into its target, atomically, and return the summary line;
        or one segment of a clip into its file, and return its VideoSummary."""
        if isinstance(task, Segment):
            return task.restore(self, info)
        if task.target.exists() and not overwrite:  # finished by an earlier attempt, or another run
            return f"skipped: {task.target} exists (--overwrite replaces it)"
        if is_video(task.source):
            return str(restore_clip(task, self.model, self.detector, self.args, info, task.source.name))
        return restore_file(task, self.model, self.detector, self.args)


def plan_tasks(jobs: list, videos: dict, seconds: float, actors: int = 1, chunk: int = 1, made_with=None) -> list:
    """The jobs, with each clip longer than 1.5 x `seconds` split into segments of about `seconds`
    (0: never split); into a multiple of `actors` of them where that keeps them at least half as long,
    so that no actor waits out the last round. Segments start on multiples of `chunk`, where the whole
    run's chunks start too, so that what is smoothed within a chunk (masks) is as in the whole run.
    Each segment carries `made_with(job)` (a JSON-able record of what decides its pixels), which a
    segment left by an earlier run must have been made with to be reused."""
    tasks = []
    for job in jobs:
        info = videos.get(job)
        length = round(seconds * info.rate) if info is not None else 0
        if not length or info.frames <= 1.5 * length:
            tasks.append(job)
            continue
        folder = segment_folder(job.target)
        made = json.dumps(made_with(job) if made_with else {}, sort_keys=True, default=str)
        count = round(info.frames / length)
        pooled = -(-count // actors) * actors
        count = pooled if info.frames / pooled >= length / 2 else count
        starts = {round(i * info.frames / count / chunk) * chunk for i in range(count)}
        bounds = sorted({start for start in starts if start < info.frames} | {info.frames})
        tasks += [Segment(job, range(a, b), folder / f"{a:09d}-{b:09d}{job.target.suffix}", made)
                  for a, b in zip(bounds, bounds[1:])]
    return tasks


def claim_folders(tasks: list, overwrite: bool, report=None) -> tuple[list, list]:
    """The tasks of the clips whose segment folders this run now holds (SegmentFolder.claim), and those
    folders, to release once the run ends; a clip whose folder another run holds, or that a file is in
    the way of, fails by name."""
    folders, refused = [], set()
    for job in dict.fromkeys(task.job for task in tasks if isinstance(task, Segment)):
        folder = SegmentFolder(job.target)
        try:
            folder.claim([task for task in tasks if job_of(task) is job], overwrite)
        except (ValueError, OSError) as e:
            refused.add(job)
            if report is not None:
                report.fail(job, e)
            continue
        folders.append(folder)
    return [task for task in tasks if job_of(task) not in refused], folders


# Options that say how a run is carried out, not what its results hold.
RUN_OPTIONS = {"inputs", "legacy_inputs", "output", "overwrite", "ray", "ray_actors", "ray_cpus_per_actor",
               "max_megapixels", "face_batch"}


def made_with(args, job) -> dict:
    """What decides a clip's restored pixels: the restore options, and the size and time of its source
    and of the model, detector and parser files given by path."""
    made = {name: value for name, value in sorted(vars(args).items()) if name not in RUN_OPTIONS}
    parsers = [(f"parser_file_{i}", path) for i, path in enumerate(getattr(args, "parser", None) or ())]
    for name, path in (("source", job.source), ("model_file", getattr(args, "model", None)),
                       ("detector_file", getattr(args, "detector", None)),
                       ("upscaler_file", getattr(args, "upscaler", None)), *parsers):
        if path and Path(path).is_file():
            stat = Path(path).stat()
            made[name] = [str(Path(path).resolve()), stat.st_size, stat.st_mtime_ns]
    return made


@dataclass
class Outcome:
    """What happened to one task: 'done', or 'failed' with the reasons of each attempt."""

    task: object
    status: str = "pending"
    summary: object = ""
    errors: list[str] = field(default_factory=list)
    actors: list[int] = field(default_factory=list)  # the pool slots it ran on


def pool_shape(ray, address: str | None, cpus_per_actor: int) -> tuple[int, dict, int]:
    """How many actors, the resources each asks for, and its torch threads (0: torch's default): one
    GPU each where the cluster has GPUs, else `cpus_per_actor` CPUs each, as many as the cluster's CPUs
    allow, each with twice that many threads that wait passively (CPU_ACTOR_ENV). While every actor is
    busy they share the cores at the same throughput as one thread a slot (measured); when the last
    files of a run leave slots idle, the actors still running use them."""
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    if gpus > 0:
        return gpus, {"num_gpus": 1, "num_cpus": 1}, 0
    cpus = int(resources.get("CPU", 1))
    resources = {"num_cpus": cpus_per_actor, "runtime_env": CPU_ACTOR_ENV}
    return max(1, cpus // cpus_per_actor), resources, 2 * cpus_per_actor


def pool_label(resources: dict, threads: int) -> str:
    """What each actor has, for the run's first line: its GPU, or its CPU slots and torch threads."""
    if "num_gpus" in resources:
        return f"{resources['num_gpus']} GPU"
    return f"{resources['num_cpus']} CPU slot(s), {threads} torch threads"


def connect(address: str | None, num_cpus: int | None = None):
    """ray.init for `address` ('local' or None: a Ray on this machine; else a cluster's address),
    unless this process is connected already (a test's ray.init, a notebook's)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address in (None, "", "local"):
        root = str(Path(__file__).resolve().parents[2])  # workers import gpen from this checkout too
        path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH", "")) if p)
        ray.init(num_cpus=num_cpus or os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path}})
    else:
        ray.init(address=address, log_to_driver=False)
    return ray


def run_on_ray(jobs: list, args, address: str | None = "local", report=None, videos: dict | None = None,
               task_timeout: float | None = None) -> dict:
    """Restore `jobs` (the CLI's planned and admitted Jobs) on a pool of Ray actors.

    Clips longer than `args.ray_segment` seconds are split into segments (see plan_tasks), in a
    folder this run holds until it ends (claim_folders), restored like files, checked against their
    records and joined here, in order, with the clip's audio, once all are done. Returns
    {task: Outcome} (a task is a Job, or a Segment of one); what becomes of each job is told to
    `report` (the CLI's Report) as it happens. A task that raises, or runs past `task_timeout`
    seconds, is retried once (on another actor when the pool has several); a task that fails twice
    fails its file, reported with both reasons.
    """
    ray = connect(address, getattr(args, "ray_cpus", None))
    cpus_per_actor = max(1, getattr(args, "ray_cpus_per_actor", 1) or 1)
    size, resources, threads = pool_shape(ray, address, cpus_per_actor)
    size = max(1, min(size, getattr(args, "ray_actors", 0) or size))
    tasks = plan_tasks(jobs, videos or {}, getattr(args, "ray_segment", 0), size, getattr(args, "chunk", 1),
                       lambda job: made_with(args, job))
    tasks, folders = claim_folders(tasks, bool(args.overwrite), report)
    try:
        if not tasks:
            return {}
        actor_class = pool_class(ray, Worker, resources)
        scheduler = Scheduler(ray, lambda: actor_class.remote(args, threads), tasks, bool(args.overwrite),
                              videos or {}, report, task_timeout)
        scheduler.start(min(size, len(tasks)), pool_label(resources, threads))
        try:
            while scheduler.busy():
                scheduler.dispatch()
                scheduler.collect()
                scheduler.expire()
        finally:
            scheduler.stop()
        return scheduler.outcomes
    finally:
        for folder in folders:
            folder.lock.release()


def pool_class(ray, cls, resources: dict):
    """`cls` as the pool's actor class. Ray does not restart its actors: a task sent to one while it
    restarts (loading its model again) fails at once, so a retry would fail there too; the Scheduler
    replaces a dead actor with a fresh one itself, and retries its task on another."""
    return ray.remote(**resources, max_restarts=0, max_task_retries=0)(cls)


def job_of(task):
    return task.job if isinstance(task, Segment) else task


class Scheduler:
    """A run's tasks on a pool of actors, one step at a time: the tasks waiting (retries first), the
    actors idle, the tasks running, and what became of each task and job."""

    def __init__(self, ray, new_actor, tasks: list, overwrite: bool, videos: dict, report=None,
                 task_timeout: float | None = None):
        self.ray, self.new_actor = ray, new_actor
        self.overwrite, self.videos, self.report, self.task_timeout = overwrite, videos, report, task_timeout
        self.outcomes = {task: Outcome(task) for task in tasks}
        self.segments: dict = {}  # job -> its segments, for the clips split
        for task in tasks:
            if isinstance(task, Segment):
                self.segments.setdefault(task.job, []).append(task)
        self.began = {job_of(task): time.monotonic() for task in tasks}
        self.ended: set = set()  # jobs reported done, skipped or failed
        self.queue = list(tasks)
        self.actors: list = []
        self.idle: list[int] = []  # slots in self.actors
        self.running: dict = {}  # ObjectRef -> (task, slot, started)

    def start(self, size: int, label: str) -> None:
        self.actors = [self.new_actor() for _ in range(size)]
        self.idle = list(range(size))
        print(f"ray: {size} actor(s), each {label}", file=sys.stderr, flush=True)

    def busy(self) -> bool:
        return bool(self.queue or self.running)

    def dispatch(self) -> None:
        """Hand waiting tasks to idle actors, each the first task in line that it may run."""
        for slot in list(self.idle):
            task = next((task for task in self.queue if self.may_run(task, slot)), None)
            if task is None:
                continue
            self.queue.remove(task)
            self.idle.remove(slot)
            ref = self.actors[slot].restore.remote(task, self.overwrite, self.videos.get(job_of(task)))
            self.outcomes[task].actors.append(slot)
            self.running[ref] = (task, slot, time.monotonic())

    def may_run(self, task, slot: int) -> bool:
        """A task tried before waits for a slot that has not tried it, while the pool has one: where it
        failed (its actor killed by the OOM killer, say), it would likely fail again."""
        tried = self.outcomes[task].actors
        return slot not in tried or len(set(tried)) >= len(self.actors)

    def collect(self, timeout: float = 1.0) -> None:
        """Wait up to `timeout` seconds for a task to end, and take in what it returned or raised."""
        ready, _ = self.ray.wait(list(self.running), num_returns=1, timeout=timeout)
        for ref in ready:
            task, slot, _ = self.running.pop(ref)
            self.idle.append(slot)
            try:
                summary = self.ray.get(ref)
            except self.ray.exceptions.RayActorError as e:
                self.replace(slot)
                self.retry(task, slot, f"worker lost: {_reason(e)}")
            except self.ray.exceptions.RayTaskError as e:
                self.retry(task, slot, _reason(e))
            else:
                self.finish(task, summary)

    def expire(self) -> None:
        """Fail the tasks running past task_timeout; a fresh actor takes each one's place."""
        if self.task_timeout is None:
            return
        now = time.monotonic()
        for ref, (task, slot, started) in list(self.running.items()):
            if now - started > self.task_timeout:
                self.running.pop(ref)
                self.replace(slot)
                self.idle.append(slot)
                self.retry(task, slot, f"ran past {self.task_timeout:g} s")

    def replace(self, slot: int) -> None:
        """A fresh actor in the place of one that died or hangs."""
        self.ray.kill(self.actors[slot], no_restart=True)
        self.actors[slot] = self.new_actor()

    def retry(self, task, slot: int | None, reason: str) -> None:
        """A failed attempt (on actor `slot`, or at the join): the task waits first in line, or, after
        ATTEMPTS, fails its job."""
        outcome = self.outcomes[task]
        outcome.errors.append(reason)
        job = job_of(task)
        name = task.label if task is not job else job.source.name
        if len(outcome.errors) < ATTEMPTS:
            where = f"on actor {slot}" if slot is not None else "at the join"
            print(f"ray: {name} failed {where} ({reason}); trying again", file=sys.stderr, flush=True)
            self.queue.insert(0, task)
            return
        outcome.status = "failed"
        self.fail(job, RuntimeError(f"{'' if task is job else name + ' '}failed {len(outcome.errors)} times: "
                                    + "; ".join(outcome.errors)))

    def fail(self, job, error: Exception) -> None:
        if job in self.ended:
            return
        self.ended.add(job)
        self.queue = [task for task in self.queue if job_of(task) is not job]  # its other segments are no use now
        if self.report is not None:
            self.report.fail(job, error)

    def finish(self, task, summary) -> None:
        """A task done: a file's job is told to the report; a clip's, once all its segments are done, joined."""
        outcome = self.outcomes[task]
        outcome.summary, outcome.status = summary, "done"
        job = job_of(task)
        if job in self.ended:
            return
        if task is not job:
            if all(self.outcomes[part].status == "done" for part in self.segments[job]):
                self.join(job)
            return
        self.ended.add(job)
        if summary.startswith("skipped: "):
            outcome.status = "skipped"
            if self.report is not None:
                self.report.skip(job, summary.removeprefix("skipped: "))
        elif self.report is not None:
            self.report.done(job, summary)

    def join(self, job) -> None:
        """Join a clip's segments, each checked against its record first: one that does not check out,
        or that the join cannot read, is restored again (a retry), not joined."""
        parts = self.segments[job]
        for part in parts:
            try:
                self.outcomes[part].summary = part.check()
            except ValueError as e:
                self.redo(part, str(e))
            if job in self.ended:  # a segment failed its last attempt: so has the clip
                return
        if any(self.outcomes[part].status != "done" for part in parts):
            return
        try:
            notes = join_segments([part.path for part in parts], job.source, job.target, self.overwrite)
        except Exception as e:
            unreadable = [part for part in parts if getattr(e, "filename", None) == str(part.path)]
            if unreadable:  # kept, it would fail every rerun's join too
                return self.redo(unreadable[0], f"it cannot be read back: {e}")
            if isinstance(e, (ValueError, OSError)):
                return self.fail(job, e)
            return self.fail(job, RuntimeError(f"{job.target}: the segments could not be joined ({e})"))
        total = VideoSummary(job.source, job.target, notes=notes)
        for part in parts:
            total.add(self.outcomes[part].summary)
        total.seconds = time.monotonic() - self.began[job]
        shutil.rmtree(segment_folder(job.target), ignore_errors=True)  # its lock is released after the run
        self.ended.add(job)
        if self.report is not None:
            self.report.done(job, f"{total} (in {len(parts)} segments)")

    def redo(self, part: Segment, reason: str) -> None:
        """A segment found wrong at the join: removed, and restored again (a retry)."""
        part.discard()
        self.outcomes[part].status = "pending"
        self.retry(part, None, reason)

    def stop(self) -> None:
        for actor in self.actors:
            self.ray.kill(actor, no_restart=True)


def _reason(error: Exception) -> str:
    """The worker's own exception message, without Ray's traceback wrapping."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, BaseException):
        return str(cause) or type(cause).__name__
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
