"""python -m gpen bench --acceptance: the GPU acceptance check, run here in its quick CPU mode so that it
cannot rot between GPU runs, and the parts of it that decide what a GPU run reports."""

import json
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

from gpen.apps import acceptance
from gpen.apps.acceptance import FULL, QUICK, SECTIONS, Context, Outcome, Skip
from gpen.apps.cli import main
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
    by_check = {row["check"]: row for row in rows}
    assert by_check["out of memory: GPEN-32, 8 faces in one batch"]["figures"]["batches"] == [8, 4, 2, 2, 2, 2]
    assert "every part on cpu" in by_check["320x240 frame, the group photo tiled"]["result"]
    assert by_check["GPEN-32 reference computation fp32"]["figures"]["relative_error"] < 1e-4
    counted = by_check["GPEN working memory: counted vs measured"]["figures"]["GPEN-32 batch 4"]
    assert counted["working_bytes"] == counted["device_tensor_bytes"] > 0  # the meta count, the real forward's
    markdown = (tmp_path / "acceptance-cpu.md").read_text().splitlines()
    assert markdown[0].startswith("### Acceptance: cpu") and "quick mode" in markdown[0]
    assert len([line for line in markdown if line.startswith("| ")]) == len(rows) + 1  # the header, a line a row
    assert "31 checks: 0 failed" in done.stdout


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
    figures = {("ms", 2048, "fp16", 4): 16.0, ("compiled", 2048): 12.5, ("plain", 2048): 150.0,
               ("peak", 2048, 1): 2500.0, ("overhead",): 0.2}
    on_gpu = Context(torch.device("cuda"), FULL)  # no GPU is touched: the goals only read figures
    on_gpu.figures = figures
    rows = acceptance.run_sections(on_gpu, {"goals": acceptance.goal_checks})
    assert [(row["check"], row["met"]) for row in rows] == [
        ("GPEN-2048 fp16 batch 4, ms per face", "yes"),  # torch.compile's 12.5 ms, kept
        ("GPEN-2048 against the reference's computation", "yes"),  # 150 / 12.5 = 12x
        ("GPEN-2048 fp16 batch 1, peak memory", "yes"),
        ("pipeline overhead, one face a 1080p frame", "NO")]
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
