"""Tests for benchmarks/step_probe.py: the snapshot transform keeps the right updates, each variant of the learned optimizer
changes the one thing it names, the per-tensor statistics on inputs with known answers, and flag errors."""

from __future__ import annotations

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

import train_lopt
from common import UserError

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import step_probe as sp  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LR = 1e-3


def toy_grads(scale_b: float = 1.0, seed: int = 0):
    """Two tensors whose gradients differ in scale by about two decades, one zero coordinate in each."""
    rng = np.random.default_rng(seed)
    a = rng.normal(size=(3, 4)).astype(np.float32) * 0.3
    b = rng.normal(size=(5,)).astype(np.float32) * 3e-3 * scale_b
    a[0, 0], b[2] = 0.0, 0.0
    return {"a": jnp.asarray(a), "b": jnp.asarray(b)}


def run_updates(tx, grads_list):
    params = jax.tree.map(jnp.zeros_like, grads_list[0])
    state, steps = tx.init(params), []
    for grads in grads_list:
        step, state = jax.jit(tx.update)(grads, state)
        steps.append(step)
    return steps, state


def test_snapshotting_keeps_the_chosen_updates_and_changes_nothing():
    grads = [toy_grads(seed=i) for i in range(5)]
    tx = optax.sgd(0.5)
    recorded_steps, state = run_updates(sp.snapshotting(tx, np.array([3, 1])), grads)
    plain_steps, _ = run_updates(tx, grads)
    for a, b in zip(recorded_steps, plain_steps):
        np.testing.assert_array_equal(ravel_pytree(a)[0], ravel_pytree(b)[0])
    flat = lambda tree: np.asarray(ravel_pytree(tree)[0])
    np.testing.assert_array_equal(state.grads, np.stack([flat(grads[1]), flat(grads[3])]))
    np.testing.assert_allclose(state.steps, -0.5 * state.grads)
    assert int(state.count) == 5


def test_snapshot_windows_are_the_first_and_last_tenth():
    early, late = sp.snapshot_updates(1000, 4)
    assert early.tolist() == [0, 33, 66, 99] and late.tolist() == [900, 933, 966, 999]
    early, late = sp.snapshot_updates(5, 8)  # fewer updates than snapshots: each window is one update
    assert early.tolist() == [0] and late.tolist() == [4]


def variant(name: str, **changes):
    args = sp.Args(**changes)
    return sp.learned_variant(name, args, LR, 1.0, num_updates=100)


def moving_tensors(name: str, shipped_steps):
    """(variant's step, shipped step) per tensor and update, over the coordinates whose gradient is not zero."""
    grads, expected = shipped_steps
    steps, _ = run_updates(variant(name), grads)
    for s, e, g in zip(steps, expected, grads):
        for k in g:
            moving = np.asarray(g[k]) != 0
            yield np.asarray(s[k])[moving], np.asarray(e[k])[moving]


@pytest.fixture(scope="module")
def shipped_steps():
    grads = [toy_grads(seed=i) for i in range(3)]
    tx = train_lopt.load_optimizer(sp.PRETRAINED_OPTIMIZER, LR, 1.0)
    return grads, run_updates(tx, grads)[0]


def test_unchanged_variant_parts_match_the_shipped_optimizer(shipped_steps):
    """'reset' with a long interval changes nothing after its first reset: it is the shipped optimizer."""
    grads, expected = shipped_steps
    steps, _ = run_updates(variant("reset", reset_every=100), grads)
    for s, e in zip(steps, expected):
        np.testing.assert_allclose(s["a"], e["a"], rtol=1e-6)
        np.testing.assert_allclose(s["b"], e["b"], rtol=1e-6)


def test_reset_restarts_the_recurrent_state():
    grads = [toy_grads(seed=0)] * 3
    steps, _ = run_updates(variant("reset", reset_every=2), grads)
    np.testing.assert_allclose(steps[2]["a"], steps[0]["a"], rtol=1e-6)  # update 2 starts from a zero state
    assert not np.allclose(steps[1]["a"], steps[0]["a"])  # the state carried over changes the step


def test_tensor_mean_removes_the_shape_and_keeps_the_size(shipped_steps):
    for s, e in moving_tensors("tensor_mean", shipped_steps):
        np.testing.assert_allclose(np.abs(s), np.abs(e).mean(), rtol=1e-5)
        np.testing.assert_array_equal(np.sign(s), np.sign(e))


def test_tensor_norm_gives_every_tensor_sign_sgds_size(shipped_steps):
    for s, e in moving_tensors("tensor_norm", shipped_steps):
        np.testing.assert_allclose(np.sqrt(np.mean(np.square(s))), LR, rtol=1e-5)
        np.testing.assert_allclose(s / np.abs(s).max(), e / np.abs(e).max(), rtol=1e-4)
    steps, _ = run_updates(variant("tensor_norm"), shipped_steps[0])
    assert np.asarray(steps[0]["a"])[0, 0] == 0  # a zero gradient still does not move


