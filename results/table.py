"""Regenerate every results table in README.md and docs/ from the committed result files in this folder.

    python results/table.py           # print the tables
    python results/table.py --write   # rewrite them in place, between <!-- table:NAME --> ... <!-- /table:NAME -->

Each gridworld file is the eval.json of one `train_lopt.py --eval-only` run (its command is in FILES); brax/<task>/
holds the runs of `eval_brax.py --protocol` (BRAX_PROTOCOL) and each older Brax file the summary.json of one
`eval_brax.py` run (BRAX_FILES); the statistics are recomputed here from the per-seed returns, never copied from
the file. Each file in meta_screens/ holds the rows of one meta-training run's
metrics.csv where validation was measured (its flags are in SCREENS; the ES pilot's file is its own csv).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, REPO)

import numpy as np  # noqa: E402

import train_lopt as tl  # noqa: E402
from common import iqm_interval  # noqa: E402

PREVIOUS = "--lopt-path checkpoints/previous/optim4rl_gridworld.msgpack"  # shipped 2026-11-28 to 2026-12-03
FIRST = "--lopt-path checkpoints/2026-11-25/optim4rl_gridworld.msgpack"  # shipped 2026-11-25 to 2026-11-28
E6 = "--eval-steps 1000000"
# result file -> the command that wrote it (as runs/<run-name>/eval.json, then copied here; a file written before
# its checkpoint moved under checkpoints/ names the checkpoint's new place). The shipped files were rerun on
# 2026-12-06, when OPEN joined the evaluation: same checkpoint as gridworld_envs32_s2_*.json, other numerics
# (docs/results.md, "Rerun with OPEN")
FILES = {
    "gridworld_shipped_1e5.json": "python train_lopt.py --env-group gridworld --eval-only",
    "gridworld_shipped_1e6.json": f"python train_lopt.py --env-group gridworld --eval-only {E6}",
    "gridworld_previous_1e5.json": f"python train_lopt.py --env-group gridworld --eval-only {PREVIOUS}",
    "gridworld_previous_1e6.json": f"python train_lopt.py --env-group gridworld --eval-only {E6} {PREVIOUS}",
    "gridworld_2026-11-25_1e5.json": f"python train_lopt.py --env-group gridworld --eval-only {FIRST}",
    "gridworld_2026-11-25_1e6.json": f"python train_lopt.py --env-group gridworld --eval-only {E6} {FIRST}",
}
ROWS = {  # eval.json name -> row label
    "lopt": "learned optimizer, its meta-trained lr",
    "lopt_tuned": "learned optimizer, lr tuned",
    "open": "OPEN (its published gridworld weights), lr tuned",
    "sign_sgd": "sign-SGD (its meta-step-0 self), lr tuned",
    "rmsprop": "RMSProp, lr tuned",
    "adam": "Adam, lr tuned",
}
OPEN_ROWS = ("lopt", "lopt_tuned", "open", "sign_sgd", "adam")  # docs/open.md's table: the two learned optimizers
BRAX = "python eval_brax.py --num-seeds 8"
# Brax result file -> the command that wrote it (its summary.json, copied here; the _tuned and _adam_brax files were
# run while the optimizer now in checkpoints/previous/ was the shipped one, the default --lopt-path then)
BRAX_TUNED = f"--optimizers adam lopt --learning-rates 1e-3 3e-4 1e-4 {PREVIOUS}"
BRAX_FILES = {
    "brax_inverted_double_pendulum_tuned.json": f"{BRAX} --env inverted_double_pendulum {BRAX_TUNED}",
    "brax_inverted_double_pendulum_adam_brax.json": f"{BRAX} --env inverted_double_pendulum --optimizers adam_brax",
    "brax_hopper_tuned.json": f"{BRAX} --env hopper {BRAX_TUNED}",
    "brax_hopper_adam_brax.json": f"{BRAX} --env hopper --optimizers adam_brax",
    # the optimizer shipped since 2026-12-03 (the default --lopt-path)
    "brax_inverted_double_pendulum_shipped.json": f"{BRAX} --env inverted_double_pendulum --optimizers lopt",
    "brax_hopper_shipped.json": f"{BRAX} --env hopper --optimizers lopt",
}
SCREEN = "python train_lopt.py --env-group gridworld --no-final-eval --seed 0"
PAPER_LOSS = "--meta-value-coef 0.5 --meta-loss-scale raw"  # the paper's meta-loss; the default is policy-only, td
ENVS_4 = "--num-envs 4"  # the default batch per agent before 2026-12-03
OLD_DEFAULT = f"{PAPER_LOSS} --no-normalize-step --lopt-lr 3e-3 {ENVS_4}"  # the bare command before 2026-11-29
# meta_screens/ file -> the flags added to SCREEN, relative to today's defaults (a run stopped early is marked so)
SCREENS = {
    "default.csv": OLD_DEFAULT,
    "num_agents_32.csv": f"{OLD_DEFAULT} --num-agents 32",
    "td.csv": f"--meta-value-coef 0.5 --no-normalize-step --lopt-lr 3e-3 {ENVS_4}",
    "normalize_step_lr_1e-2.csv": f"{PAPER_LOSS} {ENVS_4}",
    "normalize_step_lr_1e-2_td.csv": f"--meta-value-coef 0.5 {ENVS_4}",
    "normalize_step_lr_1e-2_k16.csv": f"{PAPER_LOSS} --inner-updates 16 {ENVS_4}",
    "normalize_step_lr_1e-2_envs_32.csv": PAPER_LOSS,
    "normalize_step_lr_1e-2_meta_lr_1e-4.csv": f"{PAPER_LOSS} --meta-lr 1e-4 {ENVS_4}",
    "normalize_step_lr_1e-2_td_policy_only.csv": ENVS_4,
    "envs_32.csv": "",
    "reset_400_no_normalize.csv": "--reset-interval 400 --no-normalize-step",
    "meta_grad_pes.csv": "--meta-grad pes",
    "es_pilot.csv": "ES pilot: python benchmarks/es_pilot.py --es-steps 30 (8 antithetic pairs x 4 seeds per task)",
}
POLICY_ONLY = f"--normalize-step --lopt-lr 1e-2 --meta-loss-scale td --meta-value-coef 0 {ENVS_4}"
# The kept optimizer of `python train_lopt.py --env-group gridworld <POLICY_ONLY> --seed S` (its final evaluation's
# eval.json; seed 0's meta-training ran with --no-final-eval, then --eval-only on its optimizer_best.msgpack)
SEED_FILES = {f"gridworld_policy_only_s{seed}_1e5.json": seed for seed in (0, 1, 2)}
# The kept optimizer of `python train_lopt.py --env-group gridworld --num-envs 32 --seed S` (the default since
# 2026-12-03: the evaluation's batch per agent; seed 0 ran with --no-final-eval, then --eval-only on its
# optimizer_best.msgpack); at 1e6: --eval-only --eval-steps 1000000 on the same optimizer_best.msgpack
ENVS_32_FILES = {f"gridworld_envs32_s{seed}_1e5.json": seed for seed in (0, 1, 2)}
ENVS_32_1E6_FILES = {f"gridworld_envs32_s{seed}_1e6.json": seed for seed in (0, 1, 2)}  # --eval-steps 1000000
# The kept optimizer of the screen `--reset-interval 400 --no-normalize-step` (meta_screens/reset_400_no_normalize.csv:
# lifetimes of 400 x K 4 = 1,600 updates, the step's size left to meta-training), at both horizons:
# python train_lopt.py --env-group gridworld --eval-only [--eval-steps 1000000] --lopt-path <run>/optimizer_best.msgpack
# The kept optimizer of `python train_lopt.py --env-group gridworld --no-final-eval --seed 0 --step-spread 2
# --step-schedule 8` (results/recipes/sched_8_spread_2_s0/optimizer_best.msgpack), through the tuned protocol:
# --eval-only --lopt-path <it> [--eval-steps 1000000]
SCHEDULE_FILES = {"gridworld_sched8_spread2_s0_1e5.json": "1e5", "gridworld_sched8_spread2_s0_1e6.json": "1e6"}
ALIGNED_FILES = {"gridworld_aligned_s0_1e5.json": "1e5", "gridworld_aligned_s0_1e6.json": "1e6"}  # --eval-steps
SEED_ROWS = ("lopt", "lopt_tuned", "lopt_init", "sign_sgd", "adam")
# meta_screens/ file -> meta-seed: the default recipe's validation over 1000 meta-steps (the runs of ENVS_32_FILES)
DEFAULT_RUNS = {"envs_32.csv": 0, "envs_32_s1.csv": 1, "envs_32_s2.csv": 2}
# meta_screens/ file -> meta-seed: the POLICY_ONLY recipe's validation over 2000 meta-steps (the runs of SEED_FILES,
# resumed with --resume --meta-steps 2000 --no-final-eval)
LONG_RUNS = {f"policy_only_s{seed}_2000.csv": seed for seed in (0, 1, 2)}
# benchmarks/schedule_headroom.py's file: Adam and sign-SGD with lr / sqrt(1 + t / tau), (lr, tau) picked once for
# both horizons on the validation seeds, run on train_lopt's evaluation seeds (normalised by its files' Adam, random)
HEADROOM = "gridworld_schedule_headroom.json"
HEADROOM_COMMAND = "python benchmarks/schedule_headroom.py"
HEADROOM_OPTIMIZERS = {"sign_sgd": "sign-SGD", "adam": "Adam"}
HEADROOM_LABELS = {"schedule": "decaying lr (lr, tau picked once for both horizons)",
                   "constant": "constant lr picked once for both horizons"}
# benchmarks/meta_gradient_signal.py's files -> their commands' flags
SIGNAL_FILES = {"meta_gradient_signal.json": "",
                "meta_gradient_signal_eval_batch.json": "--objectives eval_batch --num-agents 16 --sizes 4 8 16 "
                                                        "--out results/meta_gradient_signal_eval_batch.json",
                "meta_gradient_signal_aligned.json": "--objectives aligned --num-agents 16 --sizes 4 8 16 "
                                                     "--out results/meta_gradient_signal_aligned.json"}
SIGNAL_LABELS = {"default": "policy term in TD units, 4 envs per agent",
                 "paper": "the paper's A2C loss, 4 envs per agent",
                 "eval_batch": "policy term in TD units, the evaluation's 32 envs per agent (the default)",
                 "aligned": "the default with lifetimes of 400 meta-steps and the step's size learned "
                            "(`--reset-interval 400 --no-normalize-step`)"}
ALONG = "--along --num-agents 16 --sizes 16 --measure-steps 16"
ALONG_FILES = {  # benchmarks/meta_gradient_signal.py --along files -> their commands' flags
    "meta_gradient_along.json": f"{ALONG} --objectives eval_batch paper default --out results/meta_gradient_along.json",
    "meta_gradient_along_aligned.json": f"{ALONG} --objectives aligned --out results/meta_gradient_along_aligned.json",
    "meta_gradient_along_shipped.json": f"{ALONG} --objectives eval_batch --lopt-path "
                                        "checkpoints/optim4rl_gridworld.msgpack --out "
                                        "results/meta_gradient_along_shipped.json"}
TABLES = {  # table name -> result files, in row order
    "gridworld": ["gridworld_shipped_1e5.json", "gridworld_shipped_1e6.json"],
    "gridworld-previous": ["gridworld_previous_1e5.json", "gridworld_previous_1e6.json"],
    "gridworld-2026-11-25": ["gridworld_2026-11-25_1e5.json", "gridworld_2026-11-25_1e6.json"],
}


def load(name: str) -> dict:
    """A result file with its statistics recomputed from the per-seed returns."""
    with open(os.path.join(HERE, name)) as f:
        report = json.load(f)
    results = {t: {"returns": {n: [float("nan") if x is None else x for x in v] for n, v in r["returns"].items()}}
               for t, r in report["tasks"].items()}
    report["summary"] = tl.summarize(results)
    return report


def cell(stat) -> str:
    return "n/a" if stat[0] != stat[0] else f"{stat[0]:.2f} [{stat[1]:.2f}, {stat[2]:.2f}]"


def headroom_rows(report: dict, kinds: tuple[str, ...]) -> list[str]:
    """Rows of the headroom file at the report's horizon, normalised by the report's tuned Adam and random policy
    (the same evaluation seeds: both come from train_lopt.evaluation_keys)."""
    path = os.path.join(HERE, HEADROOM)
    if not os.path.exists(path):
        return []
    with open(path) as f:
        headroom = json.load(f)
    steps = str(report["eval_steps"])
    if (headroom["eval_seeds"], headroom["eval_envs"]) != (report["eval_seeds"], report["eval_envs"]) \
            or report["eval_steps"] not in headroom["horizons"]:
        return []
    tasks = list(report["tasks"])
    informative = report["summary"]["informative_tasks"]
    rows = []
    for name, label in HEADROOM_OPTIMIZERS.items():
        for kind in kinds:
            scores = {t: tl.normalized_scores({**report["tasks"][t]["returns"],
                                               "headroom": headroom["tasks"][t][name]["returns"][steps][kind]},
                                              "headroom") for t in tasks}
            picked = [headroom["tasks"][t][name]["picked"][kind] for t in tasks]
            lrs = " / ".join(tl.format_lr(p["lr"]) + ("" if p["tau"] is None else f", τ {p['tau']:g}") for p in picked)
            cells = [cell(iqm_interval([scores[t]])) for t in tasks]
            aggregate = cell(iqm_interval([scores[t] for t in informative])) if informative else "n/a"
            rows.append(f"| {steps_label(report)} | {label}, {HEADROOM_LABELS[kind]} | {lrs} | "
                        + " | ".join(cells) + f" | {aggregate} |")
    return rows


def steps_label(report: dict) -> str:
    return f"{report['eval_steps']:.0e}".replace("e+0", "e")


def table_head(tasks: list[str]) -> list[str]:
    return ["| env steps per agent | optimizer | learning rate | " + " | ".join(tasks) + " | both tasks (IQM) |",
            "|---|---|---|" + "---:|" * (len(tasks) + 1)]


def report_rows(report: dict, rows: dict[str, str]) -> list[str]:
    """One row per optimizer of a tuned evaluation's file (name -> label): its lrs, per-task and aggregate cells."""
    tasks, summary, lines = list(report["tasks"]), report["summary"], []
    for name, label in rows.items():
        if name not in summary["per_task"][tasks[0]]:  # a file from before the row existed
            continue
        lrs = " / ".join(tl.format_lr(report["tasks"][t]["lr"][name]) for t in tasks)
        cells = [cell(summary["per_task"][t][name]) for t in tasks]
        aggregate = cell(summary["aggregate"][name]) if summary["aggregate"] else "n/a"
        bold = "**" if name.startswith("lopt") else ""
        lines.append(f"| {steps_label(report)} | {label} | {lrs} | "
                     + " | ".join(f"{bold}{c}{bold}" for c in cells) + f" | {bold}{aggregate}{bold} |")
    return lines


