"""Measure why RL gradients are hard for a learned optimizer, and show that gradient processing fixes it.

    python gradient_stats.py                                   # A2C + Adam on catch vs a supervised MLP
    python gradient_stats.py --env small_dense_long --total-timesteps 200000
    python gradient_stats.py --supervised-data my_data.npz     # 'x' (N, ...) inputs, 'y' (N,) integer labels

Reading order: record a fixed subset of gradient coordinates inside the optimizer -> collect them during
A2C training (RL) and during supervised training of an MLP of the same size -> statistics (quantiles of
|g| and log10|g|, drift between training stages as Wasserstein-1 / Kolmogorov-Smirnov distances) ->
the RNN identity experiment (a GRU learns g -> g from raw g, or from (sign g, log|g|) with output
sign(g) exp(o)) -> figures -> main. Writes grads.npz, stats.json, identity.json and three PNGs.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from typing import Callable, Literal, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from jax.flatten_util import ravel_pytree

import train_lopt
from common import GRIDWORLDS, UserError, check_args, check_writable_dir, run_cli
from train_lopt import MAX_LOG_OUTPUT, a2c_step, init_agent, process_gradient, with_grad_clip

EnvName = Literal[tuple([*GRIDWORLDS, "catch"])]


@dataclass
class Args:
    env: EnvName = "catch"
    """RL task: any gridworld name or 'catch'"""
    total_timesteps: int = 100_000
    """environment steps of A2C training; the supervised run takes as many updates"""
    num_envs: int = 4
    rollout_steps: int = 20
    """A2C rollout length; num_envs * rollout_steps is also the supervised minibatch size"""
    learning_rate: float = 3e-3
    """Adam learning rate, for both the agent and the supervised model"""
    grad_clip: float = 1.0
    """element-wise clip before Adam (the recorded g is the gradient before the clip; 0: no clip)"""
    num_coordinates: int = 512
    """parameter coordinates sampled (once, uniformly) and recorded at every update"""
    supervised_data: str | None = None
    """.npz with 'x' (N, ...) float inputs and 'y' (N,) integer labels; default: synthetic data"""
    stages: int = 4
    """equal slices of training whose log10|g| distributions are compared"""
    identity_epochs: int = 30
    identity_hidden_size: int = 16
    seed: int = 0
    """0 to 2**32 - 1 (jax.random.PRNGKey keeps 32 bits; numpy's generators take no negative seeds)"""
    out_dir: str = "runs/gradient_stats"


NUM_PROGRESS_LINES = 10  # gradient collection runs as this many jitted scans, with a progress line after each
QUANTILES = (0.0, 0.01, 0.05, 0.25, 0.5, 0.75, 0.95, 0.99, 1.0)
SYNTHETIC_EXAMPLES = 10_000
IDENTITY_WINDOW = 25  # the identity GRU sees each coordinate's series in windows of this many updates
IDENTITY_BATCH = 256
IDENTITY_LR = 1e-2
IDENTITY_TEST_FRACTION = 0.2  # coordinates held out to measure the identity models
WITHIN = 0.1  # "within +-10%": |prediction - g| <= WITHIN * |g|

# ================================================================================================
# Recording gradients: a pass-through optax transformation that keeps a few coordinates
# ================================================================================================


class Recorded(NamedTuple):
    values: jax.Array  # the sampled coordinates of the last updates that passed through


def record_coordinates(indices: jax.Array) -> optax.GradientTransformation:
    """Leaves updates unchanged and stores `flat_updates[indices]` in its state."""

    def init(params):
        return Recorded(jnp.zeros(indices.shape, jnp.float32))

    def update(updates, state, params=None):
        return updates, Recorded(ravel_pytree(updates)[0][indices])

    return optax.GradientTransformation(init, update)


def recording_adam(indices: jax.Array, args: Args) -> optax.GradientTransformation:
    """Adam with element-wise clip, recording the incoming gradient (state[0]) and Adam's update (state[-1])."""
    tx = with_grad_clip(optax.adam(args.learning_rate), args.grad_clip)
    return optax.chain(record_coordinates(indices), tx, record_coordinates(indices))


def recorded_grad_and_update(opt_state) -> tuple[jax.Array, jax.Array]:
    return opt_state[0].values, opt_state[-1].values


def sample_coordinates(params, num_coordinates: int, seed: int) -> np.ndarray:
    num_params = ravel_pytree(params)[0].size
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(num_params, min(num_coordinates, num_params), replace=False))


