"""Tests for gradient_stats.py: statistics on inputs with known answers, the coordinate recorder, the
identity experiment (processed beats raw), a tiny end-to-end run, flag checks and command-line errors.

Compilation dominates the run time: the tiny run records 50 updates x 64 coordinates, the same shape as
the synthetic identity test, so the identity GRUs compile once (the second time they come from the
persistent compilation cache set up in conftest.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.flatten_util import ravel_pytree

import gradient_stats as gs
import script_cases
from common import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UPDATES, COORDINATES = 50, 64  # the shape of the recorded series in the tiny run and the identity test


def log_uniform(shape, low: float, high: float, seed: int = 0) -> np.ndarray:
    """Random signs times magnitudes whose log10 is uniform on [log10 low, log10 high]."""
    rng = np.random.default_rng(seed)
    magnitudes = 10 ** rng.uniform(np.log10(low), np.log10(high), shape)
    return (rng.choice([-1.0, 1.0], shape) * magnitudes).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# Command-line processes, started with the module
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def cli(tmp_path_factory):
    """Start the command-line cases when the module starts (each mostly imports JAX, in parallel with the
    other tests); the tests at the end of the file read their results."""
    folder = tmp_path_factory.mktemp("cli")
    corrupt = folder / "corrupt.npz"
    corrupt.write_bytes(b"this is not an npz file")
    cases = {
        "bad_env": ["--env", "nope"],
        "corrupt_data": ["--supervised-data", str(corrupt)],
        "missing_data": ["--supervised-data", str(folder / "missing.npz")],
        "bad_out_dir": ["--out-dir", "README.md/sub"],  # under a regular file: fails even as root
    }
    wait = script_cases.start("gradient_stats.py", {
        name: [*argv, *["--out-dir", str(folder / name)] * ("--out-dir" not in argv)] for name, argv in cases.items()})

    def result(name: str) -> tuple[int, str, str]:
        r = wait()[name]
        return r.returncode, r.stdout, r.stderr

    yield result
    if wait.process.poll() is None:
        wait.process.kill()


# ------------------------------------------------------------------------------------------------
# Statistics: known answers
# ------------------------------------------------------------------------------------------------


def test_summarize_log_uniform_exact():
    """log10|g| evenly spaced on [-8, -2] has quantile q at exactly -8 + 6q; signs and zeros are handled."""
    logs = np.linspace(-8, -2, 6001)
    signs = np.where(np.arange(logs.size) % 2 == 0, 1.0, -1.0)
    values = np.concatenate([signs * 10**logs, np.zeros(1000)])
    summary = gs.summarize(values)
    assert summary["count"] == 7001
    assert summary["zero_fraction"] == pytest.approx(1000 / 7001)
    for q in gs.QUANTILES:
        assert summary["log10_abs"][f"{q:g}"] == pytest.approx(-8 + 6 * q, abs=1e-9)
    assert summary["log10_abs"]["mean"] == pytest.approx(-5.0)
    assert summary["log10_abs"]["decades_between_q0.01_and_q0.99"] == pytest.approx(6 * 0.98)
    assert summary["abs"]["min_nonzero"] == pytest.approx(1e-8) and summary["abs"]["1"] == pytest.approx(1e-2)
    assert summary["abs"]["0"] == 0.0  # the zeros count in the |g| quantiles


def test_summarize_log_uniform_random():
    """Random log-uniform samples on [1e-8, 1e-2]: quantiles close to the exact ones."""
    summary = gs.summarize(log_uniform(200_000, 1e-8, 1e-2))
    for q in (0.01, 0.25, 0.5, 0.75, 0.99):
        assert summary["log10_abs"][f"{q:g}"] == pytest.approx(-8 + 6 * q, abs=0.03)
    assert summary["log10_abs"]["std"] == pytest.approx(6 / np.sqrt(12), abs=0.01)


def test_wasserstein_and_ks_known_answers():
    rng = np.random.default_rng(0)
    a = rng.normal(size=1000)
    assert gs.wasserstein1(a, a + 0.7) == pytest.approx(0.7)  # a shift by c moves every quantile by c
    assert gs.wasserstein1(a, a) == 0.0 and gs.ks_distance(a, a) == 0.0
    assert gs.wasserstein1(a, rng.permutation(a)) == 0.0  # order does not matter
    # Unequal sizes: a point mass at 0 vs {1, 1, 3}: W1 = mean distance = 5/3; KS = 1 (disjoint supports).
    assert gs.wasserstein1(np.array([0.0]), np.array([1.0, 1.0, 3.0])) == pytest.approx(5 / 3)
    assert gs.ks_distance(np.array([0.0]), np.array([1.0, 1.0, 3.0])) == 1.0
    # {0, 1} vs {0.5, 1}: the CDFs differ by 1/2 on [0, 0.5) and agree elsewhere.
    assert gs.wasserstein1(np.array([0.0, 1.0]), np.array([0.5, 1.0])) == pytest.approx(0.25)
    assert gs.ks_distance(np.array([0.0, 1.0]), np.array([0.5, 1.0])) == pytest.approx(0.5)


def test_stage_drift_measures_a_shift_in_decades():
    """Gradients 10x smaller in the second half: W1 between the stages is exactly 1 decade."""
    first = log_uniform((100, 30), 1e-7, 1e-3)
    drift = gs.stage_drift(np.concatenate([first, first / 10]), stages=2)
    assert drift["updates"] == [(0, 100), (100, 200)]
    assert drift["wasserstein1_log10_first_last"] == pytest.approx(1.0, abs=1e-5)
    assert drift["log10_abs_median"][0] - drift["log10_abs_median"][1] == pytest.approx(1.0, abs=1e-5)
    stationary = gs.stage_drift(log_uniform((400, 30), 1e-7, 1e-3, seed=1), stages=4)
    assert len(stationary["wasserstein1_log10_consecutive"]) == 3
    assert stationary["wasserstein1_log10_first_last"] < 0.1 and stationary["ks_first_last"] < 0.05


def test_stage_slices_cover_all_updates():
    slices = gs.stage_slices(10, 3)
    assert slices[0][0] == 0 and slices[-1][1] == 10
    assert all(end == start for (_, end), (start, _) in zip(slices[:-1], slices[1:]))


# ------------------------------------------------------------------------------------------------
# Recording and the supervised model
# ------------------------------------------------------------------------------------------------


def test_recording_adam_records_raw_gradient_and_adam_update():
    """state[0] holds g before the clip at the sampled coordinates; state[-1] holds Adam's update of the clipped g."""
    args = gs.Args(learning_rate=0.1, grad_clip=1.0)
    indices = jnp.array([0, 3, 5])
    tx = gs.recording_adam(indices, args)
    params = {"a": jnp.arange(4.0), "b": jnp.arange(3.0)}
    grads = {"a": jnp.array([5.0, 0.1, 0.2, -3.0]), "b": jnp.array([0.5, -0.25, 2.0])}
    updates, state = jax.jit(tx.update)(grads, tx.init(params), params)  # jitted: one compile, not one per op
    g, update = gs.recorded_grad_and_update(state)
    np.testing.assert_allclose(g, [5.0, -3.0, -0.25])
    adam = optax.adam(0.1)
    reference = jax.jit(adam.update)(jax.tree.map(lambda x: jnp.clip(x, -1, 1), grads), adam.init(params))[0]
    np.testing.assert_allclose(update, ravel_pytree(reference)[0][indices], rtol=1e-6)
    np.testing.assert_allclose(ravel_pytree(updates)[0][indices], update)


