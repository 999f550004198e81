"""benchmarks/meta_gradient_signal.py: the split-half statistic on known gradients, its per-agent meta-gradients
against train_lopt.py's meta-step, a tiny end-to-end run and bad input."""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import jax
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import train_lopt as tl

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import meta_gradient_signal as mgs  # noqa: E402

BASE = dataclasses.replace(tl.Args(), env_group="catch", num_envs=1, rollout_steps=4, inner_updates=2, hidden_size=8,
                           reset_interval=4)
TINY = mgs.Args(tasks=("catch",), objectives=("default",), num_agents=4, sizes=(2, 4), warmup_steps=2,
                measure_steps=2, splits=4)


def test_split_half_cosine_is_one_for_agreement_zero_for_noise_and_follows_signal_to_noise():
    rng = np.random.default_rng(0)
    same = np.tile(rng.normal(size=(1, 1, 50)), (2, 16, 1))
    np.testing.assert_allclose(mgs.split_half_cosines(same, 16, 8, rng), 1.0, rtol=1e-9)
    noise = rng.normal(size=(2, 16, 20_000))
    assert abs(mgs.split_half_cosines(noise, 16, 8, rng).mean()) < 0.02
    # mean + independent noise: r = s2 / |mu|^2 = 8 per agent and task; two tasks average to r = 4 per agent
    # (each half holds m agents of each task), so halves of m = 4 agree at cos 1 / (1 + 4 / 4) = 0.5
    mu = rng.normal(size=4000)
    mu *= 1 / np.linalg.norm(mu)
    grads = mu + rng.normal(size=(2, 8, 4000)) * np.sqrt(8 / 4000)
    cos = mgs.split_half_cosines(grads, 8, 64, rng).mean()
    assert cos == pytest.approx(0.5, abs=0.05)
    # ... and the population for 0.9 between halves is then 2 * 4 * 0.9 / 0.1 = 72 agents per task
    assert mgs.agents_for(0.5, 4, 0.9) == pytest.approx(72.0)
    assert mgs.agents_for(-0.1, 4, 0.9) is None  # no agreement: no population is enough


