"""``conpet search``: a multi-objective configuration search as a thin layer over an Optuna study,
with the two-phase protocol built in.

**Phase 1 (tuning).** Every trial is an ordinary conpet run directory
(``SEARCH_DIR/trials/trial-NNNN``) on the tuning stream with ``data.eval_split: dev``: its
accuracy matrix is measured on **dev** rows and the test rows are sealed, so a trial that reads
them fails (:func:`conpet.data.stream.seal_test`). A trial is scored on average dev accuracy
after the stream (up), tunable parameters (down) and training seconds (down); the study's sampler
(TPE by default, or NSGA-II, or random) proposes the next configuration. After each task a trial
whose dev accuracy is below the median of the finished trials' after the same task stops early
(Optuna's median rule: Optuna's pruners need ``Trial.report``, which it refuses in
multi-objective studies, so the rule is applied here on the per-task values the trials store).

**Workers.** The study lives in Optuna's RDB storage: a SQLite file in the search folder by
default, or any SQLAlchemy URL (PostgreSQL, MySQL) given with ``--storage``; every
``conpet search ... --storage URL --study NAME`` started on any machine joins the same study, and
Optuna hands out the trials (no scheduler of conpet's own). Workers send a heartbeat; a trial whose
worker died (``kill -9``, a lost machine) is marked failed by the next worker that starts a trial
and retried once with the same configuration, resuming the dead trial's run directory.

**Phase 2 (evaluation).** With ``--eval-on``, the most accurate configuration of the Pareto front
(on dev, stream A) is trained once on stream B, in the same scenario (number of tasks, classes per
task), and reported on B's test rows beside the base configuration (the defaults) on the same
stream: the figure a user can expect, not the tuned one.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import yaml

try:  # only `conpet search` needs Optuna: every other command runs without it
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback, fail_stale_trials
    from optuna.trial import TrialState
except ModuleNotFoundError:
    optuna = None

from conpet.config import from_dict, set_dotted
from conpet.data.load import load_stream
from conpet.errors import ConfigError
from conpet.runner import check_out_dir, resume, run
from conpet.runs import atomic_write_json, atomic_write_text
from conpet.search.pareto import best_per_budget, pareto_front, should_prune
from conpet.search.space import Space, load_space

SAMPLERS = ("tpe", "nsga2", "random")
"""TPE (multi-objective, Optuna's MOTPE: 10 random start-up trials, then a model of the good
region) suits budgets of tens of trials; NSGA-II draws its whole first generation (50) at random."""
DIRECTIONS = {"accuracy": "maximize", "params": "minimize", "seconds": "minimize"}


@dataclass
class SearchResult:
    out: Path
    points: list[dict]
    """One per finished trial: ``number``, ``accuracy`` (dev %), ``params``, ``seconds``, ``config``."""
    front: list[int]
    """Indices into ``points`` of the Pareto front, most accurate first."""
    phase2: dict | None = None


def stream_spec(text: str) -> dict[str, Any]:
    """``wordnet-fine[tasks=0:10]`` or a data file -> dotted ``data.*`` values."""
    m = re.fullmatch(r"\s*([^\[\]]+?)\s*(?:\[tasks=(\d+:\d+)\])?\s*", text)
    if not m:
        raise ConfigError(f"stream '{text}': expected NAME or NAME[tasks=START:STOP] (a benchmark or a data file)")
    name, part = m.groups()
    values: dict[str, Any] = {"data.file": name, "data.benchmark": None} if Path(name).is_file() else \
        {"data.benchmark": name, "data.file": None}
    values["data.task_slice"] = part
    return values


def scenario(data: dict[str, Any]) -> list[int]:
    """Classes per task of a stream (no model needed)."""
    cfg = from_dict({"data": data})
    return [len(task.labels) for task in load_stream(cfg.data).tasks]


def check_scenarios(tune: dict, evaluate: dict, tune_name: str, eval_name: str) -> None:
    """Phase 2 must be the same scenario: as many tasks, and each task within one class of the other's."""
    a, b = scenario(tune), scenario(evaluate)
    if len(a) != len(b) or any(abs(x - y) > 1 for x, y in zip(a, b)):
        raise ConfigError(f"--eval-on {eval_name}: its scenario ({len(b)} tasks, classes per task {b}) differs "
                          f"from --tune-on {tune_name} ({len(a)} tasks, {a}): the two-phase protocol compares "
                          f"like with like (e.g. wordnet-fine[tasks=0:10] -> wordnet-fine[tasks=10:20])")


def _with(values: dict, dotted: dict[str, Any]) -> dict:
    values = copy.deepcopy(values)
    for key, value in dotted.items():
        set_dotted(values, key, value)
    return values