def test_supervised_model_size_matches_agent():
    num_params, input_size, num_classes = 14_084, 50, 3
    hidden = gs.hidden_size_for(num_params, input_size, num_classes)
    assert abs(hidden * (input_size + num_classes + 1) + num_classes - num_params) <= input_size + num_classes + 1


def test_load_supervised_data(tmp_path):
    path = tmp_path / "data.npz"
    np.savez(path, x=np.ones((6, 2, 3)), y=np.array([0, 1, 2, 0, 1, 2]))
    x, y = gs.load_supervised_data(str(path))
    assert x.shape == (6, 6) and x.dtype == np.float32 and y.tolist() == [0, 1, 2, 0, 1, 2]
    bad = {"no_y.npz": dict(x=np.ones((3, 2))), "lengths.npz": dict(x=np.ones((3, 2)), y=np.zeros(4, int)),
           "float_labels.npz": dict(x=np.ones((3, 2)), y=np.zeros(3)),
           "no_features.npz": dict(x=np.ones((3, 0)), y=np.zeros(3, int)),
           "nan_x.npz": dict(x=np.full((3, 2), np.nan), y=np.zeros(3, int))}
    for name, arrays in bad.items():
        np.savez(tmp_path / name, **arrays)
        with pytest.raises(UserError, match=name):
            gs.load_supervised_data(str(tmp_path / name))
    with pytest.raises(UserError, match="is a directory"):
        gs.load_supervised_data(str(tmp_path))
    with pytest.raises(UserError, match="README.md: cannot read it as an .npz file"):
        gs.load_supervised_data(os.path.join(REPO, "README.md"))