def gridworld_table(files: list[str], headroom_kinds: tuple[str, ...] = (), rows: dict[str, str] = ROWS) -> str:
    reports = [load(f) for f in files if os.path.exists(os.path.join(HERE, f))]
    if not reports:
        return "_(no result files yet)_"
    lines = table_head(list(reports[0]["tasks"]))
    for report in reports:
        lines += report_rows(report, rows) + headroom_rows(report, headroom_kinds)
    seeds = {(r["eval_seeds"], r["val_seeds"]) for r in reports}
    lines.append("")
    lines.append("Normalised final return, 0 = random policy, 1 = tuned Adam (mean): interquartile mean over "
                 + ", ".join(f"{e} evaluation seeds (lr picked on {v} validation seeds)" for e, v in sorted(seeds))
                 + ", [95% stratified-bootstrap interval]. Files: "
                 + ", ".join(f"[results/{f}](results/{f})" for f in files) + ".")
    return "\n".join(lines)


def seeds_table(files: dict[str, int | str], column: str = "meta-seed") -> str:
    """One row per file (a meta-seed, or what `column` names): the kept optimizer and the tuned baselines, IQM over
    both tasks [95% CI]."""
    present = [f for f in files if os.path.exists(os.path.join(HERE, f))]
    if not present:
        return "_(no result files yet)_"
    labels = {**ROWS, "lopt_init": "its meta-step-0 self (sign-SGD), same lr"}
    lines = [f"| {column} | kept at meta-step | " + " | ".join(labels[n] for n in SEED_ROWS) + " |",
             "|---:|---:|" + "---:|" * len(SEED_ROWS)]
    reports = {name: load(name) for name in present}
    for name, report in reports.items():
        cells = [cell(report["summary"]["aggregate"][n]) for n in SEED_ROWS]
        lines.append(f"| {files[name]} | {report['lopt_meta_step']} | " + " | ".join(cells) + " |")
    lines.append("")
    horizons = " / ".join(dict.fromkeys(steps_label(report) for report in reports.values()))
    lines.append(f"Both small grids, {horizons} env steps, normalised final return (1 = tuned Adam's mean): IQM over 2 x 16 "
                 "evaluation seeds [95% stratified-bootstrap interval]; every lr picked on 16 validation seeds. "
                 "Files: " + ", ".join(f"[results/{f}](results/{f})" for f in present) + ".")
    return "\n".join(lines)


