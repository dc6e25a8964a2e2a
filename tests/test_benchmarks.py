"""The benchmark scripts run end to end with tiny settings (their numbers are not checked here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from carvana_files import write_tiny_carvana

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--features", "4", "8", "--height", "32", "--width", "48", "--batch-size", "4"]


def run_script(*argv: str) -> str:
    result = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    return write_tiny_carvana(tmp_path_factory.mktemp("bench") / "data", cars=2)


def test_bench_train_reports_steps_memory_mfu_and_loader(tiny_data, tmp_path):
    out = run_script("benchmarks/bench_train.py", "--data-dir", str(tiny_data), *TINY, "--steps", "1",
                     "--warmup", "1", "--pairs", "1", "--images", "8", "--workers", "1",
                     "--peak-tflops", "1", "--json", str(tmp_path / "b.json"))
    assert "training step: img/s" in out and "loader, cached (epoch 2)" in out
    report = json.loads((tmp_path / "b.json").read_text())
    assert report["flops_per_image"] > 0 and report["peak_tflops"] == 1
    assert {"baseline", "project"} <= report["steps"][0].keys()
    assert report["steps"][0]["baseline"]["amp"] == "fp32"


def test_bench_epoch_times_baseline_and_project(tiny_data, tmp_path):
    out = run_script("benchmarks/bench_epoch.py", "--data-dir", str(tiny_data), "--cars", "2", *TINY,
                     "--repeats", "2", "--vary-seed", "--workers", "0", "--json", str(tmp_path / "e.json"))
    report = json.loads((tmp_path / "e.json").read_text())
    runs = report["runs"]
    assert runs[0]["baseline"]["wall_s"] > 0 and runs[0]["project"]["epoch_s"] is not None
    assert all(0 < run[side]["startup_s"] < run[side]["wall_s"] for run in runs for side in ("baseline", "project"))
    assert all(0 <= runs[0][side]["val_dice"] <= 1 for side in ("baseline", "project"))
    assert "validation Dice after the epoch" in out and "project - baseline:" in out
    assert "--seed 1" in report["commands"]["project"] and "--seed 1" in report["commands"]["baseline"]
    assert "benchmarks/baseline.py" in out and "--no-channels-last" in out


def test_gemm_yardstick_is_fp32_on_a_cpu_without_bf16_units(monkeypatch):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import common
    import utils
    monkeypatch.setattr(utils, "cpu_has_bf16_units", lambda: False)  # an AVX2 CPU: bf16 would be emulated
    assert common.gemm_dtype(common.torch.device("cpu")) == common.torch.float32
    monkeypatch.setattr(utils, "cpu_has_bf16_units", lambda: True)
    assert common.gemm_dtype(common.torch.device("cpu")) == common.torch.bfloat16


def test_bench_optimizer_times_both_adamw_kernels_on_the_same_unet():
    out = run_script("benchmarks/bench_optimizer.py", "--features", "4", "8", "--features", "8", "16",
                     "--repeats", "2", "--warmup", "1")
    rows = [line.split(" | ") for line in out.splitlines() if line.startswith("| 4 8") or line.startswith("| 8 16")]
    assert len(rows) == 2 and "bf16 units)" in out.splitlines()[0]
    assert all(float(row[2]) > 0 and float(row[3]) > 0 and row[4].endswith("x |") for row in rows)


def test_bench_checkpoint_times_both_ways_of_saving_and_leaves_nothing_behind(tmp_path):
    folder = tmp_path / "saves"
    out = run_script("benchmarks/bench_checkpoint.py", "--features", "4", "8", "--repeats", "2", "--dir", str(folder))
    cells = [line.strip("| ").split(" | ") for line in out.splitlines() if line.startswith("| ")]
    rows = {row[0]: [float(seconds) for seconds in row[1:]] for row in cells[1:]}  # below the header
    assert rows.keys() == {"before: two synchronous saves", "the writer"}
    assert all(blocked >= 0 and blocked <= on_disk for blocked, on_disk in rows.values())
    assert not folder.exists()  # its files removed


def run_bash_script(script: str, *argv: str, **knobs: str) -> None:
    """benchmarks/SCRIPT run on the CPU with its tiny knobs; the output ends the failure message."""
    result = subprocess.run(["bash", f"benchmarks/{script}", *argv], cwd=ROOT, env={**os.environ, **knobs},
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]


def test_gpu_sh_runs_end_to_end_on_the_cpu_with_tiny_knobs(tmp_path):
    # A lent GPU's minutes are few: its one command must not fail on what a CPU can find first.
    out = tmp_path / "out"
    run_bash_script("gpu.sh", DEVICE="cpu", CARS="2", SIZE="64x96", FEATURES="4 8", PAIRS="1", STEPS="2",
                    FULL_BATCH="1", IMAGES="16", EPOCH_BATCHES="8", COMPILE="0", WORKERS="1",
                    SYNTH=str(tmp_path / "synth"), OUT=str(out))
    report = (out / "gpu.md").read_text()
    assert "wrote 32 synthetic image/mask pairs (2 cars x 16 views, 64x96," in report and "(failed" not in report
    assert {p.name for p in out.glob("*.json")} == {"train-160x240.json", "train-1280x1918.json",
                                                     "epoch-160x240-b8.json"}


def test_gpu_recipe_runs_end_to_end_on_the_cpu_with_tiny_knobs(tmp_path):
    data = write_tiny_carvana(tmp_path / "data", cars=5, size=(96, 64))  # the recipe holds out 4 cars
    out = tmp_path / "out"
    run_bash_script("gpu_recipe.sh", str(data), SIZE="32x48", FEATURES="4 8", DEVICE="cpu", MINUTES="0.1",
                    OUT=str(out), RUN=str(tmp_path / "run"))  # not /tmp/gpu-recipe-run, which another run may use
    recipe = (out / "recipe.md").read_text()
    assert "--height 32 --width 48 --features 4 8" in recipe and "full Kaggle training set" in recipe
    assert "(16 training images," in recipe  # one car trains, four are held out
    assert "64x96 (original)" in (out / "evaluate.log").read_text()


def test_recipe_epochs_fit_the_budget_from_a_measured_probe(tiny_data, tmp_path):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from recipe_epochs import epochs_that_fit
    # 448 training photos and 64 validation photos (a third of the cost each) at 50 img/s, 15% margin: 10.8 s
    epochs, seconds = epochs_that_fit(10, 50.0, 448, 64, 1.15)
    assert seconds == pytest.approx(1.15 * (448 + 64 / 3) / 50)
    assert epochs == 55  # 600 s / 10.79 s = 55.6: 55 whole epochs
    assert epochs_that_fit(0.01, 1.0, 448, 64, 1.15)[0] == 1  # never fewer than one epoch
    # the checkpoint's copy to CPU memory adds to each epoch; its write, overlapping the next, bounds it below
    assert epochs_that_fit(10, 50.0, 448, 64, 1.15, (0.5, 3.0))[1] == pytest.approx(seconds + 0.5)
    assert epochs_that_fit(10, 50.0, 448, 64, 1.15, (0.5, 20.0)) == (30, 20.0)
    result = subprocess.run([sys.executable, "benchmarks/recipe_epochs.py", "--minutes", "0.5", "--steps", "1",
                             "--dir", str(tmp_path), "--", "--data-dir", str(tiny_data), *TINY, "--val-cars", "1",
                             "--device", "cpu"],
                            cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert int(result.stdout.strip()) >= 1
    assert "16 training and 16 validation photos" in result.stderr  # 2 cars of 16 views, one held out
    assert "checkpoint copy" in result.stderr and list(tmp_path.iterdir()) == []  # the timed write removed


def test_bench_epoch_precision_only_compares_train_py_with_itself_in_fp32(tiny_data, tmp_path):
    run_script("benchmarks/bench_epoch.py", "--data-dir", str(tiny_data), "--cars", "2", *TINY,
               "--repeats", "1", "--precision-only", "--workers", "0", "--json", str(tmp_path / "e.json"))
    commands = json.loads((tmp_path / "e.json").read_text())["commands"]
    assert commands["baseline"].startswith("train.py") and commands["baseline"].endswith("--amp off")
    assert commands["baseline"].replace("baseline-0", "project-0").removesuffix(" --amp off") == commands["project"]


def test_grad_precision_compares_one_batch_against_itself(tiny_data):
    out = run_script("benchmarks/grad_precision.py", "--data-dir", str(tiny_data), "--features", "4", "8",
                     "--height", "32", "--width", "48", "--batch-size", "4", "--amp", "bf16")
    rows = {line.split("|")[1].strip(): float(line.split("|")[2]) for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| gradient")}
    # The same weights and batch in another memory layout move the gradient far less than another batch
    # does; were the passes to change the weights or see other images, the two would be alike.
    assert rows["fp32, channels_last (sum order only)"] < 0.01
    assert rows["fp32, another batch (SGD's own noise)"] > 10 * rows["fp32, channels_last (sum order only)"]
    assert 0 < rows["project: channels_last, bfloat16 autocast"] < 1


def test_profile_step_splits_the_step_and_rates_the_convolutions(tiny_data, tmp_path):
    out = run_script("benchmarks/profile_step.py", "--data-dir", str(tiny_data), *TINY, "--steps", "1",
                     "--amp", "off", "--no-channels-last", "--peak-tflops", "1", "--json", str(tmp_path / "p.json"))
    report = json.loads((tmp_path / "p.json").read_text())
    assert report["amp"] == "float32" and not report["channels_last"]
    assert set(report["phase_ms"]) == {"forward", "loss", "backward", "clip + AdamW step"}
    kinds = report["kind_ms"]
    assert min(kinds["convolutions, forward"], kinds["convolutions, backward"],
               kinds["BatchNorm, forward and backward"]) > 0
    # the backward pass computes both the input's and the weights' gradients: about twice the forward FLOPs
    assert 1.5 < report["conv_flops"]["backward"] / report["conv_flops"]["forward"] < 2.5
    assert report["loader_ms_per_batch"] > 0 and "% of the GEMM" in out


def recipe_commands(tmp_path: Path, **env: str) -> list[list[str]]:
    """The argv of each `python` call cpu_recipe.sh makes, with a stand-in python on PATH that records them. The
    stand-in answers cpu_schedule.py's call with the real script given only the class (its first three arguments):
    the class's best schedule, as if the probe had found that it fits."""
    fake = tmp_path / "bin" / "python"
    fake.parent.mkdir(parents=True)
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\0" "$@" >> "$RECORD"; printf "\\n" >> "$RECORD"\n'
                    '[ "$1" = benchmarks/cpu_schedule.py ] && exec "$REAL_PYTHON" "$1" "$2" "$3"\necho done\n')
    fake.chmod(0o755)
    record = tmp_path / "argv"
    env = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "RECORD": str(record),
           "REAL_PYTHON": sys.executable, **env}
    subprocess.run(["bash", str(ROOT / "benchmarks" / "cpu_recipe.sh"), "DATA", str(tmp_path / "runs")],
                   env=env, check=True, capture_output=True, timeout=60)
    return [line.rstrip("\0").split("\0") for line in record.read_text().splitlines()]


