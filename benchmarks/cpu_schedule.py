"""Which of the CPU recipe's measured schedules fits a training budget on this CPU, from short probes.

    python benchmarks/cpu_schedule.py --data-dir ../shared/carvana --minutes 30    # what cpu_recipe.sh runs first

Each CPU class (bf16 units, or AVX2 only) has schedules that were trained end to end on the shared cars (SCHEDULES
below, best first; BENCHMARKS.md has the runs). The same schedule takes 26 minutes on one 2-core CPU and 50 on
another of its class, so the probe times a few training steps at each size a schedule trains at (recipe_epochs.py's
estimate of an epoch), and the best schedule estimated to fit --minutes of training wins. When none fits, the one
that needs the smallest cut is cut to fit, both stages in proportion, and its Dice is then unmeasured. Without
--minutes (or with 0) the class's best schedule is taken as it is, without a probe.

The estimates go to stderr; stdout gets shell assignments that benchmarks/cpu_recipe.sh evaluates, each keeping a
value the environment already gives (EPOCHS1=... bash benchmarks/cpu_recipe.sh DATA_DIR).
"""
from __future__ import annotations

import argparse
import math
import shlex
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import common  # noqa: F401  (puts the repository on sys.path)
import recipe_epochs
import train
import utils

SCORED_SIZES = "384x576 448x672 512x768"  # 1, 1.17 and 1.33 times 384x576: the multi-scale TTA that paid


@dataclass(frozen=True)
class Schedule:
    """Two stages of the CPU recipe: the car at size1, then its outline at size2 from stage 1's weights."""
    features: str
    epochs1: int
    size1: str
    epochs2: int
    size2: str
    sizes: str  # the inputs evaluate.py scores at, their probabilities averaged
    measured: str  # what it reached at 1280x1918 (flip TTA, one region) and where

    def describe(self) -> str:
        return (f"UNet {self.features}: {utils.plural(self.epochs1, 'epoch')} at {self.size1}, then {self.epochs2} "
                f"at {self.size2}; scored at inputs of {self.sizes}")


SCHEDULES = {
    "bf16": (
        Schedule("16 32 64 128 256", 16, "256x384", 9, "448x672", "448x672 512x768 576x864",
                 "0.9931 and 0.9934 from two stage-1 paths; 27.3-28.1 min on a 2-core AMD Zen 5"),
        Schedule("16 32 64 128 256", 16, "256x384", 9, "384x576", SCORED_SIZES,
                 "0.9926 (0.9931 before the fused AdamW's rounding); 23.3-31.6 min on 2-core AMD Zen 4 and 5"),
        Schedule("16 32 64 128 256", 8, "160x240", 7, "384x576", SCORED_SIZES,
                 "0.9920; 27.4 min on a 2-core Intel Xeon with AMX"),
    ),
    "avx2": (  # six levels half as wide: a fp32 step 2-3x cheaper than five levels'
        Schedule("8 16 32 64 128 256", 8, "192x288", 6, "384x576", SCORED_SIZES,
                 "0.9900 on two paths, 0.9904 on a third; 32.8 min on a 2-core Intel Xeon, 12.9 on a Zen 5, "
                 "both held to AVX2"),
        Schedule("16 32 64 128 256", 7, "160x240", 3, "320x480", "320x480 384x576 416x624",
                 "0.9894; 22.2 min on a 2-core AMD Zen 2"),
        Schedule("8 16 32 64 128 256", 5, "192x288", 4, "384x576", SCORED_SIZES,  # the first, cut once by the probe
                 "0.9890; 23.9 min on the 2-core Intel Xeon held to AVX2, in a slow spell"),
    ),
}

EpochSeconds = Callable[[str, str], float]  # (features, size) -> estimated seconds an epoch


def training_seconds(schedule: Schedule, epoch_seconds: EpochSeconds) -> float:
    """Estimated seconds of training of both stages."""
    return (schedule.epochs1 * epoch_seconds(schedule.features, schedule.size1)
            + schedule.epochs2 * epoch_seconds(schedule.features, schedule.size2))


def cut_to_fit(schedule: Schedule, epoch_seconds: EpochSeconds, budget: float) -> Schedule:
    """The schedule with both stages' epochs cut in proportion to fit budget seconds (one each at least), then
    stage 2's given back while they fit: time at the larger size paid best on the slower CPUs."""
    scale = min(1.0, budget / training_seconds(schedule, epoch_seconds))
    cut = replace(schedule, epochs1=max(1, math.floor(schedule.epochs1 * scale)),  # may stay over a tiny budget
                  epochs2=max(1, math.floor(schedule.epochs2 * scale)), measured="not measured (cut to fit)")
    while cut.epochs2 < schedule.epochs2:
        more = replace(cut, epochs2=cut.epochs2 + 1)
        if training_seconds(more, epoch_seconds) > budget:
            break
        cut = more
    return cut