def test_rescaled_is_blind_to_a_tensors_gradient_scale():
    """The scale of each tensor's gradient is divided out, so multiplying one tensor's by 100 changes nothing."""
    small = run_updates(variant("rescaled"), [toy_grads(scale_b=1.0, seed=i) for i in range(3)])[0]
    large = run_updates(variant("rescaled"), [toy_grads(scale_b=100.0, seed=i) for i in range(3)])[0]
    for s, l in zip(small, large):
        np.testing.assert_allclose(s["b"], l["b"], rtol=1e-4, atol=1e-9)
        np.testing.assert_allclose(s["a"], l["a"], rtol=1e-6)
    shipped = train_lopt.load_optimizer(sp.PRETRAINED_OPTIMIZER, LR, 1.0)  # which is not
    small, large = (run_updates(shipped, [toy_grads(scale_b=scale, seed=i) for i in range(3)])[0][-1]
                    for scale in (1.0, 100.0))
    assert not np.allclose(np.asarray(small["b"]), np.asarray(large["b"]), rtol=1e-2)


def test_window_stats_on_known_steps():
    """sign-SGD-like steps (lr where g != 0) have multiplier 1; the step shares follow the moving coordinates."""
    grads = np.array([[0.5, -2.0, 0.0, 1e-3], [0.1, 0.1, 0.1, 0.0]], np.float32)
    steps = -LR * np.sign(grads)
    stats = sp.window_stats(grads, steps, LR, ["w", "b"], [3, 1], grad_clip=1.0)
    w, b = stats["tensors"]["w"], stats["tensors"]["b"]
    assert w["log10_multiplier_q05_q50_q95"] == pytest.approx([0, 0, 0], abs=1e-6)
    assert w["at_clip_fraction"] == pytest.approx(1 / 5)  # -2.0, clipped to -1: one of the five moving entries
    assert w["zero_grad_fraction"] == pytest.approx(1 / 6)
    # Sample 0: 3 moving coordinates, one in b; sample 1: all three in w.
    assert b["step_share"] == pytest.approx((1 / 3 + 0) / 2)
    assert stats["all"]["top1pct_step_share"] == pytest.approx(1 / 3)  # 1 of 4 coordinates, of 3 equal steps


def test_bad_flags_are_one_line_errors():
    with pytest.raises(UserError, match="--tasks catch"):
        sp.check_settings(sp.Args(tasks=("catch",)))
    with pytest.raises(UserError, match="--grid-steps 5"):
        sp.check_settings(sp.Args(grid_steps=(5,)))
    with pytest.raises(UserError, match="--step-spread 0.5"):
        sp.check_settings(sp.Args(step_spread=0.5))
    other = os.path.join(REPO, "results", "meta_screens", "default.msgpack")  # not the shipped checkpoint
    with pytest.raises(UserError, match="--lopt-path .*variants on the grids"):
        sp.check_settings(sp.Args(mode="variants", tasks=("hopper",), lopt_path=other))
    sp.check_settings(sp.Args(mode="variants", tasks=sp.GRID_TASKS, lopt_path=other))  # a recipe's screen: allowed
    result = subprocess.run([sys.executable, "benchmarks/step_probe.py", "--variants", "nope"], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: --variants nope")
    assert "Traceback" not in result.stderr


def test_a_recipe_screen_runs_only_its_checkpoint_and_writes_its_file(tmp_path, monkeypatch):
    """variants mode with another checkpoint and no variants (a recipe's screen): it trains only that checkpoint, at
    its own meta-trained lr, on the grid task, and writes the file naming the checkpoint; rerun, it trains nothing."""
    other = os.path.join(REPO, "results", "meta_screens", "default.msgpack")
    trained = []

    def grid_run(task, steps, tx, snapshots_at, num_seeds):
        trained.append((task, steps, num_seeds))
        return sp.Run([], [], None, None, np.arange(num_seeds, dtype=float), 1)

    monkeypatch.setattr(sp, "grid_run", grid_run)
    args = sp.Args(mode="variants", tasks=("small_dense_long",), grid_steps=(100_000,), variants=(), lopt_path=other,
                   results_dir=str(tmp_path))
    sp.main(args)
    report = json.loads((tmp_path / "variants_small_dense_long_1e5.json").read_text())
    assert trained == [("small_dense_long", 100_000, 16)] and list(report["references"]) == ["lopt"]
    assert report["learning_rate"] == train_lopt.read_optimizer_checkpoint(other)["config"]["lopt_lr"]
    assert report["lopt_sha256"] == sp.eval_brax.file_sha256(other) and report["variants"] == {}
    sp.main(args)
    assert len(trained) == 1