def test_cpu_recipe_runs_two_stages_train_py_accepts(tmp_path):
    import evaluate
    import train
    schedule, stage1, stage2, evaluation, _ = recipe_commands(tmp_path, CPU_CLASS="bf16")
    assert schedule[:3] == ["benchmarks/cpu_schedule.py", "--cpu-class", "bf16"]
    assert schedule[3:7] == ["--minutes", "30", "--data-dir", "DATA"]  # the probe picks the schedule that fits
    stage = schedule[schedule.index("--") + 1:]  # the flags the probe trains with, as the script passed them
    first, _ = train.parse_args(stage1[1:])
    second, _ = train.parse_args(stage2[1:])
    assert (first.height, first.width, first.epochs, second.height, second.width, second.epochs) == \
        (256, 384, 16, 448, 672, 9)
    assert first.features == second.features == [16, 32, 64, 128, 256] and second.edge_weight == 5
    assert second.init == str(tmp_path / "runs" / "stage1" / "last.pt")
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from cpu_schedule import stage_flags
    probed, _ = train.parse_args(stage_flags("DATA", "16 32 64 128 256", "256x384", stage))
    for stage in (first, second):  # the probe times the step and counts the split that the stages train
        assert [getattr(probed, key) for key in ("data_dir", "batch_size", "val_cars", "workers", "seed", "device",
                                                 "features")] == \
            [getattr(stage, key) for key in ("data_dir", "batch_size", "val_cars", "workers", "seed", "device",
                                             "features")]
    assert first.device == "cpu"
    scoring = evaluate.parse_args(evaluation[1:])
    assert scoring.checkpoint == str(tmp_path / "runs" / "stage2" / "best.pt") and scoring.tta
    assert scoring.size == [(448, 672), (512, 768), (576, 864)]  # 1, 1.14 and 1.29 times stage 2's size
    augmentation = ("shift", "zoom", "rotate", "grey")
    first_place = "--shift 0.0625 --zoom 0.91 1.21 --rotate 7 --grey 0.1"
    ranges, _ = train.parse_args(recipe_commands(tmp_path / "aug", CPU_CLASS="bf16", AUG2=first_place)[2][1:])
    assert [getattr(ranges, key) for key in augmentation] == [0.0625, [0.91, 1.21], 7, 0.1]
    defaults, _ = train.parse_args([])  # without AUG2, stage 2 keeps train.py's ranges
    assert [getattr(second, key) for key in augmentation] == [getattr(defaults, key) for key in augmentation]