def run_in_chunks(step: Callable, state, data, num_updates: int, report: Callable):
    """Apply `step(state, data) -> (state, outputs)` num_updates times, as NUM_PROGRESS_LINES jitted lax.scans
    of equal length (num_updates is rounded up to fill them), calling `report` after each scan.
    Returns the outputs stacked over updates, as numpy arrays."""
    chunks = min(NUM_PROGRESS_LINES, num_updates)
    length = -(-num_updates // chunks)
    scan = jax.jit(lambda state, data: jax.lax.scan(lambda s, _: step(s, data), state, length=length))
    outputs, start = [], time.time()
    for chunk in range(chunks):
        state, out = scan(state, data)
        outputs.append(jax.device_get(out))
        report((chunk + 1) * length, chunks * length, outputs[-1], time.time() - start)
    return jax.tree.map(lambda *xs: np.concatenate(xs), *outputs)


# ================================================================================================
# RL: A2C with Adam (train_lopt's inner learner)
# ================================================================================================


def collect_rl(args: Args) -> dict:
    """Train one A2C agent with Adam on args.env and record g and Adam's update at every update."""
    task = train_lopt.Task.make(args.env, train_lopt.Args(num_envs=args.num_envs, rollout_steps=args.rollout_steps))
    key = jax.random.PRNGKey(args.seed)
    coordinates = sample_coordinates(task.init_params(key), args.num_coordinates, args.seed)  # uses only the size
    tx = recording_adam(jnp.asarray(coordinates), args)
    agent = init_agent(task, tx, key)
    steps_per_update = args.num_envs * args.rollout_steps

    def step(agent, _):
        agent, (return_sum, return_count) = a2c_step(task, tx, agent)
        return agent, (*recorded_grad_and_update(agent.opt_state), return_sum, return_count)

    def report(done, total, out, seconds):
        mean_return = out[2].sum() / max(out[3].sum(), 1)
        print(f"rl {args.env}: update {done}/{total} | env steps {done * steps_per_update:,} | "
              f"mean episode return {mean_return:.2f} | {seconds:.0f}s", flush=True)

    num_updates = max(1, args.total_timesteps // steps_per_update)
    grad, update, return_sum, return_count = run_in_chunks(step, agent, None, num_updates, report)
    episode_return = np.where(return_count > 0, return_sum / np.maximum(return_count, 1), np.nan)
    num_params = ravel_pytree(agent.params)[0].size
    return dict(grad=grad, update=update, coordinates=coordinates, episode_return=episode_return,
                num_params=num_params, obs_shape=task.env.observation_space(task.env_params).shape,
                num_actions=task.env.num_actions)


# ================================================================================================
# Supervised learning: an MLP classifier with as many parameters as the agent
# ================================================================================================


def synthetic_classification(input_size: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Gaussian inputs labelled by a random teacher network (tanh hidden layer), from a fixed seed."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(SYNTHETIC_EXAMPLES, input_size)).astype(np.float32)
    w1 = rng.normal(size=(input_size, 32)) / np.sqrt(input_size)
    w2 = rng.normal(size=(32, num_classes))
    return x, np.argmax(np.tanh(x @ w1) @ w2, axis=1).astype(np.int32)


def load_supervised_data(path: str) -> tuple[np.ndarray, np.ndarray]:
    """'x' (N, ...) inputs and 'y' (N,) integer labels from an .npz; anything unusable is a UserError."""
    try:
        with np.load(path, allow_pickle=False) as data:
            x, y = np.asarray(data["x"]), np.asarray(data["y"])
    except FileNotFoundError:
        raise UserError(f"--supervised-data {path}: file not found")
    except IsADirectoryError:
        raise UserError(f"--supervised-data {path}: is a directory; give the .npz file")
    except KeyError as error:
        raise UserError(f"--supervised-data {path}: missing array {error}; expected 'x' (inputs) and 'y' (labels)")
    except Exception as error:  # np.load raises several unrelated types on a corrupt or foreign file
        raise UserError(f"--supervised-data {path}: cannot read it as an .npz file ({type(error).__name__})")
    if x.ndim < 2 or y.ndim != 1 or len(x) != len(y) or len(y) == 0 or x[0].size == 0:
        raise UserError(f"--supervised-data {path}: need x of shape (N, ...) and y of shape (N,), "
                        f"got {x.shape} and {y.shape}")
    if not np.issubdtype(x.dtype, np.number) or not np.issubdtype(y.dtype, np.integer) or y.min() < 0:
        raise UserError(f"--supervised-data {path}: need numeric x and non-negative integer labels y")
    if not np.all(np.isfinite(x)):  # NaN inputs would make every recorded gradient NaN
        raise UserError(f"--supervised-data {path}: x holds NaN or infinite values")
    return x.reshape(len(x), -1).astype(np.float32), y.astype(np.int32)


class Classifier(nn.Module):
    hidden_size: int
    num_classes: int

    @nn.compact
    def __call__(self, x):
        return nn.Dense(self.num_classes)(nn.relu(nn.Dense(self.hidden_size)(x)))


def hidden_size_for(num_params: int, input_size: int, num_classes: int) -> int:
    """Hidden width of a one-hidden-layer MLP with about num_params parameters: h (in + out + 1) + out."""
    return max(1, round((num_params - num_classes) / (input_size + num_classes + 1)))


def collect_supervised(args: Args, x: np.ndarray, y: np.ndarray, num_params: int, num_updates: int) -> dict:
    """Train the classifier with the same optimizer and minibatch size as the agent; record as for RL."""
    num_classes = int(y.max()) + 1
    model = Classifier(hidden_size_for(num_params, x.shape[1], num_classes), num_classes)
    key_params, key_batches = jax.random.split(jax.random.PRNGKey(args.seed + 1))
    params = model.init(key_params, x[:1])
    coordinates = sample_coordinates(params, args.num_coordinates, args.seed + 1)
    tx = recording_adam(jnp.asarray(coordinates), args)
    batch_size = args.num_envs * args.rollout_steps

    def cross_entropy(params, inputs, labels):
        return optax.softmax_cross_entropy_with_integer_labels(model.apply(params, inputs), labels).mean()

    def step(state, data):
        params, opt_state, key = state
        key, key_batch = jax.random.split(key)
        batch = jax.random.randint(key_batch, (batch_size,), 0, len(data[1]))
        loss, grads = jax.value_and_grad(cross_entropy)(params, data[0][batch], data[1][batch])
        updates, opt_state = tx.update(grads, opt_state, params)
        state = (optax.apply_updates(params, updates), opt_state, key)
        return state, (*recorded_grad_and_update(opt_state), loss)

    def report(done, total, out, seconds):
        print(f"supervised: update {done}/{total} | loss {out[2].mean():.3f} | {seconds:.0f}s", flush=True)

    state = (params, tx.init(params), key_batches)
    grad, update, loss = run_in_chunks(step, state, (jnp.asarray(x), jnp.asarray(y)), num_updates, report)
    return dict(grad=grad, update=update, coordinates=coordinates, loss=loss,
                num_params=ravel_pytree(params)[0].size, hidden_size=model.hidden_size)


# ================================================================================================
# Statistics
# ================================================================================================


def log10_abs_nonzero(values: np.ndarray) -> np.ndarray:
    """log10|v| of the non-zero entries (exact zeros, e.g. weights of inputs that were all 0, have no log)."""
    magnitudes = np.abs(np.asarray(values, np.float64)).ravel()
    return np.log10(magnitudes[magnitudes > 0])


def quantile_dict(values: np.ndarray) -> dict[str, float]:
    return {f"{q:g}": float(v) for q, v in zip(QUANTILES, np.quantile(values, QUANTILES))}


def summarize(values: np.ndarray) -> dict:
    """Quantiles of |v| and of log10|v| (non-zero entries), and the share of exact zeros."""
    magnitudes = np.abs(np.asarray(values, np.float64)).ravel()
    logs = log10_abs_nonzero(magnitudes)
    summary = {"count": int(magnitudes.size), "zero_fraction": float(np.mean(magnitudes == 0)),
               "abs": quantile_dict(magnitudes)}
    if logs.size:
        summary["abs"]["min_nonzero"] = float(10 ** logs.min())
        spread = float(np.quantile(logs, 0.99) - np.quantile(logs, 0.01))
        summary["log10_abs"] = {**quantile_dict(logs), "mean": float(logs.mean()), "std": float(logs.std()),
                                "decades_between_q0.01_and_q0.99": spread}
    return summary


def _cdfs_on_merged_support(a: np.ndarray, b: np.ndarray):
    """Both empirical CDFs at every sample point (sorted), and the gaps between consecutive points."""
    a, b = np.sort(a), np.sort(b)
    points = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(a, points, side="right") / a.size
    cdf_b = np.searchsorted(b, points, side="right") / b.size
    return cdf_a, cdf_b, np.diff(points)


def wasserstein1(a: np.ndarray, b: np.ndarray) -> float:
    """W1 between two 1-D empirical distributions: the integral of |F_a - F_b| (exact, any sample sizes)."""
    cdf_a, cdf_b, gaps = _cdfs_on_merged_support(a, b)
    return float(np.sum(np.abs(cdf_a[:-1] - cdf_b[:-1]) * gaps))


def ks_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Kolmogorov-Smirnov statistic: the largest gap between the two empirical CDFs."""
    cdf_a, cdf_b, _ = _cdfs_on_merged_support(a, b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def stage_slices(num_updates: int, stages: int) -> list[tuple[int, int]]:
    bounds = np.linspace(0, num_updates, stages + 1).round().astype(int)
    return list(zip(bounds[:-1].tolist(), bounds[1:].tolist()))


def stage_drift(grad: np.ndarray, stages: int) -> dict:
    """How the log10|g| distribution moves between equal slices of training (grad: updates x coordinates)."""
    slices = stage_slices(len(grad), stages)
    logs = [log10_abs_nonzero(grad[start:end]) for start, end in slices]
    if any(stage.size == 0 for stage in logs):
        return {"updates": slices, "note": "a stage has only zero gradients"}
    pairs = list(zip(logs[:-1], logs[1:]))
    return {
        "updates": slices,
        "log10_abs_median": [float(np.median(stage)) for stage in logs],
        "wasserstein1_log10_consecutive": [wasserstein1(a, b) for a, b in pairs],
        "wasserstein1_log10_first_last": wasserstein1(logs[0], logs[-1]),
        "ks_consecutive": [ks_distance(a, b) for a, b in pairs],
        "ks_first_last": ks_distance(logs[0], logs[-1]),
    }


# ================================================================================================
# The RNN identity experiment
# ================================================================================================


class IdentityRNN(nn.Module):
    """A GRU + linear head mapping a gradient series to itself. Raw: reads g, outputs o ~ g.
    Processed: reads (sign g, log(|g| + eps)), outputs o ~ log|g|, predicting sign(g) exp(o)."""

    hidden_size: int
    processed: bool
    output_bias: float = 0.0  # the head starts at the mean target: log|g| is about -10, far from 0

    @nn.compact
    def __call__(self, g):  # (batch, time) -> o (batch, time)
        x = jnp.stack(process_gradient(g), -1) if self.processed else g[..., None]
        head = nn.Dense(1, bias_init=nn.initializers.constant(self.output_bias))
        return head(nn.RNN(nn.GRUCell(self.hidden_size))(x))[..., 0]

    def predict(self, params, g):
        o = self.apply(params, g)
        return jnp.sign(g) * jnp.exp(jnp.clip(o, -MAX_LOG_OUTPUT, MAX_LOG_OUTPUT)) if self.processed else o

    def loss(self, params, g):
        o = self.apply(params, g)
        if not self.processed:
            return jnp.mean(jnp.square(o - g))
        # Fit log|g| where g != 0; a zero gradient is reproduced exactly through sign(g) = 0.
        nonzero = g != 0
        error = jnp.where(nonzero, o - process_gradient(g)[1], 0.0)
        return jnp.sum(jnp.square(error)) / jnp.maximum(jnp.sum(nonzero), 1)


def identity_metrics(prediction: np.ndarray, g: np.ndarray) -> dict:
    """MSE over all entries; the fraction within +-10% over non-zero targets, overall and per decade of |g|."""
    prediction, g = np.asarray(prediction, np.float64), np.asarray(g, np.float64)
    nonzero = g != 0
    within = np.abs(prediction - g) <= WITHIN * np.abs(g)
    decade = np.floor(np.log10(np.abs(g[nonzero]))).astype(int)
    by_decade = {f"1e{d}": float(within[nonzero][decade == d].mean()) for d in np.unique(decade)}
    return {"mse": float(np.mean(np.square(prediction - g))), "within_10pct": float(within[nonzero].mean()),
            "within_10pct_by_decade": by_decade}


def windows(series: np.ndarray, length: int) -> np.ndarray:
    """(updates, coordinates) -> (coordinates * updates // length, length): each coordinate's series, cut up."""
    usable = series[: len(series) // length * length]
    return usable.T.reshape(-1, length).astype(np.float32)


def train_identity(model: IdentityRNN, train: np.ndarray, test: np.ndarray, epochs: int, seed: int) -> dict:
    """Adam on minibatches of training windows; after every epoch, the metrics on the held-out windows."""
    batch_size = min(IDENTITY_BATCH, len(train))
    batches_per_epoch = len(train) // batch_size
    key_init, key = jax.random.split(jax.random.PRNGKey(seed))
    params = model.init(key_init, train[:1])
    tx = optax.adam(IDENTITY_LR)

    @jax.jit
    def epoch(params, opt_state, key, train, test):  # data as arguments, not constants baked into the program
        order = jax.random.permutation(key, len(train))[: batches_per_epoch * batch_size]

        def step(carry, batch):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(model.loss)(params, train[batch])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                                   order.reshape(batches_per_epoch, batch_size))
        return params, opt_state, losses.mean(), model.predict(params, test)

    name = "processed" if model.processed else "raw"
    opt_state, curve = tx.init(params), []
    for e in range(1, epochs + 1):
        key, key_epoch = jax.random.split(key)
        params, opt_state, train_loss, prediction = epoch(params, opt_state, key_epoch, train, test)
        metrics = identity_metrics(prediction, test)
        curve.append({"epoch": e, "train_loss": float(train_loss), "mse": metrics["mse"],
                      "within_10pct": metrics["within_10pct"]})
        if e % max(1, epochs // 10) == 0 or e == epochs:
            print(f"identity {name}: epoch {e}/{epochs} | train loss {float(train_loss):.3g} | "
                  f"held-out MSE {metrics['mse']:.3g} | within +-10% {metrics['within_10pct']:.3f}", flush=True)
    return {**metrics, "curve": curve}


def identity_experiment(grad: np.ndarray, epochs: int, hidden_size: int, seed: int) -> dict:
    """Train raw and processed GRUs on g -> g over windows of the series of training coordinates;
    measure both on the coordinates held out."""
    if np.count_nonzero(grad) == 0:
        raise UserError("the identity experiment needs non-zero gradients; all recorded gradients are 0")
    num_coordinates = grad.shape[1]
    num_test = min(num_coordinates - 1, max(1, round(IDENTITY_TEST_FRACTION * num_coordinates)))
    if num_test < 1:
        raise UserError("the identity experiment needs at least 2 recorded coordinates (--num-coordinates)")
    order = np.random.default_rng(seed).permutation(num_coordinates)
    length = min(IDENTITY_WINDOW, len(grad))
    train, test = windows(grad[:, order[num_test:]], length), windows(grad[:, order[:num_test]], length)
    results = {"window": length, "train_windows": len(train), "test_windows": len(test),
               "train_coordinates": num_coordinates - num_test, "test_coordinates": num_test,
               "epochs": epochs, "hidden_size": hidden_size, "learning_rate": IDENTITY_LR}
    for processed in (False, True):
        targets = log10_abs_nonzero(train) * np.log(10) if processed else train
        model = IdentityRNN(hidden_size, processed, float(targets.mean()))
        results["processed" if processed else "raw"] = train_identity(model, train, test, epochs, seed)
    return results


# ================================================================================================
# Figures
# ================================================================================================


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_histograms(rl_grad, sl_grad, env: str, path: str) -> None:
    plt = _pyplot()
    rl, sl = log10_abs_nonzero(rl_grad), log10_abs_nonzero(sl_grad)
    bins = np.linspace(min(rl.min(), sl.min()), max(rl.max(), sl.max()), 80)
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for logs, grad, label in ((rl, rl_grad, f"RL: A2C on {env}"), (sl, sl_grad, "supervised MLP")):
        ax.hist(logs, bins, density=True, histtype="step", linewidth=1.5,
                label=f"{label} ({np.mean(grad == 0):.0%} exact zeros not shown)")
    ax.set(xlabel="log10 |g|", ylabel="density", title="Gradient magnitudes over all of training (Adam)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_stages(series: dict[str, tuple[np.ndarray, dict]], stages: int, path: str) -> None:
    """series: {title: (gradients (updates, coordinates), their stage_drift)}."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(series), figsize=(5.5 * len(series), 3.8), sharex=True)
    for ax, (name, (grad, drift)) in zip(np.atleast_1d(axes), series.items()):
        slices = stage_slices(len(grad), stages)
        colors = plt.cm.viridis(np.linspace(0, 0.9, stages))
        for (start, end), color in zip(slices, colors):
            logs = log10_abs_nonzero(grad[start:end])
            if logs.size:
                ax.hist(logs, 60, density=True, histtype="step", color=color, label=f"updates {start}-{end}")
        w1 = drift.get("wasserstein1_log10_first_last")
        title = name if w1 is None else f"{name}: W1(first, last stage) = {w1:.2f} decades"
        ax.set(xlabel="log10 |g|", ylabel="density", title=title)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def plot_identity(results: dict, path: str) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    for name in ("raw", "processed"):
        curve = results[name]["curve"]
        epochs = [c["epoch"] for c in curve]
        axes[0].plot(epochs, [c["within_10pct"] for c in curve], label=name)
        axes[1].plot(epochs, [c["mse"] for c in curve], label=name)
    axes[0].set(xlabel="epoch", ylabel="fraction within +-10%", title="held-out outputs within +-10% of g", ylim=(0, 1))
    axes[1].set(xlabel="epoch", ylabel="MSE", title="held-out MSE on g", yscale="log")
    decades = sorted({d for n in ("raw", "processed") for d in results[n]["within_10pct_by_decade"]}, key=float)
    positions = np.arange(len(decades))
    for offset, name in ((-0.2, "raw"), (0.2, "processed")):
        by_decade = results[name]["within_10pct_by_decade"]
        axes[2].bar(positions + offset, [by_decade.get(d, np.nan) for d in decades], 0.4, label=name)
    axes[2].set_xticks(positions, [f"{float(d):.0e}" for d in decades], rotation=45, fontsize=7)
    axes[2].set(xlabel="|g| decade", ylabel="fraction within +-10%", title="after training, by |g|", ylim=(0, 1))
    for ax in axes:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


# ================================================================================================
# Main
# ================================================================================================


def check_settings(args: Args) -> None:
    """Reject careless flag values with one line naming the flag, before anything is compiled."""
    check_args(args, positive=("num_envs", "rollout_steps", "learning_rate", "stages", "identity_epochs",
                               "identity_hidden_size"), non_negative=("grad_clip",))
    if args.num_coordinates < 2:
        raise UserError(f"--num-coordinates {args.num_coordinates}: must be at least 2 "
                        "(the identity experiment holds some out)")
    minimum = args.stages * args.num_envs * args.rollout_steps
    if args.total_timesteps < minimum:
        raise UserError(f"--total-timesteps {args.total_timesteps}: must be at least {minimum:,}, one A2C update "
                        "per stage (--stages x --num-envs x --rollout-steps)")


def main(args: Args) -> None:
    check_settings(args)
    supervised = load_supervised_data(args.supervised_data) if args.supervised_data else None  # fail early
    check_writable_dir(args.out_dir)
    start = time.time()

    rl = collect_rl(args)
    if supervised is None:
        supervised = synthetic_classification(int(np.prod(rl["obs_shape"])), rl["num_actions"], args.seed)
        source = f"synthetic: {SYNTHETIC_EXAMPLES} Gaussian inputs labelled by a random teacher MLP"
    else:
        source = args.supervised_data
    sl = collect_supervised(args, *supervised, num_params=rl["num_params"], num_updates=len(rl["grad"]))

    np.savez_compressed(
        os.path.join(args.out_dir, "grads.npz"),
        rl_grad=rl["grad"], rl_update=rl["update"], rl_coordinates=rl["coordinates"],
        rl_episode_return=rl["episode_return"],
        supervised_grad=sl["grad"], supervised_update=sl["update"], supervised_coordinates=sl["coordinates"],
        supervised_loss=sl["loss"],
    )
    drift = {"rl": stage_drift(rl["grad"], args.stages), "supervised": stage_drift(sl["grad"], args.stages)}
    stats = {
        "settings": asdict(args),
        "rl": {"env": args.env, "num_params": rl["num_params"], "num_updates": len(rl["grad"]),
               "env_steps": len(rl["grad"]) * args.num_envs * args.rollout_steps,
               "grad": summarize(rl["grad"]), "adam_update": summarize(rl["update"]), "stages": drift["rl"]},
        "supervised": {"data": source, "num_params": sl["num_params"], "hidden_size": sl["hidden_size"],
                       "num_updates": len(sl["grad"]), "grad": summarize(sl["grad"]),
                       "adam_update": summarize(sl["update"]), "stages": drift["supervised"]},
    }
    with open(os.path.join(args.out_dir, "stats.json"), "w") as f:
        json.dump(stats, f, indent=2)
    plot_histograms(rl["grad"], sl["grad"], args.env, os.path.join(args.out_dir, "grad_hist.png"))
    stage_series = {f"RL (A2C on {args.env})": (rl["grad"], drift["rl"]),
                    "supervised": (sl["grad"], drift["supervised"])}
    plot_stages(stage_series, args.stages, os.path.join(args.out_dir, "grad_stages.png"))
    for name in ("rl", "supervised"):
        logs, stage = stats[name]["grad"].get("log10_abs", {}), drift[name]
        print(f"{name}: log10|g| from {logs.get('0', float('nan')):.1f} to {logs.get('1', float('nan')):.1f} "
              f"(1%-99%: {logs.get('0.01', float('nan')):.1f} to {logs.get('0.99', float('nan')):.1f}), "
              f"zeros {stats[name]['grad']['zero_fraction']:.0%}, "
              f"W1(first, last stage) {stage.get('wasserstein1_log10_first_last', float('nan')):.2f} decades")

    identity = identity_experiment(rl["grad"], args.identity_epochs, args.identity_hidden_size, args.seed)
    identity["data"] = f"A2C agent gradients on {args.env} (grads.npz rl_grad)"
    with open(os.path.join(args.out_dir, "identity.json"), "w") as f:
        json.dump(identity, f, indent=2)
    plot_identity(identity, os.path.join(args.out_dir, "identity.png"))
    for name in ("raw", "processed"):
        print(f"identity {name}: held-out MSE {identity[name]['mse']:.3g}, "
              f"within +-10% {identity[name]['within_10pct']:.3f}")
    print(f"done in {time.time() - start:.0f}s; wrote grads.npz, stats.json, identity.json, grad_hist.png, "
          f"grad_stages.png, identity.png to {args.out_dir}")


if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(Args, description=__doc__.split("\n")[0])))