@contextlib.contextmanager
def heartbeat_api() -> Iterator[None]:
    """Optuna 4-5 mark the heartbeat API (storage heartbeats, ``fail_stale_trials``) experimental
    and warn at every use; conpet relies on it knowingly."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


def open_storage(url: str, heartbeat: int) -> RDBStorage:
    try:
        with heartbeat_api():
            return RDBStorage(url, heartbeat_interval=heartbeat, grace_period=2 * heartbeat,
                              heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    except Exception as e:  # SQLAlchemy raises many kinds for a bad URL or an unreachable server
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f"--storage {url}: cannot open it ({first})") from None


def make_sampler(name: str, seed: int) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise ConfigError(f"--sampler {name}: choose one of {', '.join(SAMPLERS)}")
    # each worker draws its own sequence (two workers with one seed would propose the same trials)
    seed = seed + os.getpid()
    return {"nsga2": optuna.samplers.NSGAIISampler, "tpe": optuna.samplers.TPESampler,
            "random": optuna.samplers.RandomSampler}[name](seed=seed)


def space_fingerprint(space: Space) -> str:
    text = json.dumps({"base": space.base, "params": [vars(p) | {"line": 0} for p in space.params],
                       "objectives": space.objectives, "seeds": space.seeds}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def search(space_path: str | Path, out: str | Path, tune_on: str | None = None, eval_on: str | None = None,
           storage: str | None = None, study_name: str | None = None, sampler: str = "tpe", seed: int = 0,
           trials: int | None = None, prune: bool = True, min_trials: int = 5, heartbeat: int = 60,
           eval_seeds: int = 3, progress: bool = False) -> SearchResult:
    """Run (or join) a search and write its outputs under ``out`` (see the module docstring).
    Every input is checked before anything is written."""
    if optuna is None:
        raise ConfigError("conpet search needs Optuna: pip install 'optuna>=4.9'")
    space = load_space(space_path)
    if trials is not None:
        if trials < 1:
            raise ConfigError(f"--trials {trials}: must be >= 1")
        space.trials = trials
    if tune_on:
        space.base = _with(space.base, stream_spec(tune_on))
    eval_values = _with(space.base, stream_spec(eval_on)) if eval_on else None
    if eval_values is not None:
        if eval_seeds < 1:
            raise ConfigError(f"--eval-seeds {eval_seeds}: must be >= 1")
        check_scenarios(space.base.get("data", {}), eval_values.get("data", {}), tune_on or "the base stream", eval_on)
    make_sampler(sampler, seed)  # a bad name fails before anything is written
    out = Path(out)
    url = storage or f"sqlite:///{(out / 'study.db').resolve()}"
    if storage is None:
        check_out_dir(out)
    study_storage = open_storage(url, heartbeat)
    name = study_name or out.name
    directions = [DIRECTIONS[o] for o in space.objectives]
    study = optuna.create_study(study_name=name, storage=study_storage, directions=directions,
                                sampler=make_sampler(sampler, seed), load_if_exists=True)
    fingerprint = space_fingerprint(space)
    known = study.user_attrs.get("space")
    if known is None:
        study.set_user_attr("space", fingerprint)
        study.set_user_attr("objectives", list(space.objectives))
    elif known != fingerprint:
        raise ConfigError(f"--study {name}: this study was started with another search space (or stream); "
                          f"name a new study")
    check_out_dir(out)
    atomic_write_text(out / "space.yaml", yaml.safe_dump({"base": space.base, "trials": space.trials,
                                                          "seeds": space.seeds,
                                                          "objectives": list(space.objectives)}, sort_keys=False)
                      + "# params: see " + str(Path(space_path).resolve()) + "\n")
    objective = Objective(space, out, prune, min_trials, progress)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    finished = (TrialState.COMPLETE, TrialState.PRUNED)
    if len(study.get_trials(deepcopy=False, states=finished)) < space.trials:  # joining a finished study runs none
        study.optimize(objective, callbacks=[StopAtBudget(space.trials)], gc_after_trial=True)
    result = summarize(study, space, out)
    if eval_values is not None and result.front:
        result.phase2 = phase_two(result, space, eval_on, eval_seeds, out, progress)
    return result


class StopAtBudget:
    """Stop this worker once the study's finished trials (complete or pruned) and the trials other
    workers are running reach ``trials``. Optuna's ``MaxTrialsCallback`` counts finished trials
    only, so every worker that finishes a trial while the others run the last ones starts one
    more: with W workers a study ended up to W - 1 trials over its budget. A dead worker's trial
    stops counting once its heartbeat is stale (it is failed here, and retried by a later worker)."""

    def __init__(self, trials: int) -> None:
        self.trials = trials

    def __call__(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        with heartbeat_api():
            fail_stale_trials(study)
        busy = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING))
        if len(busy) >= self.trials:
            study.stop()


class Objective:
    """One trial: draw a configuration, run it on the tuning stream's dev rows, return its scores."""

    def __init__(self, space: Space, out: Path, prune: bool, min_trials: int, progress: bool) -> None:
        self.space, self.out, self.prune, self.min_trials, self.progress = space, out, prune, min_trials, progress

    def __call__(self, trial: optuna.Trial) -> tuple[float, ...]:
        space = self.space
        picked = space.sample(trial)
        original = trial.study.get_trials(deepcopy=False)[trial.number].system_attrs.get("failed_trial")
        number = trial.number if original is None else original
        run_dir = self.out / "trials" / f"trial-{number:04d}"
        config = space.config(picked)
        trial.set_user_attr("config", config)
        trial.set_user_attr("run_dir", str(run_dir))
        on_task = self.pruner(trial) if self.prune else None
        if (run_dir / "config.yaml").is_file() and any(run_dir.glob("seed-*/state.json")):
            metrics = resume(run_dir, progress=self.progress, on_task=on_task)  # a retried trial
        else:
            cfg = from_dict(_with(config, {"data.eval_split": "dev", "seeds": space.seeds, "out": str(run_dir)}),
                            f"trial {number}")
            metrics = run(cfg, progress=self.progress, on_task=on_task)
        scores = {"accuracy": 100 * metrics["average_accuracy"], "params": float(metrics["tunable_params"]),
                  "seconds": float(sum(metrics["train_seconds"]))}
        trial.set_user_attr("scores", scores)
        return tuple(scores[o] for o in space.objectives)

    def pruner(self, trial: optuna.Trial):
        study = trial.study

        def on_task(seed: int, t: int, accs: list[float]) -> None:
            value = 100 * sum(accs) / len(accs)
            trial.set_user_attr(f"dev_after_task_{seed}_{t}", value)
            if t == 0:  # the first task is a warm-up: every configuration learns it
                return
            others = [f.user_attrs[f"dev_after_task_{seed}_{t}"]
                      for f in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
                      if f"dev_after_task_{seed}_{t}" in f.user_attrs]
            if should_prune(value, others, self.min_trials):
                raise optuna.TrialPruned(f"dev accuracy {value:.2f}% after task {t + 1} is below the median "
                                         f"of {len(others)} finished trials")

        return on_task


