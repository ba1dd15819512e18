"""python -m gpen bench --acceptance: the GPU acceptance check, run here in its quick CPU mode so that it
cannot rot between GPU runs, and the parts of it that decide what a GPU run reports."""

import argparse
import json
import os
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch
from torch import nn

from gpen.apps import acceptance
from gpen.apps.acceptance import DTYPE_NAMES, FULL, QUICK, SECTIONS, Context, Outcome, Skip
from gpen.apps.cli import add_bench_arguments, main
from gpen.apps.plain_gpen import plain_forward
from gpen.loader import load_model

ROOT = Path(__file__).resolve().parents[1]


def test_the_quick_mode_runs_every_section_and_writes_its_rows(shared, tmp_path):
    done = subprocess.run([sys.executable, "-m", "gpen", "bench", "--acceptance", "--device", "cpu", "--quick",
                           "--out", str(tmp_path)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    report = json.loads((tmp_path / "acceptance-cpu.json").read_text())
    rows = report["rows"]
    assert {row["section"] for row in rows} == set(SECTIONS)
    assert [row for row in rows if row["status"] == "FAIL"] == []
    skipped = [row for row in rows if row["status"] == "skip"]
    assert all("Ray is not installed" in row["result"] for row in skipped), skipped
    ray = next(row for row in rows if "--ray local" in row["check"])
    assert ray in skipped or ray["result"].startswith("ray: 1 actor(s), each 1 CPU slot(s)")
    by_check = {row["check"]: row for row in rows}
    assert by_check["out of memory: GPEN-32, 8 faces in one batch"]["figures"]["batches"] == [8, 4, 2, 2, 2, 2]
    assert "every part on cpu" in by_check["320x240 frame, the group photo tiled"]["result"]
    assert by_check["GPEN-32 reference computation fp32"]["figures"]["relative_error"] < 1e-4
    auto = by_check["GPEN-32 default dtype (auto)"]  # tiny CPU timings are noise: shown, not judged
    assert auto["status"] == "ok" and auto["met"] == "not judged (not a full GPU run)"
    assert auto["figures"]["auto"] == "fp32" and set(auto["figures"]["ms_per_face"]) == set(DTYPE_NAMES)
    assert [row["section"] for row in rows][-6:] == ["compile"] * 2 + ["goals"] * 4  # torch.compile last
    assert report["progress"] == f"complete: {len(rows)} checks" and report["complete"]
    counted = by_check["GPEN working memory: counted vs measured"]["figures"]["GPEN-32 batch 4"]
    assert counted["working_bytes"] == counted["device_tensor_bytes"] > 0  # the meta count, the real forward's
    markdown = (tmp_path / "acceptance-cpu.md").read_text().splitlines()
    assert markdown[0].startswith("### Acceptance: cpu") and "quick mode" in markdown[0]
    assert markdown[0].endswith(f"(complete: {len(rows)} checks)")
    assert len([line for line in markdown if line.startswith("| ")]) == len(rows) + 1  # the header, a line a row
    assert f"{len(rows)} checks in" in done.stdout and ": 0 failed" in done.stdout
    assert "[compile] GPEN-32 fp16 torch.compile\n  ok in " in done.stderr  # each check's seconds, as it goes


def test_past_the_budget_a_check_is_a_skip_row_the_goals_run_and_the_reports_keep_every_row(tmp_path):
    now = [0.0]
    context = Context(torch.device("cpu"), QUICK, budget=60, clock=lambda: now[0])
    json_path, md_path = acceptance.report_paths(context, tmp_path)
    progress_seen, goals_seen = [], []

    def fast():
        context.figures["overhead",] = 0.1
        return Outcome("took 0 s")

    def slow():
        report = json.loads(json_path.read_text())  # the first row is in already, and the goals so far
        progress_seen.append(report["progress"])
        goals_seen.extend((row["check"], row["result"]) for row in report["goals_so_far"])
        now[0] += 61
        return Outcome("took 61 s")

    def never():
        pytest.fail("a check past the budget was run")

    sections = {"speed": lambda c: [("fast", fast), ("slow", slow), ("late", never)],
                "memory": lambda c: [("later", never)], "goals": acceptance.goal_checks}
    rows = acceptance.run_sections(context, sections,
                                   report=lambda rows, planned: acceptance.write_reports(rows, planned, context,
                                                                                         tmp_path))
    assert [(row["check"], row["status"]) for row in rows[:4]] == [
        ("fast", "ok"), ("slow", "ok"), ("late", "skip"), ("later", "skip")]
    assert rows[2]["result"] == "not run: past the time budget of 60 s (--budget)"
    assert [(row["section"], row["status"]) for row in rows[4:]] == [("goals", "skip")] * 3 + [("goals", "ok")]
    assert rows[4]["result"] == ("not measured: the speed row it comes from failed or was not run (past the time "
                                 "budget)")
    assert rows[7]["result"] == "10.0% of the frame's time outside GPEN and the parser"  # measured before it
    assert progress_seen == ["partial: 1 of 8 checks"]
    assert goals_seen == [("GPEN-32 fp16 batch 4, ms per face", "not measured yet"),
                          ("GPEN-32 against the reference's computation", "not measured yet"),
                          ("GPEN-32 fp16 batch 1, peak memory", "not measured yet"),
                          ("pipeline overhead, one face a 1080p frame",
                           "10.0% of the frame's time outside GPEN and the parser")]
    report = json.loads(json_path.read_text())
    assert (report["progress"], report["checks_done"], report["budget_s"]) == ("complete: 8 checks", 8, 60)
    assert report["goals_so_far"] == []  # the goals' own rows are in
    markdown = md_path.read_text()
    assert markdown.splitlines()[0].endswith("(complete: 8 checks)") and "so far" not in markdown
    assert sorted(path.name for path in tmp_path.iterdir()) == ["acceptance-cpu.json", "acceptance-cpu.md"]


def quick_run(out: Path, *flags: str) -> tuple[subprocess.CompletedProcess, list[dict]]:
    """`python -m gpen bench --acceptance --device cpu --quick FLAGS` into `out`: the process and its rows."""
    done = subprocess.run([sys.executable, "-m", "gpen", "bench", "--acceptance", "--device", "cpu", "--quick",
                           *flags, "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    return done, json.loads((out / "acceptance-cpu.json").read_text())["rows"]


def test_a_budget_of_zero_runs_nothing_but_the_goals(tmp_path):
    done, rows = quick_run(tmp_path, "--budget", "0")
    assert {row["status"] for row in rows} == {"skip"}
    assert {row["section"] for row in rows if "past the time budget of 0 s" in row["result"]} == set(SECTIONS) - {
        "goals"}
    assert "a budget of 0 s (--budget)" in done.stderr


@pytest.fixture
def h200(monkeypatch):
    """A Context of the full plan on "cuda", with a GPU of compute capability 9.0 answering: precision auto
    is fp16 there. No GPU is touched: the checks given it only read figures."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    return Context(torch.device("cuda"), FULL)


def only(context: Context, check) -> dict:
    """The row of one check run as the acceptance run runs it."""
    return acceptance.run_sections(context, {"speed": lambda c: [("the check", lambda: check(c))]})[0]


def test_precision_auto_is_judged_against_the_fastest_dtype_that_passed_parity(h200):
    def row(fp16_ms: float, bf16_ms: float, fp16_error: float = 2e-3) -> dict:
        h200.figures = {("parity", 2048, "fp32"): 1e-6, ("parity", 2048, "fp16"): fp16_error,
                        ("parity", 2048, "bf16"): 1e-2, ("ms", 2048, "fp32", 4): 40.0,
                        ("ms", 2048, "fp16", 4): fp16_ms, ("ms", 2048, "bf16", 4): bf16_ms}
        return only(h200, lambda context: acceptance.default_dtype(context, 2048))

    fastest = row(fp16_ms=10.0, bf16_ms=10.3)
    assert (fastest["status"], fastest["met"]) == ("ok", "yes")
    assert row(fp16_ms=10.4, bf16_ms=10.0)["met"] == "yes"  # within 5% of the fastest
    slower = row(fp16_ms=12.0, bf16_ms=10.0)
    assert (slower["status"], slower["met"]) == ("FAIL", "NO")
    assert slower["result"].startswith("auto is fp16; fastest that passed parity: bf16")
    garbage = row(fp16_ms=8.0, bf16_ms=10.0, fp16_error=0.5)  # the fastest, but its faces are not GPEN's
    assert garbage["status"] == "FAIL" and "fp16 failed parity (5.0e-01)" in garbage["result"]
    h200.figures = {}
    missing = only(h200, lambda context: acceptance.default_dtype(context, 2048))
    assert (missing["status"], missing["result"]) == (
        "FAIL", "LookupError: not measured: the parity and speed rows of GPEN-2048 it comes from failed")


def test_bf16_is_measured_only_on_a_gpu_that_computes_in_it(h200, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation)
    assert acceptance.usable_dtypes(h200, DTYPE_NAMES) == ("fp32", "fp16")  # torch would only emulate it
    row = only(h200, lambda context: acceptance.gpen_speed(context, 2048, "bf16"))
    assert (row["status"], row["result"]) == ("skip", "this GPU has no bf16")


def test_fp32_parity_is_computed_without_tf32_and_torchs_setting_is_given_back():
    flags = []

    class Records(nn.Module):
        def forward(self, x):
            flags.append((torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32))
            return x * 2

    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    outcome = acceptance.network_parity(Context(torch.device("cpu"), QUICK), Records(), 8, ("fp32",), "test")
    assert outcome.ok and flags == [(False, False)] * 2  # the CPU's reference and the device's copy
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


def test_the_device_to_host_copies_are_the_gpus_and_a_profile_without_gpu_events_is_no_count():
    event = namedtuple("Event", "name device_type")
    gpu, cpu = torch.autograd.DeviceType.CUDA, torch.autograd.DeviceType.CPU
    events = [event("Memcpy DtoH (Device -> Pageable)", gpu), event("Memcpy HtoD (Pageable -> Device)", gpu),
              event("cudaMemcpyAsync", cpu), event("Memcpy DtoH (Device -> Pinned)", gpu)]
    assert acceptance.count_copies(events) == 2
    with pytest.raises(RuntimeError, match="no GPU activity"):  # CUPTI could not trace: not "0 copies"
        acceptance.count_copies([event("aten::conv2d", cpu)])


def test_a_section_or_check_that_raises_is_one_failed_row_and_the_rest_still_run():
    def broken_section(context):
        raise RuntimeError("the section could not list its checks\nand a second line")

    def raising():
        raise ValueError("CUDA error: an illegal memory access was encountered\nmore")

    def skipped():
        raise Skip("Ray is not installed")

    sections = {"first": broken_section,
                "second": lambda context: [("raises", raising), ("passes", lambda: Outcome("fine")),
                                           ("misses its bound", lambda: Outcome("2e-1 > 2e-2", ok=False)),
                                           ("skips", skipped)]}
    rows = acceptance.run_sections(Context(torch.device("cpu"), QUICK), sections)
    assert [(row["section"], row["status"]) for row in rows] == [
        ("first", "FAIL"), ("second", "FAIL"), ("second", "ok"), ("second", "FAIL"), ("second", "skip")]
    assert rows[0]["result"] == "RuntimeError: the section could not list its checks"
    assert rows[1]["result"] == "ValueError: CUDA error: an illegal memory access was encountered"


def test_a_network_whose_half_precision_overflows_fails_its_parity_row():
    class Squares(nn.Module):  # fine in float32; float16 tops out at 65504
        def forward(self, x):
            return (x * 1000) ** 2

    outcome = acceptance.network_parity(Context(torch.device("cpu"), QUICK), Squares(), 8, ("fp32", "fp16"), "test")
    assert not outcome.ok and outcome.figures["fp32_relative_error"] == 0
    assert outcome.figures["fp16_relative_error"] == float("inf") and "fp16 inf" in outcome.result


def test_the_reference_computation_reproduces_the_reference_outputs(shared, reference_io):
    model = load_model(shared / "fixtures" / "gpen_random_64.pth", device="cpu").network
    with torch.inference_mode():
        assert (plain_forward(model, reference_io["input"]) - reference_io["output"]).abs().max() < 1e-5


def test_the_goals_are_judged_on_a_full_gpu_run_only():
    figures = {("ms", 2048, "fp16", 4): 14.0, ("compiled", 2048): 12.5, ("plain", 2048): 150.0,
               ("peak", 2048, 1): 2500.0, ("overhead",): 0.2}
    on_gpu = Context(torch.device("cuda"), FULL)  # no GPU is touched: the goals only read figures
    on_gpu.figures = figures
    rows = acceptance.run_sections(on_gpu, {"goals": acceptance.goal_checks})
    assert [(row["check"], row["met"]) for row in rows] == [
        ("GPEN-2048 fp16 batch 4, ms per face", "yes"),  # eager, as the restorer runs it: 14 ms
        ("GPEN-2048 against the reference's computation", "yes"),  # 150 / 14 = 10.7x
        ("GPEN-2048 fp16 batch 1, peak memory", "yes"),
        ("pipeline overhead, one face a 1080p frame", "NO")]
    assert rows[0]["result"] == "14.00 ms per face, eager; torch.compile 12.50 (not used by the restorer)"
    on_gpu.figures[("ms", 2048, "fp16", 4)] = 16.0  # compiled would pass; what users run does not
    assert [row["met"] for row in acceptance.run_sections(on_gpu, {"goals": acceptance.goal_checks})[:2]] == ["NO"] * 2
    quick = Context(torch.device("cpu"), QUICK)
    quick.figures = {("ms", 32, "fp16", 4): 50.0}
    rows = acceptance.run_sections(quick, {"goals": acceptance.goal_checks})
    assert rows[0]["met"] == "not judged (not a full GPU run)" and rows[0]["status"] == "ok"
    assert rows[1]["status"] == "FAIL" and "not measured: the speed row" in rows[1]["result"]


def test_on_a_gpu_the_batch_forced_past_the_memory_halves_and_completes(monkeypatch):
    """The CUDA branch of the out-of-memory check, with torch.cuda's memory functions standing in: the
    allocator is held to what a batch of 2 took plus a quarter, and given back its whole memory after."""
    memory = {"allocated": 1000, "peak": 0, "fraction": 1.0}
    fractions = []

    def forward(self, x):  # a batch takes 100 a face; over the budget, the allocator runs out
        memory["peak"] = memory["allocated"] + 100 * len(x)
        if memory["peak"] > memory["fraction"] * 10_000:
            raise torch.OutOfMemoryError("CUDA out of memory (stand-in)")
        return x

    def set_fraction(fraction, device=None):
        memory["fraction"] = fraction
        fractions.append(fraction)

    monkeypatch.setattr(acceptance.GPEN, "forward", forward)
    monkeypatch.setattr(Context, "on_gpu", property(lambda self: True))
    stand_ins = {"synchronize": lambda: None, "empty_cache": lambda: None, "reset_peak_memory_stats": lambda: None,
                 "memory_allocated": lambda: memory["allocated"], "max_memory_allocated": lambda: memory["peak"],
                 "set_per_process_memory_fraction": set_fraction,
                 "get_device_properties": lambda device: type("Properties", (), {"total_memory": 10_000})}
    for name, stand_in in stand_ins.items():
        monkeypatch.setattr(torch.cuda, name, stand_in)
    outcome = acceptance.oom_back_off(Context(torch.device("cpu"), QUICK), 16)
    assert outcome.ok, outcome.result
    assert outcome.figures["batches"] == [8, 4, 2, 2, 2, 2]
    assert fractions == [(1000 + 1.25 * 200) / 10_000, 1.0]


def test_without_a_gpu_the_full_check_is_refused_and_the_quick_mode_named(capsys):
    assert main(["bench", "--acceptance", "--device", "cpu"]) == 1
    assert "--device cpu --quick" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:CUDA is not available, disabling CUDA profiling")
def test_a_profiler_that_cannot_see_the_gpu_leaves_the_pipeline_row_its_timings(shared, monkeypatch):
    """The GPU branch of the group-frame check on the CPU: torch's profiler has no CUDA to trace here."""
    monkeypatch.setattr(Context, "on_gpu", property(lambda self: True))
    outcome = acceptance.group_frame_check(Context(torch.device("cpu"), QUICK))
    assert outcome.ok and outcome.figures["ms_per_frame"] > 0
    assert outcome.figures["device_to_host_copies"].startswith("not counted: ")
    assert "; device-to-host copies not counted: " in outcome.result


def test_a_working_memory_the_meta_device_could_not_count_is_a_failed_row_that_says_so(monkeypatch):
    monkeypatch.setattr(acceptance, "forward_bytes", lambda *args: 0)  # as forward_bytes answers a failed count
    row = acceptance.run_sections(Context(torch.device("cpu"), QUICK),
                                  {"memory": lambda c: [("counted", lambda: acceptance.counted_memory(c))]})[0]
    assert row["status"] == "FAIL" and "not counted (the meta device could not run it" in row["result"]


def test_a_compile_check_starts_only_with_the_time_it_needs_left_in_the_budget():
    now = [0.0]
    context = Context(torch.device("cpu"), QUICK, budget=200, clock=lambda: now[0])

    def clip():
        now[0] += 100
        return Outcome("made")

    rows = acceptance.run_sections(context, {"video": lambda c: [("clip", clip)],
                                             "compile": lambda c: [("inductor", lambda: pytest.fail("started"))]})
    assert [row["status"] for row in rows] == ["ok", "skip"]  # 100 s left: compiling needs 120
    assert rows[1]["result"] == "not run: past the time budget of 200 s less the 120 s it needs (--budget)"


def test_a_second_run_can_take_only_the_sections_that_failed(tmp_path):
    _, rows = quick_run(tmp_path, "--sections", "memory")
    assert {row["section"] for row in rows} == {"memory", "goals"}  # the goals read what this run measured
    goals = {row["check"]: row for row in rows if row["section"] == "goals"}
    assert goals["GPEN-32 fp16 batch 1, peak memory"]["status"] == "ok"
    assert goals["GPEN-32 fp16 batch 4, ms per face"]["status"] == "skip"
    assert goals["GPEN-32 fp16 batch 4, ms per face"]["result"] == ("not measured: this run left out the speed "
                                                                   "section (--sections)")
    parser = argparse.ArgumentParser()
    add_bench_arguments(parser)  # the command's choices are the sections but the goals
    assert set(next(a for a in parser._actions if a.dest == "sections").choices) == set(SECTIONS) - {"goals"}


def test_the_device_script_runs_the_check_into_out_with_a_budget(tmp_path):
    """scripts/gpu_check.sh as a lent GPU machine runs it (here on the CPU, one section): the reports and the
    log land in $OUT, with the lease's budget unless one is given."""
    done = subprocess.run(["bash", "scripts/gpu_check.sh", "--device", "cpu", "--quick", "--sections", "memory"],
                          capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable})
    assert done.returncode == 0, done.stdout + done.stderr
    assert {"acceptance-cpu.json", "acceptance-cpu.md", "acceptance.log"} <= {p.name for p in tmp_path.iterdir()}
    log = (tmp_path / "acceptance.log").read_text()
    assert "a budget of 300 s (--budget)" in log and "8 checks in" in log
    assert json.loads((tmp_path / "acceptance-cpu.json").read_text())["budget_s"] == 300