def test_cpu_recipe_on_avx2_trains_less_and_refuses_an_unknown_class(tmp_path):
    import evaluate
    import train
    _, stage1, stage2, evaluation, _ = recipe_commands(tmp_path, CPU_CLASS="avx2")
    first, _ = train.parse_args(stage1[1:])
    second, _ = train.parse_args(stage2[1:])
    bf16_first, _ = train.parse_args(recipe_commands(tmp_path / "bf16", CPU_CLASS="bf16")[1][1:])
    assert first.epochs < bf16_first.epochs  # fp32 steps cost 3-5x: fewer epochs fit 30 minutes
    assert (first.height, first.width, first.epochs, second.height, second.width, second.epochs) == \
        (192, 288, 8, 384, 576, 6)
    assert first.features == second.features == [8, 16, 32, 64, 128, 256]  # a fp32 step 2-3x cheaper than 16..256
    assert second.init == str(tmp_path / "runs" / "stage1" / "last.pt") and second.edge_weight == 5
    # six levels halve a size six times: multiples of 32 leave only the deepest halving to round (model._pad_to)
    assert all(h % 32 == 0 and w % 32 == 0 for h, w in evaluate.parse_args(evaluation[1:]).size)
    z2c = recipe_commands(tmp_path / "z2c", CPU_CLASS="avx2", FEATURES="16 32 64 128 256")
    assert z2c[0][z2c[0].index("--minutes") + 1] == "0"  # a schedule knob set: no probe, the best with that change
    assert train.parse_args(z2c[1][1:])[0].features == [16, 32, 64, 128, 256]  # FEATURES overrides the class's UNet
    assert train.parse_args(z2c[1][1:])[0].epochs == first.epochs
    extra = recipe_commands(tmp_path / "extra", CPU_CLASS="avx2", EXTRA="--batch-size 4")[0]
    assert extra[extra.index("--minutes") + 1] == "0"  # EXTRA may change a step's cost: no probe either
    refused = subprocess.run(["bash", str(ROOT / "benchmarks" / "cpu_recipe.sh"), "DATA", str(tmp_path / "x")],
                             env={**os.environ, "CPU_CLASS": "sse"}, capture_output=True, text=True, timeout=60)
    assert refused.returncode == 2 and "CPU_CLASS must be bf16, avx2 or auto, not 'sse'" in refused.stderr
    assert not (tmp_path / "x").exists()  # refused before it makes the run folder