def summarize(study: optuna.Study, space: Space, out: Path) -> SearchResult:
    """The finished trials, their Pareto front, the best configuration per parameter budget as
    ready ``conpet run --config`` files, a table, a plot; written under ``out``."""
    finished = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    points = [{"number": t.number, **t.user_attrs["scores"], "config": t.user_attrs["config"],
               "run_dir": t.user_attrs["run_dir"]} for t in finished]
    front = pareto_front(points, space.objectives)
    counts = {s.name.lower(): sum(t.state == s for t in study.get_trials(deepcopy=False)) for s in TrialState}
    # the budgets: the accuracy-vs-parameters front (each of its points is the best within its own size)
    size_front = pareto_front(points, ("accuracy", "params"))
    best = best_per_budget(points, sorted({points[i]["params"] for i in size_front}))
    configs = out / "best"
    configs.mkdir(parents=True, exist_ok=True)
    exported = {}
    for budget, i in best.items():
        path = configs / f"params-{int(budget)}.yaml"
        atomic_write_text(path, f"# conpet search: trial {points[i]['number']}, dev accuracy "
                                f"{points[i]['accuracy']:.2f}% with {int(points[i]['params']):,} tunable parameters "
                                f"(tuned on dev rows only)\n# run it: conpet run --config {path}\n"
                          + yaml.safe_dump(points[i]["config"], sort_keys=False))
        exported[int(budget)] = str(path)
    summary = {"study": study.study_name, "objectives": list(space.objectives), "trials": counts,
               "points": points, "front": [points[i]["number"] for i in front], "best_per_budget": exported,
               "date": time.strftime("%Y-%m-%d %H:%M")}
    atomic_write_json(out / "search.json", summary)
    atomic_write_text(out / "search.md", search_table(summary))
    if points:
        pareto_plot(points, front, size_front, out / "pareto.png")
    return SearchResult(out, points, front)