# Careless values, each rejected by check_settings before anything runs: (Args fields, start of the message).
BAD_SETTINGS = [
    (dict(num_envs=0), "--num-envs 0: must be a finite number > 0"),
    (dict(rollout_steps=-1), "--rollout-steps -1: must be a finite number > 0"),
    (dict(stages=0), "--stages 0: must be"),
    (dict(identity_epochs=0), "--identity-epochs 0: must be"),
    (dict(identity_hidden_size=-16), "--identity-hidden-size -16: must be"),
    (dict(learning_rate=float("nan")), "--learning-rate nan: must be a finite number > 0"),
    (dict(learning_rate=0.0), "--learning-rate 0.0: must be"),
    (dict(grad_clip=-1.0), "--grad-clip -1.0: must be a finite number >= 0"),
    (dict(grad_clip=float("inf")), "--grad-clip inf: must be"),
    (dict(num_coordinates=1), "--num-coordinates 1: must be at least 2"),
    (dict(seed=-1), "--seed -1: must be an integer in [0, 4294967295]"),
    (dict(seed=2**64), f"--seed {2**64}: must be"),
    (dict(total_timesteps=1), "--total-timesteps 1: must be at least 320, one A2C update per stage"),
    (dict(total_timesteps=-80), "--total-timesteps -80: must be at least 320"),
]


@pytest.mark.parametrize("fields, message", BAD_SETTINGS, ids=[str(fields) for fields, _ in BAD_SETTINGS])
def test_bad_settings_are_rejected(fields, message):
    with pytest.raises(UserError) as error:
        gs.check_settings(dataclasses.replace(gs.Args(), **fields))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_edge_settings_that_are_allowed():
    """No clip (0), and the smallest budget: one update per stage (4 stages x 4 envs x 20 steps)."""
    gs.check_settings(dataclasses.replace(gs.Args(), grad_clip=0.0, total_timesteps=320, num_coordinates=2))


# ------------------------------------------------------------------------------------------------
# The identity experiment
# ------------------------------------------------------------------------------------------------


def test_identity_metrics_known_answers():
    g = np.array([1e-6, -1e-3, 2e-2, 0.0])
    exact = gs.identity_metrics(g, g)
    assert exact["mse"] == 0.0 and exact["within_10pct"] == 1.0
    assert set(exact["within_10pct_by_decade"]) == {"1e-6", "1e-3", "1e-2"}  # zeros are not scored
    close = gs.identity_metrics(g * 1.05, g)
    far = gs.identity_metrics(np.array([1.2e-6, -1e-3, 2e-2, 0.0]), g)
    assert close["within_10pct"] == 1.0 and far["within_10pct"] == pytest.approx(2 / 3)
    assert far["within_10pct_by_decade"]["1e-6"] == 0.0
    assert far["mse"] == pytest.approx((0.2e-6) ** 2 / 4)


