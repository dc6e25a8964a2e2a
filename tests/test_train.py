import csv
import itertools
import json
import subprocess
import sys

import pytest
import torch

import dataset as ds
import report
import train
import utils
from model import UNet
from stopping import signal_at_loss_call

TINY = ["--features", "4", "8", "--height", "32", "--width", "48", "--batch-size", "8", "--workers", "0",
        "--val-cars", "1", "--num-predictions", "2"]
RUN_FILES = ["last.pt", "best.pt", "config.json", "split.json", "metrics.csv", "curves.png"]


@pytest.fixture(scope="module")
def two_epoch_run(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    code = train.main(["--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "2", *TINY])
    assert code == 0
    return out


def test_two_epoch_run_leaves_every_run_folder_file(two_epoch_run):
    for name in RUN_FILES:
        assert (two_epoch_run / name).is_file(), name
    predictions = sorted(p.name for p in (two_epoch_run / "predictions").iterdir())
    assert len([p for p in predictions if p.endswith("_pred.png")]) == 2
    assert len([p for p in predictions if p.endswith("_panel.png")]) == 2


def test_metrics_csv_has_one_row_per_epoch(two_epoch_run):
    with open(two_epoch_run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert list(rows[0]) == ["epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_acc", "lr", "seconds"]
    assert all(0 <= float(r["val_dice"]) <= 1 for r in rows)


def test_split_json_holds_disjoint_car_ids(two_epoch_run):
    split = json.loads((two_epoch_run / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 3
    assert not set(split["train"]) & set(split["val"])
    config = json.loads((two_epoch_run / "config.json").read_text())
    assert config["epochs"] == 2 and config["features"] == [4, 8]


def test_checkpoint_holds_everything_to_resume(two_epoch_run):
    state = utils.load_checkpoint(two_epoch_run / "last.pt")
    for key in ("model", "optimizer", "scheduler", "scaler", "epoch", "best_dice", "model_config", "config", "split"):
        assert key in state, key
    assert state["epoch"] == 2
    best = utils.load_checkpoint(two_epoch_run / "best.pt")
    assert best["best_dice"] == max(r["val_dice"] for r in report.read_metrics_csv(two_epoch_run / "metrics.csv"))


def test_resume_with_other_epochs_is_refused_in_one_line_and_changes_nothing(two_epoch_run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in two_epoch_run.iterdir()}
    assert train.main(["--resume", str(two_epoch_run), "--epochs", "5"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: ") and "--epochs" in err[-1] and "Traceback" not in "\n".join(err)
    assert {p.name: p.stat().st_mtime_ns for p in two_epoch_run.iterdir()} == before


def test_a_run_resumed_into_a_new_folder_ends_by_scoring_what_it_has(two_epoch_run, tmp_path, capsys):
    # Finished before the resume, it trains nothing: no best.pt or last.pt in the new folder.
    assert train.main(["--resume", str(two_epoch_run / "last.pt"), "--out-dir", str(tmp_path / "again")]) == 0
    out = capsys.readouterr().out
    assert "last.pt" in out and (tmp_path / "again" / "per_image.csv").is_file()
    assert "finished all 2 epochs: nothing to train" in out and "resuming at epoch" not in out


@pytest.mark.parametrize("exists", [False, True])
def test_empty_data_dir_exits_with_both_commands(tmp_path, exists):
    folder = tmp_path / "nothing"
    if exists:
        folder.mkdir()
    result = subprocess.run([sys.executable, "train.py", "--data-dir", str(folder)],
                            capture_output=True, text=True, cwd=train.Path(train.__file__).parent)
    assert result.returncode != 0
    found = "holds no training images" if exists else "does not exist (is the path right?)"
    assert f"{folder} {found}" in result.stderr  # a typo in the path is told apart from an empty folder
    assert "python download.py" in result.stderr
    assert "python train.py --synthetic" in result.stderr
    assert "Traceback" not in result.stderr


def test_data_dir_inside_the_dataset_names_the_dataset(synthetic_dir):
    result = subprocess.run([sys.executable, "train.py", "--data-dir", str(synthetic_dir / "train")],
                            capture_output=True, text=True, cwd=train.Path(train.__file__).parent)
    assert result.returncode != 0
    assert result.stderr == (f"error: {synthetic_dir / 'train'} holds no training images; it is the train/ folder of "
                             f"the dataset in {synthetic_dir}: pass {synthetic_dir} to --data-dir\n")


def test_bad_data_is_refused_and_skip_bad_trains_on_the_rest(synthetic_dir, tmp_path, capsys):
    import shutil
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    broken = sorted((data / "train").iterdir())[3]
    broken.write_bytes(broken.read_bytes()[: broken.stat().st_size // 2])  # a truncated JPEG
    args = ["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), "--epochs", "1", *TINY]
    result = subprocess.run([sys.executable, "train.py", *args], capture_output=True, text=True,
                            cwd=train.Path(train.__file__).parent)
    assert result.returncode != 0
    assert broken.name in result.stderr and "--skip-bad" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "last.pt").exists()

    assert train.main([*args, "--skip-bad"]) == 0
    err = capsys.readouterr().err
    assert "using the 63 good pairs, leaving out 1" in err
    split = json.loads((tmp_path / "run" / "split.json").read_text())
    assert len(split["train"]) + len(split["val"]) == 4


def test_crop_trains_on_windows_and_validates_on_whole_images(synthetic_dir):
    args, _ = train.parse_args(["--data-dir", str(synthetic_dir), *TINY, "--crop", "16x24"])
    setup = train.Setup.create(args)
    pairs = ds.find_pairs(synthetic_dir)[:8]
    images, masks = next(iter(train.make_loader(pairs, args, setup, train=True)))
    assert images.shape == (8, 3, 16, 24) and masks.shape == (8, 1, 16, 24)
    images, masks = next(iter(train.make_loader(pairs, args, setup, train=False)))
    assert images.shape == (8, 3, 32, 48) and masks.shape == (8, 1, 32, 48)


@pytest.mark.parametrize("flags", [["--crop", "64x24"], ["--crop", "16"], ["--edge-weight", "0"],
                                   ["--edge-weight", "3", "--classes", "3"]])
def test_bad_crop_or_edge_weight_is_refused(flags, capsys):
    with pytest.raises(SystemExit):
        train.parse_args([*TINY, *flags])
    assert flags[0] in capsys.readouterr().err


def test_init_starts_from_the_weights_and_split_of_another_run(two_epoch_run, synthetic_dir, tmp_path, monkeypatch):
    first_weights = {}
    real_build = train.build_model

    def build_and_keep(args, state, setup):  # the weights the new run starts from
        net, model = real_build(args, state, setup)
        first_weights.update({k: v.clone() for k, v in net.state_dict().items()})
        return net, model
    monkeypatch.setattr(train, "build_model", build_and_keep)
    out = tmp_path / "bigger"
    assert train.main(["--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "1", *TINY,
                       "--height", "64", "--width", "96", "--features", "8", "16", "32",
                       "--init", str(two_epoch_run / "best.pt"), "--val-cars", "2", "--seed", "5"]) == 0
    init = utils.load_checkpoint(two_epoch_run / "best.pt")
    assert all(torch.equal(first_weights[k], v) for k, v in init["model"].items())
    assert json.loads((out / "split.json").read_text()) == init["split"]  # its held-out cars stay held out
    config = json.loads((out / "config.json").read_text())
    assert config["features"] == [4, 8] and config["height"] == 64  # the checkpoint's UNet, this run's size


def test_batchnorm_is_refreshed_from_the_epochs_first_training_images(synthetic_dir):
    args, _ = train.parse_args(["--data-dir", str(synthetic_dir), *TINY, "--device", "cpu", "--amp", "off"])
    setup = train.Setup.create(args)
    loader = train.make_loader(train.load_split(args, None, setup)[0], args, setup, train=True)
    net = UNet(features=[4, 8])
    first_conv, first_bn = net.downs[0][0], net.downs[0][1]
    first_bn.running_mean.fill_(100.0)  # statistics far from what the weights produce
    train.refresh_batchnorm(net, loader, setup, epoch=3, count=12)  # 12 images: two batches of 8
    loader.sampler.set_epoch(3)
    images = torch.cat([batch for batch, _ in itertools.islice(loader, 2)])
    with torch.no_grad():
        expected = first_conv(images).mean(dim=(0, 2, 3))  # the mean over those 16 images, per channel
    assert torch.allclose(first_bn.running_mean, expected, atol=1e-5)
    assert first_bn.momentum == 0.1 and net.training  # as they were before the refresh


def test_bn_images_recomputes_batchnorm_statistics_and_the_default_keeps_them(synthetic_dir, tmp_path, monkeypatch):
    real_epoch = train.train_one_epoch

    def epoch_with_stale_statistics(model, *args, **kwargs):  # running averages far behind the weights
        loss = real_epoch(model, *args, **kwargs)
        for layer in model.modules():
            if isinstance(layer, torch.nn.BatchNorm2d):
                layer.running_mean.fill_(100.0)
        return loss
    monkeypatch.setattr(train, "train_one_epoch", epoch_with_stale_statistics)
    runs = {}
    for name, flags in (("refreshed", ["--bn-images", "8"]), ("kept", [])):  # the default keeps them
        assert train.main(["--data-dir", str(synthetic_dir), "--out-dir", str(tmp_path / name), "--epochs", "1",
                           *TINY, *flags]) == 0
        runs[name] = utils.load_checkpoint(tmp_path / name / "last.pt")
    refreshed, kept = runs["refreshed"]["model"], runs["kept"]["model"]
    weights = [name for name in kept if not name.endswith(("running_mean", "running_var", "num_batches_tracked"))]
    assert all(torch.equal(refreshed[name], kept[name]) for name in weights)  # the same training
    assert (kept["downs.0.1.running_mean"] == 100).all() and (refreshed["downs.0.1.running_mean"].abs() < 100).all()
    assert runs["refreshed"]["metrics"][0]["val_loss"] < runs["kept"]["metrics"][0]["val_loss"]


def test_cache_is_skipped_when_it_would_not_fit_in_memory(capsys):
    assert ds.cache_fits(100, 160, 240)
    assert not ds.cache_fits(10**9, 160, 240)  # 10^9 images at 160x240: far beyond any machine
    assert "decoding every epoch instead" in capsys.readouterr().err


def test_cache_size_check_works_where_the_os_does_not_say_its_memory(monkeypatch, capsys):
    monkeypatch.delattr(ds.os, "sysconf")  # Windows has no os.sysconf: every training run crashed there
    assert ds.physical_memory() is None
    assert ds.cache_fits(100, 160, 240)
    assert not ds.cache_fits(10**5, 160, 240)  # 14.3 GiB: over a quarter of the 16 GiB assumed
    assert "this OS does not say its RAM" in capsys.readouterr().err


@pytest.mark.parametrize("device, cuda, cpus, local_world, expected", [
    ("auto", False, 16, None, 4),   # CPU training: half the CPUs, at most 4
    ("cpu", True, 2, None, 1),
    ("auto", True, 16, None, 14),   # a GPU: all CPUs but two
    ("cuda", False, 64, None, 16),  # at most 16
    ("cuda:1", True, 32, "4", 6),   # torchrun's 4 processes share the 32 CPUs
    ("mps", True, 8, None, 4),
])
def test_default_workers_follow_the_device_and_the_cpus(monkeypatch, device, cuda, cpus, local_world, expected):
    monkeypatch.setattr(train.torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(ds, "usable_cpus", lambda: cpus)
    if local_world:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", local_world)
    else:
        monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert train.parse_args(["--device", device])[0].workers == expected
    assert train.parse_args(["--device", device, "--workers", "3"])[0].workers == 3


@pytest.mark.parametrize("bf16_units, flags, expected", [
    (False, [], torch.contiguous_format),  # an AVX2 CPU: NCHW unless asked
    (True, [], torch.channels_last),
    (False, ["--channels-last"], torch.channels_last),
    (True, ["--no-channels-last"], torch.contiguous_format),
])
def test_channels_last_by_default_only_on_cpus_with_bf16_units(monkeypatch, capsys, bf16_units, flags, expected):
    monkeypatch.setattr(train.utils, "cpu_has_bf16_units", lambda: bf16_units)
    args, _ = train.parse_args(["--device", "cpu", *flags])
    assert train.Setup.create(args).memory_format == expected
    assert ("no bf16 units" in train.utils.device_name(train.torch.device("cpu"))) != bf16_units


def test_adamw_is_fused_on_the_cpu_unless_asked_and_steps_as_the_default_kernels_do():
    torch.manual_seed(0)
    nets, opts = [], []
    for flags in ([], ["--no-fused-adamw"]):
        args, _ = train.parse_args(["--device", "cpu", "--lr", "1e-2", *flags])
        nets.append(torch.nn.Linear(6, 3))
        opts.append(train.Optimization.create(nets[-1], args, torch.device("cpu"), steps_per_epoch=5))
    assert [o.optimizer.defaults["fused"] for o in opts] == [True, False]
    nets[1].load_state_dict(nets[0].state_dict())
    start = nets[0].weight.detach().clone()
    for _ in range(5):
        batch = torch.randn(4, 6)
        for net, opt in zip(nets, opts):
            opt.optimizer.zero_grad()
            net(batch).square().mean().backward()
            opt.optimizer.step()
    assert not torch.allclose(nets[0].weight, start)  # the steps moved the weights
    torch.testing.assert_close(nets[0].weight, nets[1].weight)  # the same update, only the kernel differs


class Zen4Cpuinfo:
    """Stands in for utils.Path: /proc/cpuinfo of a CPU with bf16 units, on any machine."""

    def __init__(self, path: str):
        assert path == "/proc/cpuinfo"

    def read_text(self) -> str:
        return "flags\t\t: fpu sse2 avx2 fma avx512f avx512bw avx512_bf16\n"


@pytest.mark.parametrize("capability, bf16", [("AVX512", True), ("AVX2", False)])
def test_torch_held_to_avx2_counts_as_a_cpu_without_bf16_units(monkeypatch, capability, bf16):
    # ATEN_CPU_CAPABILITY=avx2 (with ONEDNN_MAX_CPU_ISA=AVX2) makes a bf16 CPU run like an AVX2 one: fp32 defaults.
    monkeypatch.setattr(train.utils, "Path", Zen4Cpuinfo)
    monkeypatch.setattr(train.torch.backends.cpu, "get_cpu_capability", lambda: capability)
    train.utils.cpu_has_bf16_units.cache_clear()
    try:
        assert train.utils.cpu_has_bf16_units() == bf16
        assert train.utils.autocast_dtype(train.torch.device("cpu")) == (train.torch.bfloat16 if bf16 else None)
    finally:
        train.utils.cpu_has_bf16_units.cache_clear()


class NoCpuinfo:
    """Path, as on Windows and macOS: /proc/cpuinfo cannot be read."""

    def __init__(self, *parts):
        pass

    def read_text(self) -> str:
        raise FileNotFoundError("/proc/cpuinfo")


@pytest.mark.parametrize("avx512_bf16, amx, bf16", [(True, False, True), (False, True, True), (False, False, False)])
def test_bf16_units_are_found_without_proc_cpuinfo(monkeypatch, avx512_bf16, amx, bf16):
    monkeypatch.setattr(train.utils, "Path", NoCpuinfo)
    monkeypatch.setattr(train.torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(train.torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(train.torch.cpu, "_is_amx_tile_supported", lambda: amx)
    train.utils.cpu_has_bf16_units.cache_clear()
    try:
        assert train.utils.cpu_has_bf16_units() == bf16  # not always False off Linux
    finally:
        train.utils.cpu_has_bf16_units.cache_clear()


def record_step_precision(monkeypatch) -> list:
    """Patch train.train_step to note the autocast dtype of every training step."""
    seen, original = [], train.train_step

    def recording(model, images, masks, opt, amp_dtype, *args, **kwargs):
        seen.append(amp_dtype)
        return original(model, images, masks, opt, amp_dtype, *args, **kwargs)

    monkeypatch.setattr(train, "train_step", recording)
    return seen


def test_fp32_warmup_trains_the_first_steps_in_fp32_then_mixed_precision(synthetic_dir, tmp_path, monkeypatch):
    seen = record_step_precision(monkeypatch)
    code = train.main(["--data-dir", str(synthetic_dir), "--out-dir", str(tmp_path), "--epochs", "2",
                       "--amp", "bf16", "--fp32-warmup", "0.25", *TINY])
    assert code == 0
    assert len(seen) == 12  # 2 epochs of 6 steps (48 training images, batch 8)
    assert seen == [None] * 3 + [torch.bfloat16] * 9  # int(0.25 * 12) steps in fp32


def test_fp32_warmup_counts_the_steps_before_a_resume(synthetic_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = record_step_precision(monkeypatch)
    signal_at_loss_call(monkeypatch, 10)  # step 2 of epoch 2 (8 calls an epoch: 6 training steps, 2 validation)
    argv = ["--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "2", "--amp", "bf16",
            "--fp32-warmup", "0.75", *TINY]
    assert train.main(argv) == 130
    assert seen == [None] * 8  # 8 of the 12 steps taken, all within the 9 warm-up steps
    seen.clear()
    assert train.main(["--resume", str(out / "last.pt")]) == 0
    assert seen == [None] + [torch.bfloat16] * 3  # steps 9 to 12: the warm-up's last, then bf16


@pytest.mark.parametrize("fraction", ["-0.1", "1.5"])
def test_fp32_warmup_outside_0_to_1_is_refused(fraction, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--fp32-warmup", fraction])
    assert "--fp32-warmup is a fraction" in capsys.readouterr().err
