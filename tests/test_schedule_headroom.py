"""benchmarks/schedule_headroom.py: the decay schedule, the joint pick over horizons, its agreement with
train_lopt.py's tuned evaluation at a constant lr, resuming from its cache, and bad input."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys

import numpy as np
import pytest

import train_lopt as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import schedule_headroom as sh  # noqa: E402

AGENT = dataclasses.replace(tl.Args(), env_group="catch", rollout_steps=5, eval_envs=2, eval_seeds=3)  # catch: 9-step episodes
TINY = sh.Args(tasks=("catch",), optimizers=("adam",), lrs=(1e-2, 3e-2), taus=(4.0,), horizons=(200, 400),
               val_seeds=2, eval_seeds=3, eval_envs=2)


def test_decay_follows_its_formula_and_inf_is_the_constant_lr():
    schedule = sh.decayed(1e-2, 100.0)
    np.testing.assert_allclose([schedule(t) for t in (0, 100, 300)], [1e-2, 1e-2 / math.sqrt(2), 5e-3], rtol=1e-6)
    assert float(sh.decayed(np.float32(1e-2), np.float32(math.inf))(1000)) == np.float32(1e-2)


def test_pick_weighs_each_horizon_by_its_best():
    configs = [(1e-2, math.inf), (3e-2, math.inf), (3e-2, 16.0)]
    # the decayed lr is second at the short horizon and best by far at the long one: the joint pick
    val_means = {100: np.array([10.0, 9.0, 9.5]), 1000: np.array([50.0, 20.0, 100.0])}
    random_means = {100: 0.0, 1000: 0.0}
    assert sh.pick(val_means, random_means, configs, constant_only=False) == 2
    # among the constants, 1e-2 is best at both horizons
    assert sh.pick(val_means, random_means, configs, constant_only=True) == 0
    # scores are measured from the random policy: a fall to it at one horizon outweighs a small gain at the other
    # (divided by the best alone, a negative best would invert the order at that horizon)
    val_means = {100: np.array([-9.0, -9.9]), 1000: np.array([50.0, 55.0])}
    assert sh.pick(val_means, {100: -10.0, 1000: 0.0}, configs[:2], constant_only=True) == 0


@pytest.fixture(scope="module")
def headroom(tmp_path_factory):
    folder = tmp_path_factory.mktemp("headroom")
    args = dataclasses.replace(TINY, out=str(folder / "out.json"), cache_dir=str(folder / "cache"))
    sh.main(args, AGENT)
    with open(args.out) as f:
        return args, json.load(f)


def test_constant_lr_reproduces_the_tuned_evaluations_baseline(headroom):
    """At the shorter horizon, scored from the first updates of the longer run, the constant lr gives what the tuned
    evaluation's own program gives for that budget: the prefix is the shorter run, and the agents are the same."""
    args, result = headroom
    lr = result["tasks"]["catch"]["adam"]["picked"]["constant"]["lr"]
    steps = min(args.horizons)
    evaluator = tl.TaskEvaluator(AGENT, "catch", tl.lopt_config(AGENT), steps)
    keys = tl.evaluation_keys("catch", tl.EVAL_STREAM, args.eval_seeds, "--eval-seeds")
    np.testing.assert_allclose(result["tasks"]["catch"]["adam"]["returns"][str(steps)]["constant"],
                               evaluator.returns("adam", keys, [lr])[0], rtol=1e-6)


def test_result_records_the_whole_grid_and_its_picks(headroom):
    args, result = headroom
    record = result["tasks"]["catch"]["adam"]
    for steps in args.horizons:
        grid = record["val_mean"][str(steps)]
        assert [(c["lr"], c["tau"]) for c in grid] == [(1e-2, None), (1e-2, 4.0), (3e-2, None), (3e-2, 4.0)]
        assert all(np.isfinite(c["mean"]) for c in grid)
        assert all(len(r) == args.eval_seeds for r in record["returns"][str(steps)].values())
    assert record["picked"]["constant"]["tau"] is None


def test_a_rerun_is_served_from_the_cache(headroom, tmp_path, monkeypatch):
    args, result = headroom
    monkeypatch.setattr(sh, "make_sweep", lambda *a, **k: pytest.fail("recomputed a cached sweep"))
    again = dataclasses.replace(args, out=str(tmp_path / "again.json"))
    sh.main(again, AGENT)
    with open(again.out) as f:
        assert json.load(f)["tasks"] == result["tasks"]


@pytest.mark.parametrize("flags, named", [
    (dict(optimizers=("rmsprop",)), "--optimizers rmsprop: unknown; choose from adam, sign_sgd"),
    (dict(tasks=("big_maze",)), "--tasks big_maze: unknown"),
    (dict(taus=(0.0,)), "--lrs and --taus must be positive"),
    (dict(horizons=(5,)), "--horizons: each must allow one update (10 env steps)"),
])
def test_bad_input_is_a_one_line_error(flags, named, tmp_path, capsys):
    args = dataclasses.replace(TINY, out=str(tmp_path / "out.json"), cache_dir=str(tmp_path / "cache"), **flags)
    with pytest.raises(SystemExit) as exit_info:
        sh.run_cli(sh.main, args, AGENT)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err
    assert not os.path.exists(args.out) and not os.path.exists(args.cache_dir)