def test_identity_processed_beats_raw_on_tiny_set():
    """Gradients spread over 6 decades: the processed GRU gets most outputs within +-10%; the raw one does not."""
    results = gs.identity_experiment(log_uniform((UPDATES, COORDINATES), 1e-8, 1e-2), epochs=300,
                                     hidden_size=16, seed=0)
    processed, raw = results["processed"]["within_10pct"], results["raw"]["within_10pct"]
    assert processed >= 0.5 and processed >= raw + 0.3, (processed, raw)
    assert len(results["processed"]["curve"]) == 300


def test_identity_needs_nonzero_gradients():
    with pytest.raises(UserError, match="non-zero"):
        gs.identity_experiment(np.zeros((UPDATES, 4), np.float32), epochs=1, hidden_size=4, seed=0)


# ------------------------------------------------------------------------------------------------
# A tiny end-to-end run
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out_dir = str(tmp_path_factory.mktemp("tiny"))
    args = gs.Args(total_timesteps=UPDATES * 4 * 20, num_coordinates=COORDINATES, identity_epochs=2, out_dir=out_dir)
    gs.main(args)
    return out_dir


def test_tiny_run_writes_all_outputs(tiny_run):
    for name in ("grads.npz", "stats.json", "identity.json", "grad_hist.png", "grad_stages.png", "identity.png"):
        assert os.path.getsize(os.path.join(tiny_run, name)) > 0, name
    with np.load(os.path.join(tiny_run, "grads.npz")) as data:
        for prefix in ("rl", "supervised"):
            assert data[f"{prefix}_grad"].shape == data[f"{prefix}_update"].shape == (UPDATES, COORDINATES)
            assert len(np.unique(data[f"{prefix}_coordinates"])) == COORDINATES
            assert np.all(np.isfinite(data[f"{prefix}_grad"]))
        assert data["rl_episode_return"].shape == data["supervised_loss"].shape == (UPDATES,)
    with open(os.path.join(tiny_run, "stats.json")) as f:
        stats = json.load(f)
    for name in ("rl", "supervised"):
        assert stats[name]["grad"]["count"] == UPDATES * COORDINATES
        assert stats[name]["grad"]["log10_abs"]["0"] <= stats[name]["grad"]["log10_abs"]["1"] < 1
        assert stats[name]["stages"]["wasserstein1_log10_first_last"] >= 0
    # The supervised model is sized like the agent (catch: 14,084 parameters).
    assert abs(stats["supervised"]["num_params"] - stats["rl"]["num_params"]) < 0.01 * stats["rl"]["num_params"]
    with open(os.path.join(tiny_run, "identity.json")) as f:
        identity = json.load(f)
    for name in ("raw", "processed"):
        assert len(identity[name]["curve"]) == 2
        assert 0 <= identity[name]["within_10pct"] <= 1 and identity[name]["mse"] >= 0


# ------------------------------------------------------------------------------------------------
# Command line (the processes were started with the module, by the `cli` fixture)
# ------------------------------------------------------------------------------------------------


def test_cli_bad_env(cli):
    """An unknown --env is rejected before anything runs, naming the valid choices, without a traceback."""
    returncode, stdout, stderr = cli("bad_env")
    assert returncode != 0
    assert "nope" in stderr and "catch" in stderr and "small_dense_long" in stderr
    assert "Traceback" not in stdout + stderr


@pytest.mark.parametrize("case", ["corrupt_data", "missing_data"])
def test_cli_unreadable_supervised_data(cli, case):
    """An unreadable --supervised-data: exit 2 with one `error:` line naming the file, before training."""
    returncode, stdout, stderr = cli(case)
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --supervised-data"), stderr
    assert f"{case.split('_')[0]}.npz" in lines[0], stderr
    assert "rl catch" not in stdout and "Traceback" not in stderr


def test_cli_unwritable_out_dir(cli):
    """--out-dir under a regular file: exit 2 with one `error:` line naming it, before training."""
    returncode, stdout, stderr = cli("bad_out_dir")
    assert returncode == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --out-dir README.md/sub: cannot write there"), stderr
    assert "rl catch" not in stdout and "Traceback" not in stderr