def load_brax(name: str) -> dict:
    """A Brax summary.json with each run's IQM and interval recomputed from its per-seed final returns."""
    with open(os.path.join(HERE, name)) as f:
        report = json.load(f)
    for run in report["optimizers"].values():
        run["recomputed_iqm_ci"] = iqm_interval([run["final_returns"]])
    return report


def brax_untuned_selection_table() -> str:
    """Before --protocol: final deterministic return per run, IQM over seeds [95% bootstrap CI], by task; each
    task's best Adam with the learned optimizer's clip (its lr picked on the same seeds) is the reference of the
    last column."""
    present = [f for f in BRAX_FILES if os.path.exists(os.path.join(HERE, f))]
    if not present:
        return "_(no result files yet)_"
    by_env = {}
    for name in present:
        report = load_brax(name)
        checkpoint = checkpoint_name(report["settings"]["lopt_path"])
        by_env.setdefault(report["env"], {}).update({(n, checkpoint): r for n, r in report["optimizers"].items()})
    lines = ["| task | optimizer | learning rate | seeds | final return, IQM [95% CI] | IQM / best clipped Adam |",
             "|---|---|---|---:|---:|---:|"]
    for env, runs in by_env.items():
        adams = [r["recomputed_iqm_ci"][0] for (n, _), r in runs.items() if n.split("@")[0] == "adam"]
        best = max(adams) if adams else float("nan")
        # rows in file order, Brax's own Adam setting last (sorted is stable)
        for (run_name, checkpoint), r in sorted(runs.items(), key=lambda run: run[0][0] == "adam_brax"):
            iqm, low, high = r["recomputed_iqm_ci"]
            label = {"adam": "Adam, learned optimizer's clip", "adam_brax": "Adam, Brax's setting (no clip)",
                     "lopt": f"learned optimizer ({checkpoint})"
                     }.get(run_name.split("@")[0], run_name.split("@")[0])
            bold = "**" if run_name == "lopt" else ""
            lines.append(f"| {env} | {label} | {tl.format_lr(r['learning_rate'])} | {len(r['final_returns'])} | "
                         f"{bold}{iqm:.0f} [{low:.0f}, {high:.0f}]{bold} | {bold}{iqm / best:.2f}{bold} |")
    lines.append("")
    lines.append("Final deterministic return after the CPU preset's budget; the best Adam is picked on the same 8 "
                 "seeds it is reported on (this favours Adam). Files: "
                 + ", ".join(f"[results/{f}](results/{f})" for f in present) + ".")
    return "\n".join(lines)


BRAX_PROTOCOL = "python eval_brax.py --protocol"  # writes brax/<task>/: one file per run and protocol.json
BRAX_TASKS = ("inverted_double_pendulum", "hopper", "reacher", "ant")  # eval_brax.py's --protocol-tasks
BRAX_ROWS = {  # protocol.json's reported runs -> row label (and line in the figure)
    "lopt": "learned optimizer, lr tuned",
    "lopt_paper_lr": "learned optimizer, the paper's lr",
    "open": "OPEN (its published gridworld weights), lr tuned",
    "sign_sgd": "sign-SGD (its meta-step-0 self), lr tuned",
    "adam": "Adam, its clip, lr tuned",
    "adam_brax": "Adam, Brax's setting (no clip)",
}


def load_protocol(folder: str = os.path.join(HERE, "brax"), file: str = "protocol.json") -> dict[str, dict]:
    """{task: its protocol.json with each reported run loaded under "runs"}, for the tasks whose protocol finished,
    in eval_brax's task order. Each run's curves are per-seed returns at each evaluation (0 = before training)."""
    tasks = {}
    found = os.listdir(folder) if os.path.isdir(folder) else []
    for task in sorted(found, key=lambda t: (BRAX_TASKS.index(t) if t in BRAX_TASKS else len(BRAX_TASKS), t)):
        path = os.path.join(folder, task, file)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            protocol = json.load(f)
        protocol["runs"] = {}
        for label, name in protocol["reported"].items():
            with open(os.path.join(folder, task, name)) as f:
                run = json.load(f)
            run["returns"] = np.array(run["returns"])  # [seed, evaluation]
            protocol["runs"][label] = run
        tasks[task] = protocol
    return tasks


def brax_normalized(protocol: dict) -> dict[str, np.ndarray]:
    """Per-seed final returns on the scale 0 = the untrained policy (evaluation 0, the same initial networks for
    every optimizer) and 1 = tuned clipped Adam's IQM, per reported run."""
    runs = protocol["runs"]
    random = float(np.mean(runs["adam"]["returns"][:, 0]))
    adam = iqm_interval([runs["adam"]["returns"][:, -1]])[0]
    return {label: (run["returns"][:, -1] - random) / (adam - random) for label, run in runs.items()}


VALIDATION_TASKS = ("pendulum",)  # eval_brax.py's validation family, as run (results/validation/<task>/)
VALIDATION_PROTOCOL = "python eval_brax.py --protocol --protocol-tasks pendulum"


def brax_table(family: str = "brax") -> str:
    """Per task and over the tasks together: each optimizer's final return, lr picked on selection seeds. family:
    'brax' (the test) or 'validation' (gymnax tasks under the same PPO, which selection may look at)."""
    tasks = load_protocol(os.path.join(HERE, family))
    if not tasks:
        return "_(no result files yet)_"
    lines = ["| task | optimizer | lr | final return, IQM [95% CI] | normalised, IQM [95% CI] |",
             "|---|---|---:|---:|---:|"]
    normalized = {task: brax_normalized(p) for task, p in tasks.items()}
    for task, protocol in tasks.items():
        for label, row in BRAX_ROWS.items():
            if label not in protocol["runs"]:  # a protocol from before the row existed
                continue
            run = protocol["runs"][label]
            raw = iqm_interval([run["returns"][:, -1]])
            norm = iqm_interval([normalized[task][label]])
            bold = "**" if label.startswith("lopt") else ""
            lines.append(f"| {task} | {row} | {tl.format_lr(run['fingerprint']['learning_rate'])} | "
                         f"{bold}{raw[0]:.0f} [{raw[1]:.0f}, {raw[2]:.0f}]{bold} | "
                         f"{bold}{norm[0]:.2f} [{norm[1]:.2f}, {norm[2]:.2f}]{bold} |")
    if len(tasks) > 1:
        for label, row in BRAX_ROWS.items():
            having = [task for task in tasks if label in normalized[task]]
            if len(having) < 2:
                continue
            norm = iqm_interval([normalized[task][label] for task in having])
            bold = "**" if label.startswith("lopt") else ""
            where = f"all {len(tasks)}" if len(having) == len(tasks) else " + ".join(having)
            lines.append(f"| {where} | {row} | | | {bold}{norm[0]:.2f} [{norm[1]:.2f}, {norm[2]:.2f}]{bold} |")
    first = next(iter(tasks.values()))
    missing = [t for t in (BRAX_TASKS if family == "brax" else VALIDATION_TASKS) if t not in tasks]
    command = BRAX_PROTOCOL if family == "brax" else VALIDATION_PROTOCOL
    lines.append("")
    lines.append(f"Final deterministic return after the CPU preset's budget, IQM over {first['num_seeds']} seeds with "
                 f"a 95% stratified-bootstrap interval; each lr picked by mean final return on "
                 f"{first['selection_seeds']} other seeds (grid 1e-4, 3e-4, 1e-3, extended at an edge). Normalised: "
                 "0 = the untrained policy, 1 = tuned clipped Adam. Learned optimizer: "
                 f"{checkpoint_name(first['lopt_path'])}. Command: `{command}`"
                 + (f" (not run yet: {', '.join(missing)})" if missing else "")
                 + "; files: " + ", ".join(f"[results/{family}/{t}/](results/{family}/{t}/)" for t in tasks) + ".")
    return "\n".join(lines)