def test_per_agent_meta_gradients_average_to_the_meta_steps():
    """The mean of the per-agent meta-gradients is train_lopt's population meta-gradient for the same agents,
    keys and meta-step (a reset step included), and the population moves on the same way."""
    args = dataclasses.replace(BASE, num_agents=4)  # the tiny run's agents, so it reads these programs from disk
    meta = tl.make_meta_train(args, ("catch",))
    task, key = meta.tasks[0], jax.random.PRNGKey(3)
    init, forward, with_grads = mgs.make_per_agent(args, task, meta.net)
    lopt_params = tl.initial_lopt_params(args)
    population = init(lopt_params, jax.random.PRNGKey(0))
    population_meta_grad = jax.jit(lambda *inputs: meta.population_meta_grad(*inputs[:1], task, *inputs[1:]))
    (_, (expected_population, *_)), expected = population_meta_grad(lopt_params, population, key, 1)
    grads, moved = with_grads(lopt_params, population, key, 1)
    np.testing.assert_allclose(np.asarray(grads).mean(0), ravel_pytree(expected)[0], rtol=2e-4, atol=1e-7)
    for a, b in zip(jax.tree.leaves(moved), jax.tree.leaves(expected_population)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(forward(lopt_params, population, key, 1)), jax.tree.leaves(moved)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_tiny_run_writes_its_cosines(tmp_path):
    args = dataclasses.replace(TINY, out=str(tmp_path / "signal.json"))
    mgs.main(args, BASE)
    result = json.load(open(args.out))["objectives"]["default"]
    assert set(result["split_half_cosine"]) == {"2", "4"}
    assert all(-1 <= c["mean"] <= 1 for c in result["split_half_cosine"].values())
    assert result["parameters"] > 0 and result["warmup_steps"] == 2


@pytest.mark.parametrize("flags, named", [
    (dict(objectives=("es",)), "--objectives es: unknown; choose from default, paper, eval_batch"),
    (dict(tasks=("big_maze",)), "--tasks big_maze: unknown"),
    (dict(sizes=(3,)), "--sizes 3: each must be even"),
    (dict(sizes=(8,)), "at most --num-agents 4"),
    (dict(along=True, along_steps=(0,)), "--along-steps > 0 (got 0)"),
    (dict(along=True, along_seeds=1), "--along-seeds >= 2 (got 1)"),
    (dict(lopt_path="nowhere.msgpack"), "nowhere.msgpack"),
])
def test_bad_input_is_a_one_line_error(flags, named, tmp_path, capsys):
    args = dataclasses.replace(TINY, out=str(tmp_path / "out.json"), **flags)
    with pytest.raises(SystemExit) as exit_info:
        mgs.run_cli(mgs.main, args, BASE)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert named in err and "\n" not in err
    assert not os.path.exists(args.out)


def test_tiny_run_against_pes_writes_its_cosines(tmp_path):
    """--against-pes: the truncated meta-gradient against PES's, measured on a paired population at fixed
    parameters; cosines are finite and in [-1, 1]."""
    args = dataclasses.replace(TINY, out=str(tmp_path / "pes.json"), against_pes=True, measure_steps=4)
    mgs.main(args, BASE)
    result = json.load(open(args.out))["objectives"]["default"]
    cosines = [result["cosine_truncated_pes"], *result["even_odd_cosine"].values()]
    assert all(np.isfinite(c) and -1 <= c <= 1 for c in cosines), result
    assert result["measure_steps"] == 4 and result["num_agents"] == 4


def test_tiny_run_against_es_writes_its_cosines(tmp_path):
    """--against-es at a tiny budget (one round of 8 pairs, 2 agents, short lifetimes): finite cosines in [-1, 1]."""
    args = dataclasses.replace(TINY, out=str(tmp_path / "es.json"), against_es=True, measure_steps=2, es_pairs=8,
                               es_seeds=2, es_steps=160)
    mgs.main(args, dataclasses.replace(BASE, eval_envs=2))
    result = json.load(open(args.out))["objectives"]["default"]
    cosines = [result["cosine_truncated_descent_es_ascent"], result["es_split_half_cosine"]]
    assert all(np.isfinite(c) and -1 <= c <= 1 for c in cosines), result
    assert result["es_pairs"] == 8


def test_along_directions_recovers_a_known_gradient_and_its_cosine():
    """On a linear objective J = 10 + g.theta with per-seed noise that is the same for every member (common random
    numbers), the rise along a unit direction d is step g.d / 10 exactly, and the cosine read off random directions
    is, for many of them, about the true one and not above it."""
    rng = np.random.default_rng(0)
    dim, seeds = 64, 16
    gradient = rng.normal(size=dim)
    seed_noise = rng.normal(size=seeds)

    def evaluate(members):
        return {"task": 10.0 + (members @ gradient)[:, None] + seed_noise[None, :]}  # [members, seeds]

    flat = np.zeros(dim)
    d = gradient / np.linalg.norm(gradient) + rng.normal(size=dim) * 0.1
    d /= np.linalg.norm(d)
    randoms = rng.normal(size=(256, dim))
    directions = {"d": d, **{f"random {i}": u / np.linalg.norm(u) for i, u in enumerate(randoms)}}
    baseline = {t: r[0] for t, r in evaluate(flat[None]).items()}
    rises = mgs.along_directions(evaluate, flat, directions, 0.5, baseline)
    expected = 0.5 * gradient @ d / np.abs(np.mean(baseline["task"]))
    assert rises["d"]["rise"] == pytest.approx(expected, rel=1e-9)
    assert rises["d"]["stderr"] < 1e-9 and rises["d"]["interval"][0] == pytest.approx(expected, rel=1e-6)
    random_rises = [r for n, r in rises.items() if n != "d"]
    estimate = mgs.implied_cosine(rises["d"]["rise"], random_rises, dim)
    true = mgs.cosine(d, gradient)
    assert 0.8 * true < estimate <= 1.0 and estimate < 1.2 * true
    assert mgs.implied_cosine(rises["d"]["rise"], random_rises[:1], dim) is None  # one control says nothing


def test_rise_along_spreads_with_seed_noise_and_its_interval_covers_it():
    """Noise that differs between the two members (no common random numbers) widens the interval by the
    standard error it implies; the interval covers the true rise."""
    rng = np.random.default_rng(1)
    plus = {"a": 1.1 + rng.normal(size=400) * 0.1, "b": 2.2 + rng.normal(size=400) * 0.2}
    minus = {"a": 0.9 + rng.normal(size=400) * 0.1, "b": 1.8 + rng.normal(size=400) * 0.2}
    at = {"a": np.ones(400), "b": 2 * np.ones(400)}
    r = mgs.rise_along(plus, minus, at)
    assert r["rise"] == pytest.approx(0.1, abs=3 * r["stderr"])
    # each task's half-difference has variance 0.005 (a: 2 x 0.1^2 / 2^2; b: 2 x 0.2^2 / 4^2); two tasks averaged
    assert r["stderr"] == pytest.approx(np.sqrt(2 * 0.005 / 400) / 2, rel=0.15)
    assert r["interval"][0] < 0.1 < r["interval"][1]


def test_tiny_run_along_writes_its_rises(tmp_path):
    """--along at a tiny budget: finite rises for both own directions and every random one, at each step length,
    and objectives with the same validation settings share theta's and the random directions' evaluations."""
    args = dataclasses.replace(TINY, out=str(tmp_path / "along.json"), objectives=("default", "paper"), along=True,
                               measure_steps=2, along_seeds=2, along_steps=(10, 30), random_directions=2,
                               es_steps=160)
    mgs.main(args, dataclasses.replace(BASE, eval_envs=2))
    results = json.load(open(args.out))["objectives"]
    for result in results.values():
        for at in result["by_meta_steps"].values():
            rises = [at["truncated descent"], at["meta-Adam's first step"], *at["random"]]
            assert len(rises) == 4 and all(np.isfinite(r["rise"]) and np.isfinite(r["stderr"]) for r in rises)
    assert results["default"]["by_meta_steps"]["10"]["random"] == results["paper"]["by_meta_steps"]["10"]["random"]
    assert results["default"]["by_meta_steps"]["30"]["step_length"] == pytest.approx(
        3 * results["default"]["by_meta_steps"]["10"]["step_length"])
