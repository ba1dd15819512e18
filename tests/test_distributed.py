"""python -m gpen restore --ray, on a local Ray (ray.init(num_cpus=2)) against a local folder."""

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch

ray = pytest.importorskip("ray", reason="--ray needs Ray: pip install .[cluster]")
av = pytest.importorskip("av", reason="video needs PyAV (pip install av)")

from gpen.apps import cli, jobs  # noqa: E402
from gpen.apps.jobs import Job  # noqa: E402
from gpen.apps.video import probe_video  # noqa: E402
from gpen.files.images import read_image, write_image  # noqa: E402
from tests.helpers import random_gpen  # noqa: E402
from tests.test_segments import flip_a_byte, worker_for  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def gpen64(tmp_path_factory):
    path = tmp_path_factory.mktemp("weights") / "GPEN-random-64.pth"
    torch.save(random_gpen(64, 1, 0.125).state_dict(), path)
    return path


@pytest.fixture
def restore(monkeypatch, shared, gpen64):
    """python -m gpen restore, in this process, with the random GPEN-64 and the shared detector."""
    monkeypatch.setattr(jobs, "keep_freed_memory", lambda: None)
    detector = shared / "models" / "retinaface_mobilenet0.25.pth"
    return lambda *args: cli.main(["restore", *map(str, args), "--model", str(gpen64), "--detector", str(detector),
                                   "--detect-size", "640", "--max-faces", "3"])


@pytest.fixture(scope="module")
def photos(shared, tmp_path_factory):
    import cv2

    folder = tmp_path_factory.mktemp("in")
    bgr = cv2.imread(str(shared / "images" / "solvay_1927.png"), cv2.IMREAD_COLOR)
    for i in range(3):
        write_image(folder / f"photo{i}.png", bgr[:300, 60 * i:60 * i + 400, ::-1] / 255)
    return folder


def like_the_actors(run):
    """The plain run with the actors' torch thread count (two a CPU slot, at most the machine's cores):
    the random-weight model amplifies the last-bit differences that another thread count gives, so only
    like is compared with like."""
    threads = torch.get_num_threads()
    torch.set_num_threads(min(2, os.cpu_count()))
    try:
        return run()
    finally:
        torch.set_num_threads(threads)


def test_photos_equal_the_plain_run_and_a_rerun_skips_them(restore, photos, tmp_path, capsys):
    assert like_the_actors(lambda: restore(photos, "-o", tmp_path / "plain")) == 0
    capsys.readouterr()
    assert restore(photos, "-o", tmp_path / "ray", "--ray", "local") == 0
    out = capsys.readouterr().out
    for i in range(3):
        assert f"photo{i}.png: restored " in out
        plain = read_image(tmp_path / "plain" / f"photo{i}.png")[0].astype(int)
        done = read_image(tmp_path / "ray" / f"photo{i}.png")[0].astype(int)
        assert np.abs(plain - done).max() <= 1
    assert sorted(os.listdir(tmp_path / "ray")) == ["photo0.png", "photo1.png", "photo2.png"]  # no temporary files
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir()}
    assert restore(photos, "-o", tmp_path / "ray", "--ray") == 0
    captured = capsys.readouterr()
    assert captured.out.count("skipped: ") == 3 and "3 of 3 file(s) skipped" in captured.err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir()} == stamps