def brax_summary_table(folder: str = os.path.join(HERE, "brax")) -> str:
    """The README's: normalised final return per task and over the tasks, one column per optimizer."""
    tasks = load_protocol(folder)
    if not tasks:
        return "_(no result files yet)_"
    normalized = {task: brax_normalized(p) for task, p in tasks.items()}
    columns = {"lopt": "learned, lr tuned", "lopt_paper_lr": "learned, 3e-4", "open": "OPEN, tuned",
               "sign_sgd": "sign-SGD, tuned", "adam": "Adam, tuned", "adam_brax": "Adam, Brax's"}
    if not any("open" in normalized[task] for task in tasks):
        del columns["open"]
    lines = ["| task | " + " | ".join(columns.values()) + " |", "|---|" + "---:|" * len(columns)]

    def cell(scores, label):
        if any(score is None for score in scores):  # a task whose protocol ran before this optimizer joined it
            return "n/a"
        iqm, low, high = iqm_interval(scores)
        bold = "**" if label == "lopt" else ""
        return f"{bold}{iqm:.2f} [{low:.2f}, {high:.2f}]{bold}"

    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(cell([normalized[task].get(c)], c) for c in columns) + " |")
    if len(tasks) > 1:
        lines.append(f"| all {len(tasks)} | "
                     + " | ".join(cell([normalized[t].get(c) for t in tasks], c) for c in columns) + " |")
    first = next(iter(tasks.values()))
    lines.append("")
    lines.append(f"Final deterministic return, IQM [95% CI] over {first['num_seeds']} seeds per task, normalised "
                 "per task: 0 = the untrained policy, 1 = tuned Adam (with the learned optimizer's element-wise clip). "
                 f"Each lr picked on {first['selection_seeds']} other seeds. `{BRAX_PROTOCOL}`; raw returns, lrs and "
                 "files: [docs/brax.md](docs/brax.md).")
    return "\n".join(lines)