def test_cpu_schedule_takes_the_best_measured_schedule_that_fits_or_cuts_the_best():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from dataclasses import replace
    from cpu_schedule import SCHEDULES, choose, cut_to_fit, training_seconds
    best, second, third = SCHEDULES["bf16"]
    seconds = {("16 32 64 128 256", "256x384"): 100.0, ("16 32 64 128 256", "448x672"): 300.0,
               ("16 32 64 128 256", "384x576"): 200.0, ("16 32 64 128 256", "160x240"): 50.0}

    def epoch_seconds(features: str, size: str) -> float:
        return seconds[features, size]

    assert training_seconds(best, epoch_seconds) == 16 * 100 + 9 * 300  # 71.7 min
    assert training_seconds(second, epoch_seconds) == 16 * 100 + 9 * 200  # 56.7 min
    assert training_seconds(third, epoch_seconds) == 8 * 50 + 7 * 200  # 30 min
    assert choose(SCHEDULES["bf16"], epoch_seconds, 72) == best
    assert choose(SCHEDULES["bf16"], epoch_seconds, 60) == second  # the best measured one that fits
    assert choose(SCHEDULES["bf16"], epoch_seconds, 30) == third
    cut = choose(SCHEDULES["bf16"], epoch_seconds, 27)  # none fits: the third, nearest to fitting, is cut
    assert (cut.features, cut.size1, cut.size2, cut.sizes) == (third.features, third.size1, third.size2,
                                                                third.sizes)
    assert training_seconds(cut, epoch_seconds) <= 27 * 60 and "not measured" in cut.measured
    # both stages cut in proportion (0.9: 7.2 and 6.3 epochs, floored to 7 and 6)
    assert (cut.epochs1, cut.epochs2) == (7, 6)
    assert cut_to_fit(second, epoch_seconds, 10**6) == replace(second, measured="not measured (cut to fit)")
    given_back = cut_to_fit(second, epoch_seconds, 2244)  # 0.66: 10.56 and 5.94 epochs, floored to 10 and 5 (2000 s)
    assert (given_back.epochs1, given_back.epochs2) == (10, 6)  # and a sixth at 384x576 fits (2200 s)
    tiny = choose(SCHEDULES["bf16"], epoch_seconds, 0.1)
    assert (tiny.epochs1, tiny.epochs2) == (1, 1)  # never fewer than one epoch a stage