def describe(config: dict) -> str:
    pet = config.get("pet", {})
    opts = ",".join(f"{k}={v}" for k, v in (pet.get("options") or {}).items())
    top = config.get("train", {}).get("top_layers", "auto")
    return f"{config.get('learner', 'sequential')} + {pet.get('method', 'lora')}" + (f"[{opts}]" if opts else "") + \
        f", top_layers={top}"


def search_table(summary: dict) -> str:
    """The Pareto front (and the trial counts) as a Markdown table."""
    by_number = {p["number"]: p for p in summary["points"]}
    lines = [f"# conpet search: study {summary['study']}", "",
             "Trials: " + ", ".join(f"{v} {k}" for k, v in summary["trials"].items() if v), "",
             "Pareto front (dev accuracy up, tunable parameters and training seconds down; dev rows only):", "",
             "| trial | dev accuracy % | tunable params | train s | configuration |", "|---|---|---|---|---|"]
    for n in summary["front"]:
        p = by_number[n]
        lines.append(f"| {n} | {p['accuracy']:.2f} | {int(p['params']):,} | {p['seconds']:.1f} | {describe(p['config'])} |")
    if summary.get("phase2"):
        ph = summary["phase2"]
        lines += ["", f"Phase 2 on {ph['stream']} (test rows, {ph['seeds']} seed(s)):", "",
                  "| configuration | average accuracy % | forgetting % | tunable params |", "|---|---|---|---|"]
        for row in ph["rows"]:
            lines.append(f"| {row['name']}: {describe(row['config'])} | {row['accuracy']:.2f} ± {row['accuracy_std']:.2f} "
                         f"| {row['forgetting']:.2f} | {row['params']:,} |")
    return "\n".join(lines) + "\n"


def pareto_plot(points: list[dict], front: list[int], size_front: list[int], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    methods = sorted({p["config"].get("pet", {}).get("method", "lora") for p in points})
    colours = {m: plt.cm.tab10(k % 10) for k, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for m in methods:
        mine = [p for p in points if p["config"].get("pet", {}).get("method", "lora") == m]
        ax.scatter([p["params"] for p in mine], [p["accuracy"] for p in mine], color=colours[m], label=m, alpha=0.8)
    ax.scatter([points[i]["params"] for i in front], [points[i]["accuracy"] for i in front], s=90,
               facecolors="none", edgecolors="black", lw=1, label="Pareto front (all objectives)")
    line = sorted((points[i]["params"], points[i]["accuracy"]) for i in size_front)
    ax.step([x for x, _ in line], [y for _, y in line], where="post", color="black", lw=1,
            label="best accuracy per parameter budget")
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1000:g}k"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("tunable parameters")
    ax.set_ylabel("dev average accuracy (%)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def phase_two(result: SearchResult, space: Space, eval_on: str, seeds: int, out: Path, progress: bool) -> dict:
    """Train the most accurate configuration of the front on the evaluation stream (``seeds``
    seeds), and the base configuration beside it; report both on that stream's test rows."""
    chosen = result.points[result.front[0]]
    rows = []
    for name, config in (("searched", chosen["config"]), ("defaults", space.base)):
        values = _with(config, {k: v for k, v in stream_spec(eval_on).items()})
        values = _with(values, {"data.eval_split": "test", "seeds": seeds,
                                "out": str(out / "phase2" / name)})
        run_dir = out / "phase2" / name
        if (run_dir / "metrics.json").is_file():
            metrics = json.loads((run_dir / "metrics.json").read_text())
        elif (run_dir / "config.yaml").is_file() and any(run_dir.glob("seed-*/state.json")):
            metrics = resume(run_dir, progress=progress)
        else:
            metrics = run(from_dict(values, f"phase 2 ({name})"), progress=progress)
        rows.append({"name": name, "config": config, "accuracy": 100 * metrics["average_accuracy"],
                     "accuracy_std": 100 * metrics.get("std", {}).get("average_accuracy", 0.0),
                     "forgetting": 100 * metrics["forgetting"], "params": int(metrics["tunable_params"]),
                     "run_dir": str(run_dir)})
    phase2 = {"stream": eval_on, "seeds": seeds, "chosen_trial": chosen["number"], "rows": rows}
    summary = json.loads((out / "search.json").read_text())
    summary["phase2"] = phase2
    atomic_write_json(out / "search.json", summary)
    atomic_write_text(out / "search.md", search_table(summary))
    return phase2


def is_search_dir(path: Path) -> bool:
    return (Path(path) / "search.json").is_file()


def report_search(path: Path) -> str:
    """What ``conpet report SEARCH_DIR`` prints."""
    return search_table(json.loads((Path(path) / "search.json").read_text()))
