"""Tests for eval_brax.py: a tiny PPO comparison of Adam and a learned optimizer writes its outputs, the
evaluation schedule, presets, and the command line's one-line errors.

Compilation dominates, so there is one tiny end-to-end run (Brax's trivial `fast` environment, both
optimizers in one invocation) shared by the output tests, and the error paths run as subprocesses in
parallel; they fail before anything is compiled.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest

import eval_brax as eb
import train_lopt
from common import save_msgpack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_PPO = ["--env", "fast", "--total-timesteps", "400", "--num-seeds", "2", "--num-envs", "4", "--batch-size", "4",
            "--num-minibatches", "2", "--unroll-length", "5", "--num-updates-per-batch", "2", "--episode-length",
            "20", "--num-evals", "2", "--num-eval-envs", "2"]


@pytest.fixture(scope="module")
def lopt_checkpoint(tmp_path_factory) -> str:
    """optimizer.msgpack from a one-meta-step train_lopt.py run on catch (meta-training only, no evaluation)."""
    folder = str(tmp_path_factory.mktemp("lopt"))
    args = train_lopt.parse_args(["--env-group", "catch", "--num-agents", "2", "--num-envs", "1", "--rollout-steps",
                                  "4", "--inner-updates", "2", "--meta-steps", "1", "--out-dir", folder])
    train_lopt.meta_train(args, ("catch",), folder)
    return os.path.join(folder, "optimizer.msgpack")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, lopt_checkpoint):
    out_dir = tmp_path_factory.mktemp("brax")
    eb.main(eb.parse_args([*TINY_PPO, "--optimizers", "adam", "lopt", "--lopt-path", lopt_checkpoint,
                           "--out-dir", str(out_dir), "--run-name", "tiny"]))
    return out_dir / "tiny"


def test_returns_csv(tiny_run):
    """One row per optimizer, seed and evaluation; env steps from 0 to the budget; finite returns."""
    with open(tiny_run / "returns.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["optimizer", "seed", "env_steps", "eval_return"]
    steps = eb.eval_schedule(eb.parse_args(TINY_PPO))[1]
    for name in ("adam", "lopt"):
        for seed in ("0", "1"):
            mine = [r for r in rows if r["optimizer"] == name and r["seed"] == seed]
            assert [int(r["env_steps"]) for r in mine] == list(steps)
            assert all(np.isfinite(float(r["eval_return"])) for r in mine)
    assert steps[0] == 0 and steps[-1] >= 400


def test_summary_and_plot(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    assert set(summary["optimizers"]) == {"adam", "lopt"}
    for s in summary["optimizers"].values():
        assert len(s["final_returns"]) == 2
        assert np.isclose(s["final_return_mean"], np.mean(s["final_returns"]))
        assert s["wall_time_s"] > 0 and s["env_steps_per_s"] > 0
        # Training is timed apart from the evaluations. Here an evaluation is 2 envs x 20 steps and a period
        # 20 gradient steps, so training takes most of the time; a callback that fired early would say otherwise.
        assert 0 < s["eval_s"] < s["train_s"] and s["train_env_steps_per_s"] > s["env_steps_per_s"]
    assert (tiny_run / "returns.png").stat().st_size > 1000


def test_same_seeds_for_every_optimizer(tiny_run):
    """Both optimizers start from the same initial policies: identical evaluations before training."""
    with open(tiny_run / "returns.csv") as f:
        first = {(r["optimizer"], r["seed"]): r["eval_return"] for r in csv.DictReader(f) if r["env_steps"] == "0"}
    assert first[("adam", "0")] == first[("lopt", "0")] and first[("adam", "1")] == first[("lopt", "1")]


def test_eval_schedule_spreads_updates():
    """7 updates over 3 evaluations after the initial one: no updates before evaluation 0, then 2-3 each."""
    args = eb.parse_args(["--env", "fast", "--num-evals", "3", "--num-envs", "4", "--batch-size", "4",
                          "--num-minibatches", "2", "--unroll-length", "5", "--total-timesteps", "280"])
    updates, steps = eb.eval_schedule(args)
    assert list(updates) == [0, 2, 3, 2] and list(steps) == [0, 80, 200, 280]


def test_presets_and_overrides():
    reacher = eb.parse_args(["--env", "reacher"])
    assert (reacher.action_repeat, reacher.unroll_length, reacher.discounting) == (4, 20, 0.95)
    ant_paper = eb.parse_args(["--env=ant", "--preset", "paper", "--num-envs", "64"])
    assert (ant_paper.num_envs, ant_paper.batch_size, ant_paper.num_minibatches) == (64, 2048, 32)


CLI_CASES = {
    "unknown_env": (["--env", "nope"], "nope"),
    "missing_ckpt": (["--lopt-path", "/nonexistent/optimizer.msgpack"], "/nonexistent/optimizer.msgpack"),
    "corrupt_ckpt": (["--lopt-path", "{corrupt}"], "{corrupt}"),
    "foreign_ckpt": (["--lopt-path", "{foreign}"], "{foreign}"),
    "bad_batch": (["--optimizers", "adam", "--num-envs", "3"], "--num-envs"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every error case as `python eval_brax.py ...`, run at once; each fails before compiling anything."""
    folder = tmp_path_factory.mktemp("cli")
    paths = {"corrupt": str(folder / "corrupt.msgpack"), "foreign": str(folder / "foreign.msgpack")}
    with open(paths["corrupt"], "wb") as f:
        f.write(b"\xc1\xc1 this is not msgpack")
    save_msgpack(paths["foreign"], {"weights": np.zeros(3)})  # readable, but not an optimizer checkpoint
    env = dict(os.environ, COLUMNS="200", JAX_PLATFORMS="cpu")
    procs = {}
    for name, (argv, _) in CLI_CASES.items():
        argv = [a.format(**paths) for a in argv] + ["--env", "fast"] * ("--env" not in argv) + ["--out-dir", str(folder)]
        procs[name] = subprocess.Popen([sys.executable, "eval_brax.py", *argv], cwd=REPO, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    results = {}
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=120)
        results[name] = SimpleNamespace(returncode=proc.returncode, stdout=stdout, stderr=stderr)
    return results, paths


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_errors_are_one_line(cli, case):
    """Non-zero exit, one stderr line starting with 'error:' that names the culprit, no traceback."""
    results, paths = cli
    proc, named = results[case], CLI_CASES[case][1].format(**paths)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_unknown_env_lists_brax_environments(cli):
    assert "inverted_double_pendulum" in cli[0]["unknown_env"].stderr and "ant" in cli[0]["unknown_env"].stderr
