"""DistributedDataParallel on CPU: 2 processes on gloo train in lockstep and score each validation image once.

Each rank runs train.main (or evaluate.main) in a process of its own (as torchrun would start it);
recorders wrapped around train_one_epoch and the evaluations save what every rank holds, so the test
can compare ranks.
"""
from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import evaluate
import train
from carvana_files import write_tiny_carvana

WORLD_SIZE = 2
SEED = 0
# 15 validation images with batch 7: rank 0 scores 8 images in 2 batches, rank 1 scores 7 in 1, so
# the ranks run different numbers of validation batches and a padded or duplicated image would show.
TINY = ["--features", "4", "8", "--height", "32", "--width", "48", "--epochs", "1", "--workers", "0",
        "--batch-size", "7", "--val-cars", "1", "--num-predictions", "1", "--amp", "off", "--seed", str(SEED)]
TIMEOUT_S = 120


def record(record_dir: Path, rank: int) -> None:
    """Wrap train.train_one_epoch, train.evaluate and evaluate.py's evaluation to save each rank's weights and
    metrics."""
    train_one_epoch, validate = train.train_one_epoch, train.evaluate
    evaluate_sizes = evaluate.evaluate_at_training_and_original_size

    def recording_train_one_epoch(model, *args, **kwargs):
        loss = train_one_epoch(model, *args, **kwargs)
        module = getattr(model, "module", model)  # inside DDP's wrapper
        torch.save(dict(module.named_parameters()), record_dir / f"params-{rank}.pt")
        return loss

    def recording_evaluate(*args, **kwargs):
        metrics = validate(*args, **kwargs)
        (record_dir / f"metrics-{rank}.json").write_text(json.dumps(metrics))
        return metrics

    def recording_evaluate_sizes(*args, **kwargs):
        results = evaluate_sizes(*args, **kwargs)
        (record_dir / f"metrics-{rank}.json").write_text(json.dumps(results[("training", False)]))
        return results

    train.train_one_epoch, train.evaluate = recording_train_one_epoch, recording_evaluate
    evaluate.evaluate_at_training_and_original_size = recording_evaluate_sizes


def _rank_main(rank: int, program: str, argv: list[str], port: int, record_dir: str) -> None:
    """One process of the group, set up the way torchrun sets up each of its processes."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)  # two ranks share this machine's cores
    record(Path(record_dir), rank)
    code = {"train": train.main, "evaluate": evaluate.main}[program](argv)
    (Path(record_dir) / f"threads-{rank}.json").write_text(json.dumps(gloo_threads()))
    if code != 0:
        raise SystemExit(code)


def gloo_threads() -> list[str] | None:
    """The names of this process's gloo threads (None where /proc does not list threads)."""
    tasks = Path("/proc/self/task")
    if not tasks.is_dir():
        return None
    names = [(task / "comm").read_text().strip() for task in tasks.iterdir()]
    return [name for name in names if "gloo" in name]


def assert_group_ended(records: Path) -> None:
    """No rank has gloo threads left after main returned: still running at the interpreter's exit, they abort it
    now and then (SIGABRT, after the run's work is done)."""
    for rank in range(WORLD_SIZE):
        threads = load_json(records / f"threads-{rank}.json")
        if threads is None:
            pytest.skip("no /proc/self/task on this system to list threads")
        assert threads == [], f"rank {rank}"


def run_distributed(argv: list[str], record_dir: Path, program: str = "train") -> None:
    """train.main(argv) (or evaluate.main) on WORLD_SIZE processes; fails (instead of hanging) if they do not finish."""
    record_dir.mkdir(parents=True, exist_ok=True)
    context = mp.start_processes(_rank_main, args=(program, argv, free_port(), str(record_dir)), nprocs=WORLD_SIZE,
                                 join=False, start_method="spawn")
    deadline = time.monotonic() + TIMEOUT_S
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail(f"the {WORLD_SIZE} ranks did not finish in {TIMEOUT_S} s (a collective out of step?)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(data dir, run folder, record dir) of one distributed training epoch."""
    root = tmp_path_factory.mktemp("ddp")
    data = write_tiny_carvana(root / "data", val_views=15, seed=SEED)
    run_distributed(["--data-dir", str(data), "--out-dir", str(root / "run"), *TINY], root / "train-records")
    return data, root / "run", root / "train-records"


def load_json(path: Path) -> Any:
    return json.loads(path.read_text())


def test_parameters_are_identical_across_ranks_after_training(ddp_run):
    _, run, records = ddp_run
    rank0, rank1 = (torch.load(records / f"params-{r}.pt") for r in range(WORLD_SIZE))
    assert rank0.keys() == rank1.keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    saved = train.utils.load_checkpoint(run / "last.pt")["model"]
    assert all(torch.equal(saved[name], rank0[name]) for name in rank0)  # what rank 0 saved


def test_the_process_group_ends_with_training(ddp_run):
    assert_group_ended(ddp_run[2])


def assert_same_metrics(distributed: dict[str, float], single: dict[str, float], images: int = 15) -> None:
    """Every image scored once (15, not 16), and the reduced sums give the single-process numbers."""
    assert distributed["images"] == single["images"] == images
    for key in ("dice", "iou", "acc", "mean_dice", "mean_iou", "loss"):
        if key in distributed:  # evaluate.py reports no loss
            assert distributed[key] == pytest.approx(single[key], rel=1e-5, abs=1e-7), key


def evaluate_single_process(data: Path, run: Path) -> dict[str, float]:
    """train.evaluate of run/last.pt on its validation cars in this process, with no process group."""
    state = train.utils.load_checkpoint(run / "last.pt")
    args, _ = train.parse_args(["--data-dir", str(data), *TINY])
    model = train.utils.model_from_checkpoint(state).to(memory_format=torch.channels_last)
    pairs = train.ds.pairs_of_groups(train.ds.find_pairs(data), state["split"]["val"])
    setup = train.Setup.create(args)
    return train.evaluate(model, train.make_loader(pairs, args, setup, train=False), setup)


def test_validation_during_distributed_training_matches_single_process(ddp_run, tmp_path, monkeypatch):
    data, run, records = ddp_run
    single = evaluate_single_process(data, run)
    for rank in range(WORLD_SIZE):  # every rank holds the reduced metrics
        assert_same_metrics(load_json(records / f"metrics-{rank}.json"), single)


def test_distributed_evaluate_matches_single_process(ddp_run, tmp_path, monkeypatch):
    data, run, _ = ddp_run
    records = tmp_path / "eval-records"
    run_distributed(["--checkpoint", str(run / "last.pt"), "--data-dir", str(data), "--workers", "0"],
                    records, program="evaluate")
    single = evaluate_single_process(data, run)
    assert_same_metrics(load_json(records / "metrics-0.json"), single)
    assert_group_ended(records)


def test_a_rank_without_validation_images_neither_hangs_nor_miscounts(tmp_path, monkeypatch):
    data = write_tiny_carvana(tmp_path / "data", val_views=1, seed=SEED)  # rank 1 gets no validation image
    records = tmp_path / "records"
    run_distributed(["--data-dir", str(data), "--out-dir", str(tmp_path / "run"), *TINY], records)
    single = evaluate_single_process(data, tmp_path / "run")
    assert_same_metrics(load_json(records / "metrics-1.json"), single, images=1)
    assert_group_ended(records)