def choose(schedules: tuple[Schedule, ...], epoch_seconds: EpochSeconds, minutes: float) -> Schedule:
    """The first (best) schedule whose estimated training fits the minutes, else the one nearest to fitting, cut to
    fit: a small cut of a cheaper schedule keeps more of what was measured than a large cut of a dearer one."""
    for schedule in schedules:
        if training_seconds(schedule, epoch_seconds) <= minutes * 60:
            return schedule
    nearest = min(schedules, key=lambda schedule: training_seconds(schedule, epoch_seconds))
    return cut_to_fit(nearest, epoch_seconds, minutes * 60)


def stage_flags(data_dir: str, features: str, size: str, stage: list[str]) -> list[str]:
    """train.py's flags of a stage of cpu_recipe.sh: the schedule's, and stage (the script's batch, split, workers
    and device)."""
    height, width = size.split("x")
    return ["--data-dir", data_dir, "--features", *features.split(), *stage, "--height", height, "--width", width]


def probed_epoch_seconds(data_dir: str, stage: list[str], steps: int, folder: Path, margin: float) -> EpochSeconds:
    """An EpochSeconds that probes each (features, size) once, with the stages' flags, and says what it found."""
    found: dict[tuple[str, str], float] = {}

    def epoch_seconds(features: str, size: str) -> float:
        if (features, size) not in found:
            args, _ = train.parse_args(stage_flags(data_dir, features, size, stage))
            found[features, size] = recipe_epochs.probe(args, steps, folder).epoch_seconds(margin)
            print(f"  UNet {features} at {size}: about {found[features, size]:.0f} s an epoch", file=sys.stderr)
        return found[features, size]

    return epoch_seconds


def shell_assignments(cpu_class: str, schedule: Schedule) -> str:
    """Lines for bash's eval: the CPU class found, and each knob of cpu_recipe.sh unless the environment sets it."""
    values = {"FEATURES": schedule.features, "EPOCHS1": schedule.epochs1, "SIZE1": schedule.size1,
              "EPOCHS2": schedule.epochs2, "SIZE2": schedule.size2, "SIZES": schedule.sizes}
    return "\n".join([f"CPU_CLASS={cpu_class}",
                      *(f"{name}=${{{name}:-{shlex.quote(str(value))}}}" for name, value in values.items())])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cpu-class", choices=("auto", *SCHEDULES), default="auto",
                        help="bf16 (bf16 units) or avx2 (AVX2 only); auto: as train.py's --amp auto finds it "
                             "(default: %(default)s)")
    parser.add_argument("--data-dir", help="the recipe's dataset, whose split the probe counts (with --minutes)")
    parser.add_argument("--minutes", type=float, default=0,
                        help="the training budget; 0: the class's best schedule, not probed (default: %(default)s)")
    parser.add_argument("--margin", type=float, default=1.15,
                        help="estimated epoch time over the steps' own (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=15,
                        help="timed steps of each probe; fewer make a noisier estimate (default: %(default)s)")
    parser.add_argument("--dir", default="runs", help="where to time a checkpoint's write (default: %(default)s)")
    parser.add_argument("stage", nargs=argparse.REMAINDER,
                        help="after --: the stages' other train.py flags (cpu_recipe.sh's batch, split, workers, "
                             "device)")
    opts = parser.parse_args()
    stage = opts.stage[1:] if opts.stage[:1] == ["--"] else opts.stage
    if opts.minutes > 0 and not opts.data_dir:
        parser.error("--minutes needs --data-dir")
    cpu_class = opts.cpu_class
    if cpu_class == "auto":
        cpu_class = "bf16" if utils.cpu_has_bf16_units() else "avx2"
    schedules = SCHEDULES[cpu_class]
    schedule = schedules[0]
    if opts.minutes > 0:
        print(f"CPU class {cpu_class}: timing a few training steps at each size, to fit {opts.minutes:g} minutes",
              file=sys.stderr)
        epoch_seconds = probed_epoch_seconds(opts.data_dir, stage, opts.steps, Path(opts.dir), opts.margin)
        schedule = choose(schedules, epoch_seconds, opts.minutes)
        if schedule in schedules:
            probed = schedules[:schedules.index(schedule) + 1]  # the ones before it did not fit
        else:
            probed = (*schedules, schedule)  # none fitted: all of them, and the cut one
        for candidate in probed:
            print(f"  {candidate.describe()}: about {training_seconds(candidate, epoch_seconds) / 60:.1f} min of "
                  f"training here; measured: {candidate.measured}", file=sys.stderr)
        print(f"chose: {schedule.describe()}", file=sys.stderr)
        if training_seconds(schedule, epoch_seconds) > opts.minutes * 60:
            print(f"warning: that is over the {opts.minutes:g} minutes, with one epoch in a stage at least",
                  file=sys.stderr)
    print(shell_assignments(cpu_class, schedule))


if __name__ == "__main__":
    main()