def test_a_file_failing_twice_is_reported_by_name_and_the_others_complete(restore, photos, tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("photo0.png", "photo1.png"):
        (folder / name).write_bytes((photos / name).read_bytes())
    whole = (photos / "photo2.png").read_bytes()
    (folder / "cut.png").write_bytes(whole[:len(whole) // 3])  # its header passes; its pixels are not all there
    assert restore(folder, "-o", tmp_path / "out", "--ray", "local") == 1
    captured = capsys.readouterr()
    assert "cut.png failed on actor" in captured.err and "trying again" in captured.err
    (line,) = [line for line in captured.err.splitlines() if "] cut.png: failed: " in line]
    assert "failed 2 times: " in line and str(folder / "cut.png") in line
    assert "photo0.png: restored" in captured.out and "photo1.png: restored" in captured.out
    assert "1 of 3 file(s) failed" in captured.err
    assert sorted(os.listdir(tmp_path / "out")) == ["photo0.png", "photo1.png"]


def test_clips_keep_frame_count_timing_and_audio(restore, photos, tmp_path, capsys):
    from tests.test_video import audio_packets, make_clip, timing

    picture = (read_image(photos / "photo0.png")[0] * 255).round().astype(np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "a.mp4", picture, frames=6, size=(320, 240), step=2)
    make_clip(folder / "b.mkv", picture, frames=5, size=(320, 240), step=2, audio="libopus")
    assert restore(folder, "-o", tmp_path / "out", "--ray", "local", "--temporal-smoothing", 1, "--chunk", 2) == 0
    out = capsys.readouterr().out
    assert "a.mp4: 6 frames, " in out and "b.mkv: 5 frames, " in out
    for name in ("a.mp4", "b.mkv"):
        assert timing(tmp_path / "out" / name) == timing(folder / name)
        assert audio_packets(tmp_path / "out" / name) == audio_packets(folder / name)


def test_cpu_actors_take_idle_cores_and_wait_for_work_asleep():
    """Each actor on a CPU slot runs two torch threads, so that the last files of a run, when the other
    slots are idle, do not crawl on one core; its threads sleep while they wait, so that actors sharing
    the cores do not spin against each other."""
    from gpen.apps import distributed

    size, resources, threads = distributed.pool_shape(ray, "local", cpus_per_actor=1)
    assert (size, threads) == (2, 2) and resources["num_cpus"] == 1

    def environment():
        return os.environ.get("OMP_WAIT_POLICY"), os.environ.get("PYTHONPATH")

    wait_policy, path = ray.get(ray.remote(**resources)(environment).remote())
    assert wait_policy == "PASSIVE" and str(REPO) in path  # the job's own variables are kept


def test_without_ray_the_message_names_the_extra(monkeypatch, restore, photos, tmp_path, capsys):
    import builtins

    real_import = builtins.__import__

    def no_ray(name, *args, **kwargs):
        if name == "ray":
            raise ImportError("No module named 'ray'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_ray)
    assert restore(photos, "-o", tmp_path / "out", "--ray") == 1
    assert "pip install .[cluster]" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_long_clip_is_split_into_segments_restored_apart_and_joined(restore, photos, tmp_path, capsys):
    from tests.test_video import audio_packets, make_clip, timing

    picture = (read_image(photos / "photo0.png")[0] * 255).round().astype(np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    make_clip(folder / "long.mp4", picture, frames=30, size=(320, 240), step=2, gop=8)
    options = ["--temporal-smoothing", 1, "--chunk", 4, "--crf", 0]  # x264 at CRF 0 is lossless
    assert like_the_actors(lambda: restore(folder, "-o", tmp_path / "plain", *options)) == 0
    counts = capsys.readouterr().out.split("long.mp4: ")[1].split(" restored")[0]
    assert counts == "30 frames, 90 faces"
    assert restore(folder, "-o", tmp_path / "ray", "--ray", "local", "--ray-segment", 0.4, *options) == 0
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "long.mp4: " in line]
    assert f"long.mp4: {counts} restored, " in line and "(in 4 segments)" in line  # 3 of 10 frames, made 4 for 2 actors
    plain, done = tmp_path / "plain" / "long.mp4", tmp_path / "ray" / "long.mp4"
    assert timing(done) == timing(plain) and audio_packets(done) == audio_packets(folder / "long.mp4")
    with av.open(str(plain)) as a, av.open(str(done)) as b:
        gaps = [np.abs(x.to_ndarray(format="rgb24").astype(int) - y.to_ndarray(format="rgb24")).max()
                for x, y in zip(a.decode(video=0), b.decode(video=0))]
    assert len(gaps) == 30 and max(gaps) <= 1
    assert os.listdir(tmp_path / "ray") == ["long.mp4"]  # the segments are gone once joined


def test_clips_are_cut_into_segments_of_about_the_length_asked(tmp_path):
    from gpen.apps.distributed import Segment, plan_tasks
    from gpen.apps.video import VideoInfo

    jobs = [Job(1, tmp_path / "a.mp4", tmp_path / "out" / "a.mp4"), Job(2, tmp_path / "b.png", tmp_path / "b.png")]
    videos = {jobs[0]: VideoInfo(jobs[0].source, 320, 240, frames=250, rate=Fraction(25), time_base=Fraction(1, 25))}
    tasks = plan_tasks(jobs, videos, seconds=3)  # 75 frames: 250 / 75 = 3.3 segments
    assert [t.span for t in tasks[:-1]] == [range(0, 83), range(83, 167), range(167, 250)] and tasks[-1] is jobs[1]
    assert tasks[0].path == tmp_path / "out" / ".a.mp4.segments" / "000000000-000000083.mp4"
    assert all(isinstance(t, Segment) and t.job is jobs[0] for t in tasks[:-1])
    halves = plan_tasks(jobs, videos, seconds=3, actors=2)  # 4: no actor idle in the last round
    assert [t.span for t in halves[:-1]] == [range(0, 62), range(62, 125), range(125, 188), range(188, 250)]
    many = plan_tasks(jobs, videos, seconds=3, actors=64)  # 64 segments of 4 frames: no
    assert [t.span for t in many[:-1]] == [t.span for t in tasks[:-1]]
    aligned = plan_tasks(jobs, videos, seconds=3, chunk=16)  # where the whole run's chunks start
    assert [t.span for t in aligned[:-1]] == [range(0, 80), range(80, 160), range(160, 250)]
    assert plan_tasks(jobs, videos, seconds=8) == jobs  # under 1.5 segments: whole
    assert plan_tasks(jobs, videos, seconds=0) == jobs


def test_what_a_segment_is_made_with_is_the_options_and_the_files(tmp_path):
    from argparse import Namespace

    from gpen.apps.distributed import made_with

    source = tmp_path / "a.mp4"
    source.write_bytes(b"a clip")
    job = Job(1, source, tmp_path / "out" / "a.mp4")
    args = Namespace(strength=0.5, crf=16, model="GPEN-BFR-512", detector=None, output="out", ray="local", ray_actors=2)
    made = made_with(args, job)
    assert made["strength"] == 0.5 and made["model"] == "GPEN-BFR-512" and "output" not in made and "ray" not in made
    os.utime(source, ns=(0, 0))  # the source replaced or touched
    assert made_with(args, job) != made


class FakeRay:
    """Enough of Ray for the Scheduler alone: a task runs when it is waited for."""

    class exceptions:
        RayActorError = type("RayActorError", (Exception,), {})
        RayTaskError = type("RayTaskError", (Exception,), {})

    def wait(self, refs, num_returns, timeout):
        return refs[:num_returns], refs[num_returns:]

    def get(self, ref):
        return ref()

    def kill(self, actor, no_restart):
        actor.killed = True


def test_the_scheduler_retries_a_failed_file_on_another_actor_then_reports_it(tmp_path, capsys):
    from types import SimpleNamespace

    from gpen.apps.distributed import Scheduler
    from gpen.apps.jobs import Report

    def actor():
        def restore(task, overwrite, info):
            if task.source.name == "bad.png":
                return lambda: (_ for _ in ()).throw(FakeRay.exceptions.RayTaskError("cannot decode"))
            return lambda: "restored 1 face"
        return SimpleNamespace(restore=SimpleNamespace(remote=restore))

    jobs = [Job(1, tmp_path / "bad.png", tmp_path / "out" / "bad.png"),
            Job(2, tmp_path / "good.png", tmp_path / "out" / "good.png")]
    scheduler = Scheduler(FakeRay(), actor, jobs, overwrite=False, videos={}, report=Report(len(jobs)))
    scheduler.start(3, "1 CPU slot(s)")
    while scheduler.busy():
        scheduler.dispatch()
        scheduler.collect()
    scheduler.stop()
    bad, good = (scheduler.outcomes[job] for job in jobs)
    assert (bad.status, bad.actors, bad.errors) == ("failed", [0, 2], ["cannot decode", "cannot decode"])  # 1 was busy
    assert (good.status, good.summary) == ("done", "restored 1 face")
    captured = capsys.readouterr()
    assert "ray: bad.png failed on actor 0 (cannot decode); trying again" in captured.err
    assert "[1/2] bad.png: failed: failed 2 times: cannot decode; cannot decode" in captured.err
    assert "[2/2] good.png: restored 1 face" in captured.out
    assert all(actor.killed for actor in scheduler.actors)


def test_ray_restores_and_upscales_photos_and_segmented_clips(restore, photos, shared, tmp_path):
    from tests.test_video import audio_packets, make_clip

    picture = (read_image(photos / "photo0.png")[0] * 255).round().astype(np.uint8)
    folder = tmp_path / "in"
    folder.mkdir()
    write_image(folder / "photo.png", picture[:200, :240])
    make_clip(folder / "clip.mp4", picture, frames=12, size=(240, 200), step=2, gop=4)
    upscaler = shared / "fixtures" / "srvgg_x4_random.pth"
    assert restore(folder, "-o", tmp_path / "ray", "--ray", "local", "--ray-segment", 0.2, "--upscaler", upscaler,
                   "--upscale", 2, "--tile", 128) == 0
    assert read_image(tmp_path / "ray" / "photo.png")[0].shape == (400, 480, 3)
    joined = probe_video(tmp_path / "ray" / "clip.mp4")
    assert (joined.width, joined.height, joined.frames) == (480, 400, 12)
    assert audio_packets(tmp_path / "ray" / "clip.mp4") == audio_packets(folder / "clip.mp4")


def test_a_clip_whose_segments_another_run_holds_fails_by_name_and_nothing_of_it_is_touched(tmp_path, capsys):
    from argparse import Namespace

    from gpen.apps.distributed import run_on_ray
    from gpen.apps.jobs import Report
    from gpen.apps.segments import SegmentFolder
    from gpen.apps.video import VideoInfo

    jobs = [Job(i + 1, tmp_path / name, tmp_path / "out" / name) for i, name in enumerate(("a.mp4", "b.mp4"))]
    videos = {job: VideoInfo(job.source, 320, 240, frames=250, rate=Fraction(25), time_base=Fraction(1, 25))
              for job in jobs}
    first = SegmentFolder(jobs[0].target)  # a first run, restoring a.mp4 into the same output now
    first.claim([], overwrite=False)
    (first.path / "000000000-000000083.mp4").write_bytes(b"being written")
    in_the_way = tmp_path / "out" / ".b.mp4.segments"
    in_the_way.write_text("my notes")
    args = Namespace(overwrite=True, ray_segment=3, chunk=1, ray_cpus_per_actor=1, ray_actors=0, strength=0.5)
    assert run_on_ray(jobs, args, "local", Report(len(jobs)), videos) == {}  # nothing left to start actors for
    err = capsys.readouterr().err
    assert f"[1/2] a.mp4: failed: another run is restoring it into {jobs[0].target} now" in err
    assert f"[2/2] b.mp4: failed: {in_the_way} is in the way" in err
    assert (first.path / "000000000-000000083.mp4").read_bytes() == b"being written"
    assert in_the_way.read_text() == "my notes"
    first.lock.release()


def unreadable_but_recorded(segment):
    """What an encoder gone wrong would leave: a file that is no video, with a record that matches it."""
    import json

    from gpen.files.download import file_sha256

    segment.path.write_bytes(b"not a video" * 100)
    record = json.loads(segment.record.read_text())
    segment.record.write_text(json.dumps(dict(record, size=segment.path.stat().st_size,
                                              sha256=file_sha256(segment.path))))


@pytest.mark.parametrize("damage, reason", [
    (flip_a_byte, "its file is not the one recorded"),
    (unreadable_but_recorded, "it cannot be read back: "),
])
def test_a_segment_found_wrong_at_the_join_is_restored_again_not_joined(damage, reason, tmp_path, capsys):
    from types import SimpleNamespace

    from gpen.apps.distributed import Scheduler, plan_tasks
    from gpen.apps.jobs import Report
    from tests.test_video import make_clip

    source = make_clip(tmp_path / "a.mp4", frames=12, audio=None)
    job = Job(1, source, tmp_path / "out" / "a.mp4")
    info = probe_video(source)
    first, *others = tasks = plan_tasks([job], {job: info}, seconds=4 / 24)  # 3 segments of 4 frames
    first.path.parent.mkdir(parents=True)
    worker = worker_for(source, tmp_path / "out")
    damaged = []

    def actor():
        def restore(task, overwrite, info):
            def run():
                if task is others[-1] and not damaged:  # the first segment, damaged once it is done
                    damage(first)
                    damaged.append(first)
                return task.restore(worker, info)
            return run
        return SimpleNamespace(restore=SimpleNamespace(remote=restore))

    scheduler = Scheduler(FakeRay(), actor, tasks, overwrite=False, videos={job: info}, report=Report(1))
    scheduler.start(2, "1 CPU slot(s)")
    while scheduler.busy():
        scheduler.dispatch()
        scheduler.collect()
    captured = capsys.readouterr()
    assert f"ray: a.mp4 [0:4] failed at the join ({reason}" in captured.err and "trying again" in captured.err
    assert scheduler.outcomes[first].actors == [0, 1]  # restored again, on the other actor
    assert "[1/1] a.mp4: 12 frames, 12 faces restored" in captured.out and "(in 3 segments)" in captured.out
    assert probe_video(job.target).frames == 12 and os.listdir(tmp_path / "out") == ["a.mp4"]


def test_a_worker_killed_mid_task_is_replaced_and_its_task_retried_on_another(tmp_path, capsys):
    """The OOM killer ends an actor's process: its task goes to an actor that did not run it (not to
    the dead one, nor to one Ray restarts, which refuses tasks while it loads), and a fresh actor
    takes the dead one's place."""
    import time

    from gpen.apps.distributed import Scheduler, pool_class
    from gpen.apps.jobs import Report

    class SlowToStart:  # a Worker: a second to load its model; the first attempt at oom.png is killed
        def __init__(self, marker):
            time.sleep(1)
            self.marker = marker

        def restore(self, task, overwrite, info):
            if task.source.name == "oom.png" and not self.marker.exists():
                self.marker.touch()
                os._exit(1)
            time.sleep(3 if task.source.name == "slow.png" else 0)
            return f"restored by {os.getpid()}"

    actor_class = pool_class(ray, SlowToStart, {"num_cpus": 1})
    jobs = [Job(i + 1, tmp_path / name, tmp_path / "out" / name) for i, name in
            enumerate(("oom.png", "slow.png", "quick.png"))]
    scheduler = Scheduler(ray, lambda: actor_class.remote(tmp_path / "killed"), jobs, overwrite=False, videos={},
                          report=Report(len(jobs)))
    scheduler.start(2, "1 CPU slot(s)")
    try:
        while scheduler.busy():
            scheduler.dispatch()
            scheduler.collect()
        ping = Job(9, tmp_path / "ping.png", tmp_path / "ping.png")
        answers = ray.get([actor.restore.remote(ping, False, None) for actor in scheduler.actors])
    finally:
        scheduler.stop()
    oom, slow, quick = (scheduler.outcomes[job] for job in jobs)
    assert [oom.status, slow.status, quick.status] == ["done"] * 3
    assert oom.actors == [0, 1] and len(oom.errors) == 1 and oom.errors[0].startswith("worker lost: ")
    assert "ray: oom.png failed on actor 0 (worker lost: " in capsys.readouterr().err
    assert len(set(answers)) == 2  # two live actors: a fresh one in the dead one's place