def plot_brax(path: str, folder: str = os.path.join(HERE, "brax")) -> None:
    """Return against env steps per task: IQM over the reported seeds with its 95% bootstrap interval."""
    tasks = load_protocol(folder)
    if not tasks:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = min(len(tasks), 2)  # two panels a row keeps four tasks readable at the README's width
    rows = -(-len(tasks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols + 0.4, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(tasks):]:
        ax.set_visible(False)
    for ax, (task, protocol) in zip(axes.flat, tasks.items()):
        lines = {"lopt": ("C3", "learned optimizer"), "open": ("C1", "OPEN (gridworld weights)"),
                 "sign_sgd": ("C2", "sign-SGD (its meta-step-0 self)"), "adam": ("C0", "Adam, its clip"),
                 "adam_brax": ("C7", "Adam, Brax's setting")}
        for label, (color, name) in lines.items():
            if label not in protocol["runs"]:
                continue
            run = protocol["runs"][label]
            curve = np.array([iqm_interval([run["returns"][:, t]], samples=2000) for t in range(run["returns"].shape[1])])
            steps = np.array(run["env_steps"]) / 1e3
            ax.plot(steps, curve[:, 0], color=color, label=f"{name} @ {tl.format_lr(run['fingerprint']['learning_rate'])}")
            ax.fill_between(steps, curve[:, 1], curve[:, 2], color=color, alpha=0.2)
        ax.set(title=f"{task} ({protocol['backend']})", xlabel="env steps (thousands)")
        ax.legend(fontsize=7)
    for ax in axes[:, 0]:
        ax.set_ylabel(f"eval return, IQM [95% CI], {next(iter(tasks.values()))['num_seeds']} seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def checkpoint_name(path: str) -> str:
    """How a table names a checkpoint under checkpoints/: shipped, previous, or its folder."""
    folder = os.path.basename(os.path.dirname(path))
    return "shipped" if folder == "checkpoints" else folder


def load_screen(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, validation scores) of a screen: meta-steps, or ES steps for the ES pilot."""
    with open(os.path.join(HERE, "meta_screens", name)) as f:
        rows = [r for r in csv.DictReader(f) if r["val_score"] != ""]
    step = "es_step" if "es_step" in rows[0] else "meta_step"
    return np.array([int(r[step]) for r in rows]), np.array([float(r["val_score"]) for r in rows])


def trajectory_cells(name: str, at: tuple[int, ...] = ()) -> list[str]:
    """Table cells of a validation curve: steps run, score at 0, best (its step), at each step of `at`, last,
    last / best."""
    steps, scores = load_screen(name)
    best = int(np.argmax(scores))
    middle = [f"{scores[list(steps).index(s)]:.2f}" if s in steps else "n/a" for s in at]
    return [str(steps[-1]), f"{scores[0]:.2f}", f"{scores[best]:.2f} ({steps[best]})", *middle,
            f"{scores[-1]:.2f}", f"{scores[-1] / scores[best]:.2f}"]


def screens_table() -> str:
    present = [f for f in SCREENS if os.path.exists(os.path.join(HERE, "meta_screens", f))]
    if not present:
        return "_(no result files yet)_"
    lines = ["| flags | steps run | validation at 0 | best (step) | last | last / best |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in present:
        flags = SCREENS[name] if name.startswith("es_") else f"`{SCREENS[name] or '(none: the default today)'}`"
        lines.append("| " + " | ".join([flags, *trajectory_cells(name)]) + " |")
    lines.append("")
    lines.append(f"Validation score (mean normalised final return on 16 validation seeds per small grid, 1 = tuned "
                 f"Adam) of `{SCREEN}` plus the flags; meta-seed 0, 1000 meta-steps unless fewer were run (a run "
                 "stopped once its trend was clear). Files: [results/meta_screens/](results/meta_screens/).")
    return "\n".join(lines)


def plot_screens(path: str) -> None:
    """Validation against meta-steps of every screen (the ES pilot's steps are not meta-steps: left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(13, 5))
    for i, name in enumerate(f for f in SCREENS if not f.startswith("es_")):
        if os.path.exists(os.path.join(HERE, "meta_screens", name)):
            ax.plot(*load_screen(name), color=f"C{i % 10}", ls="-" if i < 10 else "--",
                    label=SCREENS[name] or "(today's default)")
    ax.axhline(1.0, color="gray", lw=1, ls=":", label="tuned Adam")
    ax.set(xlabel="meta-step", ylabel="validation score (1 = tuned Adam)", title="meta-training screens, meta-seed 0")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_meta_grad(path: str) -> None:
    """`--meta-grad truncated` (the default) against `pes` on meta-seed 0: validation by meta-step and by wall
    time (each run shared the 2 cores with one other job; the controlled cost ratio is benchmarks/bench_meta_grad.py's)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (step_ax, time_ax) = plt.subplots(1, 2, figsize=(11, 3.6), sharey=True)
    for i, (name, label) in enumerate({"envs_32.csv": "truncated (default)", "meta_grad_pes.csv": "pes"}.items()):
        with open(os.path.join(HERE, "meta_screens", name)) as f:
            rows = [r for r in csv.DictReader(f) if r["val_score"] != ""]
        minutes = (np.array([float(r["time"]) for r in rows]) - float(rows[0]["time"])) / 60
        steps, scores = load_screen(name)
        step_ax.plot(steps, scores, color=f"C{i}", label=label)
        time_ax.plot(minutes, scores, color=f"C{i}", label=label)
    for ax in (step_ax, time_ax):
        ax.axhline(1.0, color="gray", lw=1, ls=":", label="tuned Adam")
    step_ax.set(xlabel="meta-step", ylabel="validation score (1 = tuned Adam)")
    time_ax.set(xlabel="wall minutes, 2 cores (each run beside one other job)")
    time_ax.legend(fontsize=8)
    fig.suptitle("meta-gradient estimators, meta-seed 0, 8 agents per task", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_seed_runs(runs: dict[str, int], path: str) -> None:
    """A recipe on 3 meta-seeds: validation score and the learned step relative to sign-SGD's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (score_ax, step_ax) = plt.subplots(1, 2, figsize=(11, 3.6))
    for name, seed in runs.items():
        path_csv = os.path.join(HERE, "meta_screens", name)
        if not os.path.exists(path_csv):
            continue
        score_ax.plot(*load_screen(name), color=f"C{seed}", label=f"meta-seed {seed}")
        with open(path_csv) as f:
            rows = [r for r in csv.DictReader(f) if r.get("step_ratio/small_dense_long")]
        steps = [int(r["meta_step"]) for r in rows]
        for task, style in (("small_dense_long", "-"), ("small_dense_short", "--")):
            step_ax.plot(steps, [float(r[f"step_ratio/{task}"]) for r in rows], color=f"C{seed}", ls=style,
                         label=f"seed {seed}, {task}")
    score_ax.axhline(1.0, color="gray", lw=1, ls=":", label="tuned Adam")
    score_ax.set(xlabel="meta-step", ylabel="validation score (1 = tuned Adam)",
                 title="validation (meta-step 0 = sign-SGD at lr 1e-2)")
    step_ax.set(xlabel="meta-step", ylabel="mean |step| / lr (sign-SGD: 1)", title="the learned step's size")
    score_ax.legend(fontsize=8)
    step_ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def long_runs_table() -> str:
    present = [f for f in LONG_RUNS if os.path.exists(os.path.join(HERE, "meta_screens", f))]
    if not present:
        return "_(no result files yet)_"
    lines = ["| meta-seed | meta-steps | validation at 0 | best (meta-step) | at 1000 | last | last / best |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for name in present:
        lines.append("| " + " | ".join([str(LONG_RUNS[name]), *trajectory_cells(name, at=(1000,))]) + " |")
    lines.append("")
    lines.append(f"Validation score (1 = tuned Adam) of `{POLICY_ONLY}`, every 25 meta-steps. Files: "
                 + ", ".join(f"[results/meta_screens/{f}](results/meta_screens/{f})" for f in present) + ".")
    return "\n".join(lines)


def headroom_table() -> str:
    """The schedule's headroom beside the baselines tuned per horizon: each horizon's tuned Adam and sign-SGD (from
    the tuned evaluation's files), then the constant lr and the decaying lr, each picked once for both horizons."""
    if not os.path.exists(os.path.join(HERE, HEADROOM)):
        return "_(no result file yet)_"
    reports = [load(f) for f in TABLES["gridworld"]]
    lines = table_head(list(reports[0]["tasks"]))
    for report in reports:
        lines += report_rows(report, {n: f"{label}, lr tuned per horizon" for n, label in HEADROOM_OPTIMIZERS.items()})
        lines += headroom_rows(report, ("constant", "schedule"))
    with open(os.path.join(HERE, HEADROOM)) as f:
        headroom = json.load(f)
    lines.append("")
    lines.append(f"Normalised final return (0 = random policy, 1 = tuned Adam's mean at that horizon), IQM over "
                 f"{headroom['eval_seeds']} evaluation seeds [95% stratified-bootstrap interval]; decaying lr = "
                 f"lr / sqrt(1 + t / τ), t the update count; picks on {headroom['val_seeds']} validation seeds. "
                 f"Files: [results/{HEADROOM}](results/{HEADROOM}) (`{HEADROOM_COMMAND}`), "
                 + ", ".join(f"[results/{f}](results/{f})" for f in TABLES["gridworld"]) + ".")
    return "\n".join(lines)


def signal_table() -> str:
    """Split-half cosine of the truncated meta-gradient by population size, one row per objective."""
    present = [f for f in SIGNAL_FILES if os.path.exists(os.path.join(HERE, f))]
    if not present:
        return "_(no result files yet)_"
    rows = []
    for name in present:
        with open(os.path.join(HERE, name)) as f:
            report = json.load(f)
        rows += [(name, objective, r) for objective, r in report["objectives"].items()]
    sizes = sorted({int(n) for _, _, r in rows for n in r["split_half_cosine"]})
    lines = ["| objective | " + " | ".join(f"{n} agents" for n in sizes) + " | agents for 0.5 / 0.9 | cost |",
             "|---|" + "---:|" * (len(sizes) + 2)]
    for name, objective, r in rows:
        cosines = r["split_half_cosine"]
        cells = [f"{cosines[str(n)]['mean']:.2f} ± {cosines[str(n)]['stderr']:.2f}" if str(n) in cosines else ""
                 for n in sizes]
        needed = " / ".join("none" if v is None else f"{v:.0f}" for v in r["agents_per_task_for_cosine"].values())
        lines.append(f"| {SIGNAL_LABELS[objective]} | " + " | ".join(cells)
                     + f" | {needed} | {r['seconds'] / 60:.0f} min |")
    lines.append("")
    lines.append("Cosine between the meta-gradients of two disjoint halves of a population (agents per task; mean over "
                 "64 random splits x 8 meta-steps ± the standard error over meta-steps), at the optimizer's meta-step-0 "
                 "parameters, both small grids, the pipeline filled first (one reset interval: 64 meta-steps, 400 for "
                 "the aligned lifetimes). `agents for`: agents per task "
                 "a meta-step needs for that cosine between its halves, extrapolated from the largest population "
                 "(none: no agreement measured). Cost: wall time on the 2 cores, shared with one other run. Commands: "
                 + "; ".join(f"`{('python benchmarks/meta_gradient_signal.py ' + SIGNAL_FILES[f]).strip()}`"
                             for f in present)
                 + ". Files: " + ", ".join(f"[results/{f}](results/{f})" for f in present) + ".")
    return "\n".join(lines)


def along_table() -> str:
    """The validation's rise from steps along the truncated meta-gradient and along random directions."""
    present = [f for f in ALONG_FILES if os.path.exists(os.path.join(HERE, f))]
    if not present:
        return "_(no result files yet)_"

    def rise(r):
        return f"{r['rise']:+.3f} [{r['interval'][0]:+.3f}, {r['interval'][1]:+.3f}]"

    lines = ["| objective | optimizer held fixed | step, in meta-steps | along the truncated descent | along meta-Adam's "
             "first step | along random directions | cosine with the gradient, rough | cost |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    for name in present:
        with open(os.path.join(HERE, name)) as f:
            report = json.load(f)
        held = "meta-step 0 (sign-SGD)" if report["lopt_path"] is None else f"`{report['lopt_path']}`"
        for objective, r in report["objectives"].items():
            for steps, at in r["by_meta_steps"].items():
                cosine, meta_adam = at["implied_cosine"]["truncated descent"], at["meta-Adam's first step"]
                lines.append(f"| {SIGNAL_LABELS[objective]} | {held} | {steps} | {rise(at['truncated descent'])} | "
                             f"{rise(meta_adam)} | "
                             + ", ".join(f"{x['rise']:+.3f}" for x in at["random"])
                             + f" | {'' if cosine is None else f'{cosine:.2f}'} | {r['seconds'] / 60:.0f} min |")
    lines.append("")
    lines.append("Rise of the validation objective (final return of fresh agents over 1e5-step lifetimes at the "
                 "evaluation's batch, relative to its value at the held parameters, mean of both small grids) from a "
                 "step of the given length along each direction: (J(θ + step) − J(θ − step)) / 2, the same 32 agents "
                 "per task at every point, [95% stratified-bootstrap interval over agents]. The truncated descent is "
                 "the direction of the mean truncated meta-gradient (16 agents per task, 16 meta-steps after the "
                 "pipeline is filled); meta-Adam's first step moves every coordinate by the meta-lr in its sign; a "
                 "meta-step's length is meta-lr x sqrt(parameters). Random directions are the control: a rise chance "
                 "gives at that step. Cosine, rough: the truncated descent's rise over sqrt(parameters) x the random "
                 "directions' RMS rise, whose square is |gradient|^2 step^2 / parameters plus the measurement's noise "
                 "(from 4 random directions, known within a factor of about 3). Cost: wall time on the 2 cores, "
                 "shared with a Brax run; objectives with the same validation settings share the evaluations at θ "
                 "and along the random directions, whose cost the first of them carries. Commands: "
                 + "; ".join(f"`python benchmarks/meta_gradient_signal.py {ALONG_FILES[f]}`" for f in present)
                 + ". Files: " + ", ".join(f"[results/{f}](results/{f})" for f in present) + ".")
    return "\n".join(lines)


PROBE = os.path.join(HERE, "step_probe")  # benchmarks/step_probe.py's files: stats_<task>.json, variants_<task>.json
PROBE_COMMAND = "python benchmarks/step_probe.py"
PROBE_RUNS = {"small_dense_long_1e5": "small_dense_long, 1e5 (meta-trained here)",
              "small_dense_short_1e5": "small_dense_short, 1e5 (meta-trained here)",
              "small_dense_long_1e6": "small_dense_long, 1e6", "small_dense_short_1e6": "small_dense_short, 1e6",
              **{task: task for task in BRAX_TASKS},
              **{f"{task}_reported": f"{task} (reported seeds)" for task in BRAX_TASKS}}
VARIANT_LABELS = {"as_shipped": "as shipped, rerun by the variants' code (reproduces the row above?)", "reset": "recurrent state reset every 256 updates",
                  "tensor_mean": "each tensor's step at its mean size (shape within tensors removed)",
                  "tensor_norm": "each tensor's step at sign-SGD's size (shape between tensors removed)",
                  "rescaled": "each tensor's gradient rescaled to mean log10|g| -1.3"}


def variant_label(variant: str) -> str:
    if variant.startswith("spread_"):  # spread_<s>: each |step| within [1/s, s] times its tensor's mean
        s = variant.split("_", 1)[1]
        return f"each |step| within [1/{s}, {s}] times its tensor's mean (the shape bounded)"
    return VARIANT_LABELS[variant]


def load_probe(kind: str) -> dict[str, dict]:
    found = {}
    for label in PROBE_RUNS:
        path = os.path.join(PROBE, f"{kind}_{label}.json")
        if os.path.exists(path):
            with open(path) as f:
                found[label] = json.load(f)
    return found


def network_of(tensor: str) -> str:
    """Brax PPO: policy or value network; the A2C agent: its shared trunk or one of its two heads."""
    first = tensor.split("/")[0]
    return {"Dense_0": "trunk", "Conv2x2_0": "trunk", "Dense_1": "policy head", "Dense_2": "value head"}.get(first, first)


def network_shares(window: dict) -> str:
    """Per network: its share of the squared step / its share of the moving coordinates."""
    shares = {}
    for name, t in window["tensors"].items():
        moving = t["coordinates"] * (1 - t["zero_grad_fraction"])
        step, count = shares.get(network_of(name), (0.0, 0.0))
        shares[network_of(name)] = (step + t["step_share"], count + moving)
    total = sum(count for _, count in shares.values())
    return ", ".join(f"{net} {step:.2f}/{count / total:.2f}" for net, (step, count) in shares.items())


def mechanism_table() -> str:
    reports = load_probe("stats")
    if not reports:
        return "_(no result files yet)_"
    lines = [r"| task | updates | window | mean log10\|g\| [5%, 95%] | at the clip | step / sign-SGD's, log10 "
             r"[5%, 50%, 95%] | top 1% of coordinates' share of the step | corr(log\|g\|, log\|step\|) | "
             r"network: share of the step / of the moving coordinates | sign-SGD: mean log10\|g\|, top-1% share |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|---:|"]
    for label, report in reports.items():
        lopt, sign = report["optimizers"]["lopt"], report["optimizers"]["sign_sgd"]
        for window in ("early", "late"):
            a, s = lopt[window]["all"], sign[window]["all"]
            g, m = a["log10_grad_q05_q50_q95"], a["log10_multiplier_q05_q50_q95"]
            lines.append(f"| {PROBE_RUNS[label]} | {lopt['num_updates']} | {window} | "
                         f"{a['log10_grad_mean']:.2f} [{g[0]:.1f}, {g[2]:.1f}] | {a['at_clip_fraction']:.0%} | "
                         f"{m[0]:+.2f}, {m[1]:+.2f}, {m[2]:+.2f} | {a['top1pct_step_share']:.0%} | "
                         f"{a.get('corr_log_grad_log_step', float('nan')):+.2f} | {network_shares(lopt[window])} | "
                         f"{s['log10_grad_mean']:.2f}, {s['top1pct_step_share']:.0%} |")
    lines.append("")
    lines.append("The shipped learned optimizer at the lr the tuned protocol picked for it (its own lr on the grids), "
                 "the whole gradient and step kept at 8 evenly spaced updates in the first (early) and last (late) "
                 "10% of each lifetime, 2 seeds (the protocols' validation/selection seeds); sign-SGD, its meta-step-0 "
                 "self, at its tuned lr on the same seeds. g is the gradient after the element-wise clip at 1, over the "
                 "coordinates where it is not zero (the others do not move under either optimizer). step / sign-SGD's: "
                 "|step| / lr, 1 for sign-SGD; the shipped optimizer divides its step by its RMS over all coordinates "
                 "(--normalize-step), so only the spread is its own. Command: "
                 f"`{PROBE_COMMAND}`; files: [results/step_probe/](results/step_probe/).")
    return "\n".join(lines)


def variants_table() -> str:
    reports = load_probe("variants")
    if not reports:
        return "_(no result files yet)_"
    lines = ["| task | seeds | optimizer | lr | final return, mean | IQM [95% CI] | per seed |",
             "|---|---:|---|---:|---:|---:|---|"]
    for label, report in reports.items():
        references = report["references"]
        source = lambda name: "committed run" if references[name]["source"] != "rerun" else "rerun here"
        rows = [(f"learned optimizer as shipped ({source('lopt')})", references["lopt"]),
                *((variant_label(v), r) for v, r in report["variants"].items()),
                (f"sign-SGD, lr tuned ({source('sign_sgd')})", references["sign_sgd"])]
        digits = 2 if report.get("env_steps") else 0  # grid returns are a few units; Brax's are hundreds
        for name, run in rows:
            returns = np.asarray(run["final_returns"], float)
            iqm, low, high = iqm_interval([returns])
            lr = run.get("learning_rate", report["learning_rate"])
            per_seed = ", ".join(f"{r:.{digits}f}" for r in returns) if len(returns) <= 8 else ""
            lines.append(f"| {PROBE_RUNS[label]} | {len(returns)} | {name} | {tl.format_lr(lr)} | "
                         f"{np.nanmean(returns):.{digits}f} | {iqm:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}] | "
                         f"{per_seed} |")
    lines.append("")
    lines.append("One change to the shipped learned optimizer at a time, at the lr the tuned protocol picked for it "
                 "(its own lr on the grids). Brax: PPO on the protocol's 4 selection seeds, or its 8 reported seeds where "
                 "the task says so, each row beside the committed runs on the same seeds; a diagnosis, not a "
                 "selection: nothing is chosen by these scores. Grids: A2C on the final evaluation's 16 validation "
                 "seeds, the shipped optimizer and tuned sign-SGD rerun beside the variants. Command: "
                 f"`{PROBE_COMMAND} --mode variants --tasks TASK` (`--grid-steps` for the grids' lifetimes); files: "
                 + ", ".join(f"[variants_{t}.json](results/step_probe/variants_{t}.json)" for t in reports) + ".")
    return "\n".join(lines)


# Recipes for generality (issue 42), each judged on the grids at 1e5 and 1e6 (16 validation seeds) and on the
# validation family; never on Brax. name -> (how it was made, where its grid screens are: a folder of step_probe
# files whose "lopt" reference is the checkpoint, or a variant of the shipped optimizer in step_probe/, the
# checkpoint the validation family ran, its meta-training curve)
def kept(name: str, how: str) -> tuple:
    """A meta-trained recipe's entry: its screens, kept checkpoint and meta-training curve under recipes/<name>/."""
    folder = os.path.join(HERE, "recipes", name)
    return (how, ("screen", f"recipes/{name}"), os.path.join(folder, "optimizer_best.msgpack"),
            os.path.join(folder, "metrics.csv"))


def run_with(name: str, how: str) -> tuple:
    """A checkpoint run with another setting (recipes/<name>/optimizer.msgpack, not meta-trained so): no curve."""
    return (how, ("screen", f"recipes/{name}"), os.path.join(HERE, "recipes", name, "optimizer.msgpack"), None)


RECIPES = {
    "shipped": ("the shipped optimizer (the bare command; shape unbounded)", ("screen", "step_probe"),
                tl.PRETRAINED_OPTIMIZER, os.path.join(REPO, "checkpoints", "optim4rl_gridworld_metrics.csv")),
    "spread_1_s0": (f"`{SCREEN} --step-spread 1` (one step size per tensor), meta-step 1000: validation never rose "
                    "above meta-step 0, so the kept optimizer is sign-SGD itself", ("screen", "recipes/spread_1_s0_last"),
                    None, os.path.join(HERE, "recipes", "spread_1_s0", "metrics.csv")),
    "spread_2_s0": kept("spread_2_s0", f"`{SCREEN} --step-spread 2` (each step within 2x its tensor's mean), kept"),
    **{f"spread_2_s{seed}": kept(f"spread_2_s{seed}", f"the same recipe, meta-seed {seed} (`--seed {seed}`), kept")
       for seed in (1, 2)},
    "sched_8_s0": kept("sched_8_s0", f"`{SCREEN} --step-schedule 8` (a learned step factor over training progress), kept"),
    "sched_8_spread_2_s0": kept("sched_8_spread_2_s0", f"`{SCREEN} --step-spread 2 --step-schedule 8` (both), kept"),
    **{f"sched_8_spread_2_s{seed}": kept(f"sched_8_spread_2_s{seed}",
                                         f"the same recipe, meta-seed {seed} (`--seed {seed}`), kept") for seed in (1, 2)},
    # The same run redone with every validated optimizer kept (validated/, bit-identical validation scores): the
    # next-best candidates by the grids at 1e5, for a selection that looks at pendulum and at 1e6 as well
    **{f"sched_8_spread_2_s0_at_{step:05d}": run_with(f"sched_8_spread_2_s0_at_{step:05d}", f"its meta-seed-0 run's "
                                                       f"optimizer validated at meta-step {step} ({rank} on the grids "
                                                       "at 1e5)")
       for step, rank in ((850, "2nd best"), (900, "3rd best"), (925, "4th best"),
                          (350, "7th best, the first half's best"), (600, "31st of 41"))},
    "sched_8_spread_2_s0_no_schedule": run_with("sched_8_spread_2_s0_no_schedule", "its meta-seed-0 checkpoint with "
                                                "the schedule removed (every factor 1)"),
    "sched_8_spread_2_s0_spread_1": run_with("sched_8_spread_2_s0_spread_1", "the same checkpoint run with "
                                             "`--step-spread 1` (its shape removed, its schedule and per-tensor sizes kept)"),
    "sched_8_spread_1.5_s0": kept("sched_8_spread_1.5_s0", f"`{SCREEN} --step-spread 1.5 --step-schedule 8` (a "
                                  "tighter bound), kept"),
    "sched_8_gscale_1_s0": kept("sched_8_gscale_1_s0", f"`{SCREEN} --grad-scale-range 1 --step-schedule 8` (each "
                                "population's gradients spread over 0.1x to 10x; shape unbounded), kept"),
    **{f"sched_8_gscale_1_spread_{spread}_s0": kept(f"sched_8_gscale_1_spread_{spread}_s0", f"`{SCREEN} "
                                                    f"--grad-scale-range 1 --step-spread {spread} --step-schedule 8` "
                                                    "(all three), kept") for spread in ("2", "1.5")},
    "tensor_norm_sched_8_s0": kept("tensor_norm_sched_8_s0", f"`{SCREEN} --input-norm tensor --step-schedule 8` "
                                   r"(each gradient read relative to its tensor's mean \|g\|; shape unbounded), kept"),
    "tensor_norm_sched_8_s1": kept("tensor_norm_sched_8_s1", "the same recipe, meta-seed 1 (`--seed 1`; stopped by "
                                   "`--time-limit 2100` at meta-step 949 of 1000), kept"),
    "tensor_norm_sched_8_spread_2_s0": kept("tensor_norm_sched_8_spread_2_s0", f"`{SCREEN} --input-norm tensor "
                                            "--step-spread 2 --step-schedule 8` (scale-free inputs, the bound and "
                                            "the schedule), kept"),
    "tensor_start_sched_8_s0": kept("tensor_start_sched_8_s0", f"`{SCREEN} --input-norm tensor_start --step-schedule "
                                    r"8` (each gradient read relative to its tensor's mean \|g\| at the run's first "
                                    "update: the task's scale gone, the lifetime's trend kept; shape unbounded), kept"),
    "tensor_start_sched_8_spread_2_s0": kept("tensor_start_sched_8_spread_2_s0", f"`{SCREEN} --input-norm "
                                             "tensor_start --step-spread 2 --step-schedule 8` (inputs against the "
                                             "first update's scale, the bound and the schedule), kept"),
    "global_norm_sched_8_s0": kept("global_norm_sched_8_s0", f"`{SCREEN} --input-norm global --step-schedule 8` "
                                   r"(every gradient read relative to one mean \|g\| over all tensors: the task's "
                                   "scale gone, the tensors' relative scales kept; shape unbounded; stopped by "
                                   "`--time-limit 2100` at meta-step 724, resumed to 1000), kept"),
    "spread_2_s0_spread_1": run_with("spread_2_s0_spread_1", "spread_2_s0 run with `--step-spread 1` (its shape "
                                     "removed, its per-tensor sizes kept)"),
    "shipped_spread_1": ("the shipped optimizer run with `--step-spread 1` (not meta-trained so)",
                         ("variant", "tensor_mean"),
                         os.path.join(HERE, "recipes", "shipped_spread_1", "optimizer.msgpack"), None),
    "shipped_spread_2": ("the shipped optimizer run with `--step-spread 2`", ("variant", "spread_2"),
                         os.path.join(HERE, "recipes", "shipped_spread_2", "optimizer.msgpack"), None),
    "shipped_spread_4": ("the shipped optimizer run with `--step-spread 4`", ("variant", "spread_4"), None, None),
}
RECIPE_RUNS = ("small_dense_long_1e5", "small_dense_short_1e5", "small_dense_long_1e6", "small_dense_short_1e6")


TESTED_RECIPES = ("shipped", "shipped_spread_1", "spread_2_s0", "spread_2_s1", "spread_2_s2", "sched_8_spread_2_s0",
                  "sched_8_spread_2_s0_spread_1", "sched_8_gscale_1_s0")


def recipes_test_table() -> str:
    """Brax (the test) per recipe: each checkpoint's normalised score (lr tuned) on every task its protocol ran, the
    baselines' from the shipped protocol, and the IQM over each set of tasks that some row ran in full."""
    folder = os.path.join(HERE, "brax")
    rows = {}  # row label -> {task: (normalised per seed, picked lr)}
    shipped = load_protocol(folder)
    if not shipped:
        return "_(no result files yet)_"
    for name in TESTED_RECIPES:
        tasks = load_protocol(folder, protocol_file(RECIPES[name][2]))
        rows[f"`{name}`"] = {task: (brax_normalized(p)["lopt"], p["picked_lr"]["lopt"]) for task, p in tasks.items()}
    for label in ("sign_sgd", "open", "adam"):
        rows[BRAX_ROWS[label]] = {task: (brax_normalized(p)[label], p["picked_lr"][label])
                                  for task, p in shipped.items() if label in p["picked_lr"]}
    baselines = [rows[BRAX_ROWS[label]] for label in ("sign_sgd", "open", "adam")]
    # One pooled column per set of tasks some row ran in full (largest first), so that a recipe tested on fewer
    # tasks is still compared with the baselines on the same tasks.
    pools = sorted({tuple(t for t in BRAX_TASKS if t in scores) for scores in rows.values() if len(scores) > 1},
                   key=lambda tasks: (-len(tasks), tasks))
    pools = [tasks for tasks in pools if all(t in scores for t in tasks for scores in baselines)]

    def cell(found) -> str:
        if found is None:
            return "not run"
        iqm, low, high = iqm_interval([found[0]])
        return f"{iqm:.2f} [{low:.2f}, {high:.2f}] @ {tl.format_lr(found[1])}"

    def pooled(scores, tasks) -> str:
        if not all(t in scores for t in tasks):
            return ""
        iqm, low, high = iqm_interval([scores[t][0] for t in tasks])
        return f"{iqm:.2f} [{low:.2f}, {high:.2f}]"

    def pool_name(tasks) -> str:
        return f"all {len(tasks)}" if len(tasks) == len(BRAX_TASKS) else " + ".join(tasks)

    lines = ["| optimizer | " + " | ".join(BRAX_TASKS) + "".join(f" | {pool_name(p)} (IQM)" for p in pools) + " |",
             "|---|" + "---:|" * (len(BRAX_TASKS) + len(pools))]
    for label, scores in rows.items():
        lines.append(f"| {label} | " + " | ".join([cell(scores.get(t)) for t in BRAX_TASKS]
                                                  + [pooled(scores, p) for p in pools]) + " |")
    lines.append("")
    lines.append("Normalised final deterministic return, IQM [95% CI] over 8 seeds per task (0 = the untrained policy, "
                 "1 = tuned clipped Adam), @ the lr picked on 4 other seeds; the last columns pool "
                 f"the tasks named. `{BRAX_PROTOCOL} --protocol-tasks TASK --lopt-path CHECKPOINT`; the baselines' runs are the "
                 "shipped protocol's, read back. Files: [results/brax/](results/brax/) (`lopt-<sha256[:8]>@...`).")
    return "\n".join(lines)


def sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def protocol_file(checkpoint: str) -> str:
    """eval_brax.py's protocol file for a checkpoint: protocol.json for the shipped one, else protocol-<sha256[:8]>."""
    digest = sha256(checkpoint)
    return "protocol.json" if digest == sha256(tl.PRETRAINED_OPTIMIZER) else f"protocol-{digest[:8]}.json"


def validation_cell(checkpoint: str | None, label: str = "lopt") -> str:
    """The checkpoint's (or, with label, a baseline's) normalised final return on pendulum, lr tuned."""
    if checkpoint is None:
        return "not run"
    file = protocol_file(checkpoint) if label == "lopt" else "protocol.json"
    protocol = load_protocol(os.path.join(HERE, "validation"), file).get("pendulum")
    if protocol is None:
        return "not run"
    iqm, low, high = iqm_interval([brax_normalized(protocol)[label]])
    return f"{iqm:.2f} [{low:.2f}, {high:.2f}]"


def recipe_screens(source: tuple[str, str]) -> list[np.ndarray | None]:
    """Per RECIPE_RUNS entry, the recipe's final returns on the validation seeds (None: not run)."""
    kind, where = source
    cells = []
    for run in RECIPE_RUNS:
        path = os.path.join(HERE, where if kind == "screen" else "step_probe", f"variants_{run}.json")
        report = json.load(open(path)) if os.path.exists(path) else {"references": {}, "variants": {}}
        found = report["references"].get("lopt") if kind == "screen" else report["variants"].get(where)
        cells.append(None if found is None else np.asarray(found["final_returns"], float))
    return cells


def schedule_text(checkpoint: str | None) -> str:
    """A checkpoint's learned step factors (--step-schedule), from the start of the lifetime to its end, if it has them."""
    if checkpoint is None or not os.path.exists(checkpoint):
        return ""
    knots = tl.read_optimizer_checkpoint(checkpoint)["params"]["params"].get(tl.STEP_SCHEDULE)
    if knots is None or not np.any(knots):  # none, or all factors 1 (the row says so)
        return ""
    return "; step factor over the lifetime: " + " ".join(f"{10 ** k:.2f}" for k in np.asarray(knots))


def recipes_table() -> str:
    def returns_cell(returns) -> str:
        if returns is None:
            return "not run"
        iqm, low, high = iqm_interval([returns])
        return f"{iqm:.2f} [{low:.2f}, {high:.2f}]"

    def curve_cell(path: str | None) -> str:
        if path is None or not os.path.exists(path):
            return ""
        with open(path) as f:
            rows = [r for r in csv.DictReader(f) if r.get("val_score")]
        scores = np.array([float(r["val_score"]) for r in rows])
        best = int(np.argmax(scores))
        return f"{scores[0]:.2f} / {scores[best]:.2f} ({rows[best]['meta_step']}) / {scores[-1]:.2f}"

    sign_sgd = []
    for run in RECIPE_RUNS:
        path = os.path.join(PROBE, f"variants_{run}.json")
        sign_sgd.append(np.asarray(json.load(open(path))["references"]["sign_sgd"]["final_returns"], float)
                        if os.path.exists(path) else None)
    if all(cell is None for cell in sign_sgd):
        return "_(no result files yet)_"
    lines = ["| recipe | validation in meta-training: at 0 / best (meta-step) / last | "
             + " | ".join(PROBE_RUNS[run] for run in RECIPE_RUNS) + " | pendulum, lr tuned (normalised) |",
             "|---|---|" + "---:|" * (len(RECIPE_RUNS) + 1),
             "| sign-SGD (every recipe's meta-step-0 self), lr tuned | | "
             + " | ".join(map(returns_cell, sign_sgd)) + f" | {validation_cell(tl.PRETRAINED_OPTIMIZER, 'sign_sgd')} |",
             "| Adam, lr tuned | | | | | | " + validation_cell(tl.PRETRAINED_OPTIMIZER, "adam") + " |",
             "| OPEN, lr tuned | | | | | | " + validation_cell(tl.PRETRAINED_OPTIMIZER, "open") + " |"]
    for how, source, checkpoint, curve in RECIPES.values():
        cells = recipe_screens(source)
        if all(cell is None for cell in cells) and validation_cell(checkpoint) == "not run":
            continue
        lines.append(f"| {how}{schedule_text(checkpoint)} | {curve_cell(curve)} | " + " | ".join(map(returns_cell, cells))
                     + f" | {validation_cell(checkpoint)} |")
    lines.append("")
    lines.append("Grids: final return, IQM [95% CI] over the final evaluation's 16 validation seeds per grid (A2C, 32 "
                 "envs), each learned optimizer at its own meta-trained lr (1e-2), sign-SGD at its tuned lr. "
                 "Pendulum (the validation family): eval_brax.py's PPO, 1e6 env steps, lr tuned on 4 selection seeds "
                 "and reported on 8 others; 0 = the untrained policy, 1 = tuned Adam. The validation curve is "
                 "meta-training's own (both grids at 1e5, 1 = tuned Adam); meta-training keeps its best as "
                 "optimizer_best.msgpack. Screens: `python benchmarks/step_probe.py --mode variants --tasks small_dense_long "
                 "small_dense_short --grid-steps 100000 1000000 --variants --lopt-path CHECKPOINT --results-dir "
                 "results/recipes/NAME`; pendulum: `python eval_brax.py --protocol --protocol-tasks pendulum "
                 "--lopt-path CHECKPOINT`. Files: [results/recipes/](results/recipes/), "
                 "[results/step_probe/](results/step_probe/), [results/validation/](results/validation/).")
    return "\n".join(lines)


def plot_mechanism(path: str) -> None:
    """Left: where the gradients lie (log10|g| late in training); right: the step's size against |g|."""
    reports = load_probe("stats")
    if not reports:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 3.8))
    edges = np.arange(-8.0, 0.51, 0.5)
    for i, (label, report) in enumerate(reports.items()):
        late = report["optimizers"]["lopt"]["late"]
        style = dict(color=f"C{i}", linestyle="--" if label.endswith("1e6") else "-")
        counts = np.array(late["all"]["log10_grad_histogram"], float)
        left.stairs(counts / counts.sum(), edges, label=PROBE_RUNS[label], **style)
        curve = late["multiplier_curve"]
        right.plot(curve["log10_grad"], curve["mean_log10_multiplier"], marker=".", **style)
    left.set(xlabel="log10|g| after the clip", ylabel="fraction of moving coordinates",
             title="the learned optimizer's inputs, last 10% of training")
    right.axhline(0, color="k", linewidth=0.5)
    right.set(xlabel="log10|g| after the clip", ylabel="mean log10(|step| / lr)  (sign-SGD: 0)",
              title="its step against the gradient's size")
    left.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def tables() -> dict[str, str]:
    return {"gridworld": gridworld_table(TABLES["gridworld"], ("schedule",)),
            "gridworld-previous": gridworld_table(TABLES["gridworld-previous"]),
            "gridworld-2026-11-25": gridworld_table(TABLES["gridworld-2026-11-25"]),
            "gridworld-headroom": headroom_table(),
            "gridworld-open": gridworld_table(TABLES["gridworld"], rows={n: ROWS[n] for n in OPEN_ROWS}),
            "meta-gradient-signal": signal_table(), "meta-gradient-along": along_table(),
            "brax": brax_table(), "brax-summary": brax_summary_table(), "validation": brax_table("validation"),
            "recipes": recipes_table(),
            "recipes-test": recipes_test_table(),
            "brax-same-seed-selection": brax_untuned_selection_table(),
            "meta-screens": screens_table(), "policy-only-seeds": seeds_table(SEED_FILES),
            "envs-32-seeds": seeds_table(ENVS_32_FILES), "envs-32-seeds-1e6": seeds_table(ENVS_32_1E6_FILES),
            "aligned-screen": seeds_table(ALIGNED_FILES, column="env steps"),
            "schedule-tuned": seeds_table(SCHEDULE_FILES, column="env steps"),
            "policy-only-2000": long_runs_table(),
            "mechanism": mechanism_table(), "mechanism-variants": variants_table()}


BLOCK = re.compile(r"(<!-- table:(?P<name>[\w-]+) -->\n)(?P<body>.*?)\n?(<!-- /table:(?P=name) -->)", re.S)
DOCUMENTS = ["README.md", os.path.join("docs", "results.md"), os.path.join("docs", "brax.md"),
             os.path.join("docs", "open.md"), os.path.join("docs", "mechanism.md")]


def blocks(text: str) -> dict[str, str]:
    return {m["name"]: m["body"] for m in BLOCK.finditer(text)}


def rewrite(text: str, generated: dict[str, str], prefix: str) -> str:
    def fill(match):
        body = generated[match["name"]].replace("](results/", f"]({prefix}results/")
        return match.group(1) + body + "\n" + match.group(4)

    return BLOCK.sub(fill, text)


def main(argv: list[str]) -> None:
    generated = tables()
    if "--write" not in argv:
        for name, table in generated.items():
            print(f"<!-- table:{name} -->\n{table}\n")
        return
    for document in DOCUMENTS:
        path = os.path.join(REPO, document)
        prefix = "../" * document.count(os.sep)
        with open(path) as f:
            text = f.read()
        with open(path, "w") as f:
            f.write(rewrite(text, generated, prefix))
        print(f"rewrote {', '.join(blocks(text)) or 'no tables'} in {document}")
    plot_screens(os.path.join(REPO, "docs", "meta_screens.png"))
    plot_seed_runs(DEFAULT_RUNS, os.path.join(REPO, "docs", "meta_training_default.png"))
    plot_meta_grad(os.path.join(REPO, "docs", "meta_grad_pes.png"))
    plot_brax(os.path.join(REPO, "docs", "brax_protocol.png"))
    plot_mechanism(os.path.join(REPO, "docs", "mechanism.png"))


if __name__ == "__main__":
    main(sys.argv[1:])
