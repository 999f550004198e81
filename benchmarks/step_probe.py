"""Why the learned optimizer fails where it fails: its inputs and steps per tensor, and variants that test why.

    python benchmarks/step_probe.py                                          # stats: the grids it was meta-trained on, Brax
    python benchmarks/step_probe.py --mode variants --tasks inverted_double_pendulum

`stats` trains agents with the shipped learned optimizer and with its meta-step-0 self (sign-SGD), each at the lr
the tuned protocol picked for it (read from the committed results), and keeps the whole gradient and step at a few
updates early and late in training. Per tensor it reports what the optimizer saw (log10|g| after the clip) and what
it did (the step relative to sign-SGD's, |step| / lr: its spread, how it depends on |g|, each tensor's share of the
squared step, the share carried by the top 1% of coordinates).

`variants` changes one thing about the learned optimizer at a time and trains PPO on the Brax selection seeds at the
lr the protocol picked for it, so each variant is compared with the committed runs on the same seeds:
  reset        its recurrent state zeroed every --reset-every updates (meta-training's lifetimes are 156-256)
  tensor_mean  each tensor's step replaced by sign(step) x its mean |step| (the shape removed, the size kept)
  spread       each |step| bounded to [1/s, s] times its tensor's mean, s = --step-spread (tensor_mean is s = 1)
  tensor_norm  each tensor's step divided by its RMS (the shape kept, every tensor the size of sign-SGD's step)
  rescaled     each tensor's gradient scaled so its mean log10|g| is --reference-log10-grad, then clipped
Brax stays a test family: these runs diagnose; no recipe, lr or checkpoint is chosen by them.

Reading order: the snapshot transform -> the variants -> A2C and PPO runs -> statistics -> figure -> main.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from jax.flatten_util import ravel_pytree

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval_brax  # noqa: E402
import train_lopt  # noqa: E402
from common import (PRETRAINED_OPTIMIZER, REPOSITORY, UserError, atomic_write, check_args, check_choices, recorded,
                    run_cli)

GRID_TASKS = ("small_dense_long", "small_dense_short")  # what the shipped optimizer was meta-trained on
BRAX_TASKS = tuple(eval_brax.PROTOCOL_BACKENDS)
VARIANTS = ("as_shipped", "reset", "tensor_mean", "spread", "tensor_norm", "rescaled")
GRID_RESULTS = {100_000: "results/gridworld_shipped_1e5.json", 1_000_000: "results/gridworld_shipped_1e6.json"}


@dataclass
class Args:
    mode: Literal["stats", "variants"] = "stats"
    tasks: tuple[str, ...] = (*GRID_TASKS, *BRAX_TASKS)
    """grid tasks (stats only: run at every --grid-steps) and Brax protocol tasks"""
    grid_steps: tuple[int, ...] = (100_000, 1_000_000)
    """A2C lifetimes in env steps for the grid tasks (1e5: the meta-training regime; 1e6: ten times longer)"""
    num_seeds: int = 2
    """stats: seeds per run (the first of the protocol's selection seeds)"""
    snapshots: int = 8
    """stats: updates kept in each window (the first and last WINDOW of training), evenly spaced"""
    variants: tuple[str, ...] = VARIANTS[1:]
    """variants mode: which to run (as_shipped is the committed selection run, rerun only if named)"""
    brax_seeds: Literal["selection", "reported"] = "selection"
    """variants on Brax: the protocol's selection seeds (4) or its reported seeds (8); each is compared with the
    committed runs on the same seeds"""
    reset_every: int = 256
    step_spread: float = 2.0
    """spread: the bound on each |step| relative to its tensor's mean |step|"""
    reference_log10_grad: float = -1.3
    """rescaled: the mean log10|g| each tensor is scaled to (the stats mode measures -1.3 on small_dense_long at
    1e5, early and late: results/step_probe/)"""
    lopt_path: str = PRETRAINED_OPTIMIZER
    """the learned optimizer; another checkpoint than the shipped one: --mode variants on the grids only, at its
    own meta-trained lr (a recipe's screen: give it its own --results-dir)"""
    results_dir: str = os.path.join(REPOSITORY, "results", "step_probe")


WINDOW = 0.1  # early: the first 10% of a lifetime's updates; late: the last 10%
LOG_FLOOR = -12.0  # log10 of a zero magnitude, for quantiles only (zero-gradient coordinates do not move)
HISTOGRAM_EDGES = np.arange(-8.0, 0.51, 0.5)  # log10|g| bins of the histogram and of the multiplier curve


# ================================================================================================
# The snapshot transform: the whole incoming gradient and outgoing step at chosen updates
# ================================================================================================


class Snapshots(NamedTuple):
    inner: optax.OptState
    count: jax.Array
    grads: jax.Array  # [len(at), num_params]: the gradient as the optimizer received it (before any clip)
    steps: jax.Array  # [len(at), num_params]: the update it returned


def snapshotting(tx: optax.GradientTransformation, at: np.ndarray) -> optax.GradientTransformation:
    """tx unchanged, with the flat gradient and update of updates number `at` (0-based, sorted) kept in its state."""
    at = jnp.asarray(np.sort(at), jnp.int32)

    def init(params):
        zeros = jnp.zeros((len(at), ravel_pytree(params)[0].size))
        return Snapshots(tx.init(params), jnp.int32(0), zeros, zeros)

    def update(grads, state, params=None):
        steps, inner = tx.update(grads, state.inner, params)
        slot = jnp.minimum(jnp.searchsorted(at, state.count), len(at) - 1)
        keep = at[slot] == state.count

        def put(buffer, tree):  # rewrites one row (with itself when this update is not kept)
            return buffer.at[slot].set(jnp.where(keep, ravel_pytree(tree)[0], buffer[slot]))

        return steps, Snapshots(inner, state.count + 1, put(state.grads, grads), put(state.steps, steps))

    return optax.GradientTransformation(init, update)


def snapshot_updates(num_updates: int, per_window: int) -> tuple[np.ndarray, np.ndarray]:
    """(early, late) update indices: per_window evenly spaced in the first and the last WINDOW of the lifetime."""
    width = max(1, int(round(num_updates * WINDOW)))
    early = np.unique(np.linspace(0, width - 1, per_window).round().astype(int))
    return early, np.unique(num_updates - width + early)


# ================================================================================================
# Variants of the learned optimizer: one change each, to test one explanation of its failure
# ================================================================================================


def tensor_moments(tree, moving):
    """Per leaf: mean |x| and RMS of x over the coordinates whose gradient is not zero (the others never move)."""
    def stats(x, m):
        n = jnp.maximum(jnp.sum(m), 1)
        return jnp.sum(jnp.abs(x) * m) / n, jnp.sqrt(jnp.sum(jnp.square(x) * m) / n)
    return jax.tree.map(stats, tree, moving)


def learned_variant(variant: str, args: Args, learning_rate: float, grad_clip: float,
                    num_updates: int) -> optax.GradientTransformation:
    """The shipped learned optimizer, element-wise clip included, with one change (see the module docstring)."""
    ckpt = train_lopt.read_optimizer_checkpoint(args.lopt_path)
    net = train_lopt.make_lopt_net(ckpt["config"])
    options = train_lopt.step_options(ckpt["config"])
    options["step_spread"] = {"tensor_mean": 1.0, "spread": args.step_spread}.get(variant, options["step_spread"])
    base = train_lopt.learned_optimizer(net, ckpt["params"], 1.0, **options,  # unit lr: its update is -direction
                                        num_updates=num_updates)
    clip = optax.clip(grad_clip)

    def init(params):
        return base.init(params), jnp.int32(0)

    def update(grads, state, params=None):
        inner, count = state
        moving = jax.tree.map(lambda g: (g != 0).astype(jnp.float32), grads)
        if variant == "rescaled":
            def scale(g, m):
                log_abs = jnp.log10(jnp.abs(g) + 1e-30)
                mean = jnp.sum(log_abs * m) / jnp.maximum(jnp.sum(m), 1)
                return g * 10.0 ** (args.reference_log10_grad - mean)
            grads = jax.tree.map(scale, grads, moving)
        grads, _ = clip.update(grads, optax.EmptyState())
        if variant == "reset":
            inner = jax.tree.map(lambda c: jnp.where(count % args.reset_every == 0, jnp.zeros_like(c), c), inner)
        steps, inner = base.update(grads, inner)
        if variant == "tensor_norm":
            steps = jax.tree.map(lambda s, mo: s / (mo[1] + 1e-12), steps, tensor_moments(steps, moving),
                                 is_leaf=lambda x: isinstance(x, tuple))
        return jax.tree.map(lambda s: learning_rate * s, steps), (inner, count + 1)

    return optax.GradientTransformation(init, update)


# ================================================================================================
# Runs: A2C on a grid (train_lopt's final evaluation) and PPO on Brax (eval_brax's protocol)
# ================================================================================================


class Run(NamedTuple):
    tensor_names: list[str]
    tensor_sizes: list[int]
    grads: np.ndarray  # [seeds, snapshots, num_params]
    steps: np.ndarray
    final_returns: np.ndarray  # [seeds]
    num_updates: int


def tensor_layout(params) -> tuple[list[str], list[int]]:
    """Leaf names ('policy/hidden_0/kernel', ...) and sizes, in ravel_pytree's order."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    names = ["/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path if getattr(k, "key", "") != "params")
             for path, _ in leaves]
    return names, [int(np.size(leaf)) for _, leaf in leaves]


def grid_updates(steps: int) -> int:
    args = train_lopt.Args()
    return steps // (args.rollout_steps * args.eval_envs)


def run_updates(task: str, steps: int | None) -> int:
    """Optimizer updates in a run: A2C's on a grid of `steps` env steps, PPO's on a Brax task (steps None)."""
    return grid_updates(steps) if steps else eval_brax.optimizer_steps(brax_args(task))


def grid_run(task_name: str, steps: int, tx: optax.GradientTransformation, snapshots_at, num_seeds: int) -> Run:
    """A2C agents as the final evaluation trains them (its envs per agent, the validation seed stream)."""
    args = train_lopt.Args()
    task = train_lopt.Task.make(task_name, train_lopt.Args(num_envs=args.eval_envs))
    num_updates = grid_updates(steps)
    tx = snapshotting(tx, snapshots_at(num_updates)) if snapshots_at else tx
    keys = train_lopt.evaluation_keys(task_name, train_lopt.VAL_STREAM, num_seeds, "--num-seeds")

    def train(key):
        agent = train_lopt.init_agent(task, tx, key)
        agent, returns = jax.lax.scan(lambda a, _: train_lopt.a2c_step(task, tx, a), agent, length=num_updates)
        return agent.opt_state, returns

    state, (return_sum, return_count) = jax.jit(jax.vmap(train))(keys)
    names, sizes = tensor_layout(task.init_params(keys[0]))
    kept = (np.asarray(state.grads), np.asarray(state.steps)) if snapshots_at else (None, None)
    return Run(names, sizes, *kept, train_lopt.final_returns(return_sum, return_count), num_updates)


def brax_args(task: str) -> eval_brax.Args:
    return eval_brax.parse_args([], env=task)


def brax_keys(args: eval_brax.Args, num_seeds: int, seeds: str = "selection") -> jax.Array:
    return eval_brax.protocol_keys(args)[seeds][:num_seeds]


def brax_run(task: str, tx: optax.GradientTransformation, snapshots_at, num_seeds: int, label: str,
             seeds: str = "selection") -> Run:
    """PPO as eval_brax's protocol trains it, on the first num_seeds of its selection (or reported) seeds."""
    args = brax_args(task)
    num_updates = eval_brax.optimizer_steps(args)
    tx = snapshotting(tx, snapshots_at(num_updates)) if snapshots_at else tx
    env = eval_brax.envs.get_environment(task, backend=args.backend)
    progress = eval_brax.ProgressPrinter(label, eval_brax.eval_schedule(args)[1], num_seeds)
    train = eval_brax.make_train(args, env, tx, on_eval=progress, on_trained=progress.trained)
    runners, returns = jax.jit(train)(brax_keys(args, num_seeds, seeds))
    params = jax.tree.map(lambda x: x[0], runners.params)
    names, sizes = tensor_layout({"policy": params.policy, "value": params.value})
    state = runners.opt_state
    kept = (np.asarray(state.grads), np.asarray(state.steps)) if snapshots_at else (None, None)
    return Run(names, sizes, *kept, np.asarray(returns)[-1], num_updates)


def picked_lr(task: str, name: str, grid_steps: int | None) -> float:
    """The lr the committed tuned protocol picked for `name` ('lopt' on the grids: its own meta-trained lr)."""
    if grid_steps is None:
        path = os.path.join(REPOSITORY, "results", "brax", task, "protocol.json")
        with open(path) as f:
            return float(json.load(f)["picked_lr"][name])
    with open(os.path.join(REPOSITORY, GRID_RESULTS[grid_steps])) as f:
        return float(json.load(f)["tasks"][task]["lr"][name])


# ================================================================================================
# Statistics per tensor and window
# ================================================================================================


def log10_magnitude(x: np.ndarray) -> np.ndarray:
    return np.log10(np.maximum(np.abs(x), 10.0 ** LOG_FLOOR))


def window_stats(grads: np.ndarray, steps: np.ndarray, lr: float, names, sizes, grad_clip: float) -> dict:
    """grads, steps: [samples, num_params] (seeds x snapshots of one window). Per tensor and for all of them."""
    g = np.clip(grads, -grad_clip, grad_clip)  # what every optimizer here receives
    moving = g != 0
    multiplier = np.abs(steps) / lr  # 1 for sign-SGD wherever g != 0
    squared = np.square(steps)
    total = squared.sum(1, keepdims=True)
    # Top 1% of coordinates by squared step, per sample: their share of the sample's squared step.
    k = max(1, int(round(0.01 * squared.shape[1])))
    top = np.sort(squared, 1)[:, -k:].sum(1) / np.maximum(total[:, 0], 1e-30)
    bounds = np.cumsum([0, *sizes])

    def describe(columns: slice) -> dict:
        m = moving[:, columns]
        lg, lm = log10_magnitude(g[:, columns])[m], log10_magnitude(multiplier[:, columns])[m]
        out = {"coordinates": int(sizes_of(columns)), "zero_grad_fraction": float(1 - m.mean()),
               "step_share": float((squared[:, columns].sum(1) / np.maximum(total[:, 0], 1e-30)).mean())}
        if lg.size:
            q = [0.05, 0.5, 0.95]
            out.update(log10_grad_q05_q50_q95=np.quantile(lg, q).tolist(), log10_grad_mean=float(lg.mean()),
                       at_clip_fraction=float(np.mean(np.abs(g[:, columns][m]) >= grad_clip)),
                       log10_multiplier_q05_q50_q95=np.quantile(lm, q).tolist(),
                       rms_multiplier=float(np.sqrt(np.mean(np.square(multiplier[:, columns][m])))))
            if lg.std() > 0 and lm.std() > 0:
                out["corr_log_grad_log_step"] = float(np.corrcoef(lg, lm)[0, 1])
        return out

    def sizes_of(columns: slice) -> int:
        return columns.stop - columns.start

    per_tensor = {name: describe(slice(bounds[i], bounds[i + 1])) for i, name in enumerate(names)}
    counts = np.histogram(log10_magnitude(g)[moving], HISTOGRAM_EDGES)[0]
    return {"all": {**describe(slice(0, bounds[-1])), "top1pct_step_share": float(top.mean()),
                    "log10_grad_histogram": counts.tolist()},
            "tensors": per_tensor}


def multiplier_curve(grads: np.ndarray, steps: np.ndarray, lr: float, grad_clip: float,
                     edges=HISTOGRAM_EDGES) -> dict:
    """Mean log10(|step| / lr) in bins of log10|g| (the figure: how the step depends on the gradient's size)."""
    g = np.clip(grads, -grad_clip, grad_clip)
    m = g != 0
    lg, lm = log10_magnitude(g)[m], log10_magnitude(np.abs(steps) / lr)[m]
    index = np.digitize(lg, edges)
    centers, means, counts = [], [], []
    for b in range(1, len(edges)):
        inside = index == b
        if inside.sum() >= 20:
            centers.append(float((edges[b - 1] + edges[b]) / 2))
            means.append(float(lm[inside].mean()))
            counts.append(int(inside.sum()))
    return {"log10_grad": centers, "mean_log10_multiplier": means, "count": counts}


def run_stats(run: Run, lr: float, grad_clip: float, early: np.ndarray) -> dict:
    windows = {"early": slice(0, len(early)), "late": slice(len(early), run.grads.shape[1])}
    out = {}
    for window, rows in windows.items():
        grads = run.grads[:, rows].reshape(-1, run.grads.shape[-1])
        steps = run.steps[:, rows].reshape(-1, run.steps.shape[-1])
        out[window] = window_stats(grads, steps, lr, run.tensor_names, run.tensor_sizes, grad_clip)
        out[window]["multiplier_curve"] = multiplier_curve(grads, steps, lr, grad_clip)
    return out


# ================================================================================================
# Main
# ================================================================================================


def probe_optimizer(name: str, lr: float, grad_clip: float, args: Args,
                    num_updates: int) -> optax.GradientTransformation:
    if name == "lopt":
        return train_lopt.load_optimizer(args.lopt_path, lr, grad_clip, num_updates)
    return train_lopt.with_grad_clip(optax.sign_sgd(lr), grad_clip)


def stats_mode(args: Args) -> None:
    runs = [(task, steps) for task in args.tasks if task in GRID_TASKS for steps in args.grid_steps]
    runs += [(task, None) for task in args.tasks if task in BRAX_TASKS]
    for task, steps in runs:
        label = run_label(task, steps)
        path = os.path.join(args.results_dir, f"stats_{label}.json")
        grad_clip = grid_clip(args) if steps else brax_args(task).grad_clip
        report = {"task": task, "env_steps": steps or int(eval_brax.eval_schedule(brax_args(task))[1][-1]),
                  "grad_clip": grad_clip, "optimizers": {}}
        for name in ("lopt", "sign_sgd"):
            lr, start = picked_lr(task, name, steps), time.time()
            snapshots_at = lambda n: np.concatenate(snapshot_updates(n, args.snapshots))
            tx = probe_optimizer(name, lr, grad_clip, args, run_updates(task, steps))
            if steps:
                run = grid_run(task, steps, tx, snapshots_at, args.num_seeds)
            else:
                run = brax_run(task, tx, snapshots_at, args.num_seeds, f"{label} {name}")
            early, late = snapshot_updates(run.num_updates, args.snapshots)
            report["optimizers"][name] = {"learning_rate": lr, "num_updates": run.num_updates,
                                          "snapshot_updates": {"early": early.tolist(), "late": late.tolist()},
                                          "final_returns": run.final_returns.tolist(),
                                          **run_stats(run, lr, grad_clip, early)}
            summary = report["optimizers"][name]
            print(f"[{label}] {name} lr {lr:.2e}: {run.num_updates} updates, final return "
                  f"{np.nanmean(run.final_returns):.2f}, log10|g| mean early {summary['early']['all']['log10_grad_mean']:.2f}"
                  f" late {summary['late']['all']['log10_grad_mean']:.2f}, top-1% step share late "
                  f"{summary['late']['all']['top1pct_step_share']:.2f} ({time.time() - start:.0f}s)", flush=True)
        report["settings"] = recorded(asdict(args))
        atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
        print(f"wrote {recorded(path)}", flush=True)


def run_label(task: str, steps: int | None) -> str:
    """stats_<label>.json / variants_<label>.json: a Brax task's name, or a grid task with its lifetime (1e5)."""
    return f"{task}_{steps:.0e}".replace("+0", "") if steps else task


def variants_mode(args: Args) -> None:
    """Each variant beside the shipped optimizer and sign-SGD on the same seeds. On Brax those two are the committed
    selection runs; on the grids (cheap) both are rerun here, on the final evaluation's validation seeds."""
    runs = [(task, steps) for task in args.tasks if task in GRID_TASKS for steps in args.grid_steps]
    runs += [(task, None) for task in args.tasks if task in BRAX_TASKS]
    for task, steps in runs:
        label = run_label(task, steps) + ("_reported" if not steps and args.brax_seeds == "reported" else "")
        path = os.path.join(args.results_dir, f"variants_{label}.json")
        grad_clip = grid_clip(args) if steps else brax_args(task).grad_clip
        num_updates = run_updates(task, steps)
        num_seeds = train_lopt.Args().val_seeds if steps else \
            brax_args(task).selection_seeds if args.brax_seeds == "selection" else brax_args(task).num_seeds
        lopt_lr = picked_lr(task, "lopt", steps) if shipped(args) else \
            train_lopt.read_optimizer_checkpoint(args.lopt_path)["config"]["lopt_lr"]  # its own meta-trained lr
        report = {"task": task, "env_steps": steps, "learning_rate": lopt_lr,
                  "seeds": "the final evaluation's validation seeds" if steps else f"the protocol's {args.brax_seeds} seeds",
                  "num_seeds": num_seeds, "lopt_path": recorded(args.lopt_path),
                  "lopt_sha256": eval_brax.file_sha256(args.lopt_path), "references": {}, "variants": {}}
        if os.path.exists(path):  # a rerun adds to (or replaces) the variants already there
            with open(path) as f:
                saved = json.load(f)
            if saved.get("lopt_sha256", report["lopt_sha256"]) == report["lopt_sha256"]:  # the same checkpoint's
                report = {**saved, "lopt_path": report["lopt_path"], "lopt_sha256": report["lopt_sha256"]}

        def train(tx, name):
            if steps:
                return grid_run(task, steps, tx, None, num_seeds).final_returns
            return brax_run(task, tx, None, num_seeds, f"{label} {name}", args.brax_seeds).final_returns

        # Another checkpoint (a recipe's screen) needs only its own run: sign-SGD's is in the shipped one's files.
        for name in ("lopt", "sign_sgd") if shipped(args) else ("lopt",):
            lr = lopt_lr if name == "lopt" else picked_lr(task, name, steps)
            if steps:
                if report["references"].get(name, {}).get("learning_rate") != lr:  # rerun once per file
                    report["references"][name] = {"source": "rerun", "learning_rate": lr,
                                                  "final_returns": train(probe_optimizer(name, lr, grad_clip, args,
                                                                                         num_updates), name).tolist()}
            else:
                file = os.path.join(REPOSITORY, "results", "brax", task, f"{name}@{lr:.2e}_{args.brax_seeds}.json")
                with open(file) as f:
                    report["references"][name] = {"source": recorded(file), "learning_rate": lr,
                                                  "final_returns": json.load(f)["final_returns"]}
        atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
        print(f"[{label}] " + ", ".join(f"{name} at lr {r['learning_rate']:.2e}: final return "
                                        f"{np.nanmean(r['final_returns']):.2f}"
                                        for name, r in report["references"].items()), flush=True)
        for variant in args.variants:
            start, lr = time.time(), report["learning_rate"]
            tx = learned_variant(variant, args, lr, grad_clip, num_updates) if variant != "as_shipped" else \
                probe_optimizer("lopt", lr, grad_clip, args, num_updates)
            returns = train(tx, variant)
            variant = f"spread_{args.step_spread:g}" if variant == "spread" else variant
            report["variants"][variant] = {"final_returns": returns.tolist(),
                                           "settings": {"reset_every": args.reset_every, "step_spread": args.step_spread,
                                                        "reference_log10_grad": args.reference_log10_grad}}
            atomic_write(path, lambda f: f.write(json.dumps(report, indent=1).encode()))
            references = ", ".join(f"{name} {np.nanmean(r['final_returns']):.2f}"
                                   for name, r in report["references"].items())
            print(f"[{label}] {variant} lr {lr:.2e}: final return {np.nanmean(returns):.2f} "
                  f"({', '.join(f'{r:.2f}' for r in returns)}) vs {references} ({time.time() - start:.0f}s)",
                  flush=True)


def grid_clip(args: Args) -> float:
    return train_lopt.read_optimizer_checkpoint(args.lopt_path)["config"]["grad_clip"]


def check_settings(args: Args) -> None:
    check_args(args, positive=("num_seeds", "snapshots", "reset_every"))
    if not args.step_spread >= 1:
        raise UserError(f"--step-spread {args.step_spread}: must be >= 1 (1: one step size per tensor)")
    check_choices("--tasks", args.tasks, (*GRID_TASKS, *BRAX_TASKS))
    check_choices("--variants", args.variants, VARIANTS)
    check_choices("--grid-steps", [str(s) for s in args.grid_steps], [str(s) for s in GRID_RESULTS])
    if not os.path.exists(args.lopt_path):
        raise UserError(f"--lopt-path {args.lopt_path}: no such file")
    if not shipped(args) and (args.mode == "stats" or set(args.tasks) & set(BRAX_TASKS)):
        raise UserError(f"--lopt-path {args.lopt_path}: another checkpoint than the shipped one runs only in "
                        "--mode variants on the grids (its Brax references would be the shipped optimizer's runs; "
                        "eval_brax.py --protocol --lopt-path tunes it on Brax)")


def shipped(args: Args) -> bool:
    return eval_brax.file_sha256(args.lopt_path) == eval_brax.file_sha256(PRETRAINED_OPTIMIZER)


def main(args: Args) -> None:
    check_settings(args)
    os.makedirs(args.results_dir, exist_ok=True)
    (stats_mode if args.mode == "stats" else variants_mode)(args)


if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(Args, description=__doc__.split("\n")[0])))