def test_cpu_schedule_probes_each_size_once_and_prints_assignments_for_bash(tiny_data, tmp_path, monkeypatch,
                                                                           capsys):
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import cpu_schedule
    import recipe_epochs
    from cpu_schedule import Schedule
    probes = []
    real_probe = recipe_epochs.probe
    monkeypatch.setattr(recipe_epochs, "probe", lambda *a: probes.append(a[0].height) or real_probe(*a))
    tiny = (Schedule("4 8", 10**6, "32x48", 10**6, "64x96", "64x96 96x144", "first"),
            Schedule("4 8", 2, "32x48", 1, "64x96", "64x96", "second"))
    monkeypatch.setattr(cpu_schedule, "SCHEDULES", {"avx2": tiny})
    monkeypatch.setattr(sys, "argv", ["cpu_schedule.py", "--cpu-class", "avx2", "--minutes", "30", "--steps", "1",
                                      "--data-dir", str(tiny_data), "--dir", str(tmp_path), "--",
                                      "--batch-size", "2", "--val-cars", "1", "--workers", "0", "--device", "cpu"])
    cpu_schedule.main()
    out, err = capsys.readouterr()
    assert sorted(probes) == [32, 64]  # each size probed once, though both schedules train at both
    assert list(tmp_path.iterdir()) == []  # the timed checkpoint writes are removed
    # a million epochs a stage never fit 30 minutes and 2 + 1 always do, however slow or busy the CPU
    assert "chose: UNet 4 8: 2 epochs at 32x48, then 1 at 64x96" in err
    shell = subprocess.run(["bash", "-c", f'{out}\necho "$CPU_CLASS|$FEATURES|$EPOCHS1|$SIZE1|$EPOCHS2|$SIZES"'],
                           env={**os.environ, "EPOCHS1": "3"}, capture_output=True, text=True, check=True)
    assert shell.stdout.strip() == "avx2|4 8|3|32x48|1|64x96"  # stdout is only assignments; the environment wins
