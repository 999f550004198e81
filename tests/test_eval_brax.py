"""Tests for eval_brax.py: a tiny PPO comparison of Adam and a learned optimizer writes its outputs, the
evaluation schedule, presets, progress lines, flag checks and the command line's one-line errors.

Compilation dominates, so there is one tiny end-to-end run (Brax's trivial `fast` environment, both
optimizers in one invocation) shared by the output tests, and the error paths run as subprocesses in
parallel; they fail before anything is compiled. The tiny run's budget (2 PPO updates) is smaller than its
--num-evals (3), the shape of a small-budget run that used to end in ZeroDivisionError.
"""

from __future__ import annotations

import contextlib
import csv
import io
import itertools
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

import eval_brax as eb
import script_cases
import train_lopt
from common import UserError, save_msgpack

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One PPO update: 4 x 2 segments of 5 steps = 40 env steps, and 10 epochs x 2 minibatches = 20 gradient steps.
TINY_PPO = ["--env", "fast", "--total-timesteps", "80", "--num-seeds", "2", "--num-envs", "4", "--batch-size", "4",
            "--num-minibatches", "2", "--unroll-length", "5", "--num-updates-per-batch", "10", "--episode-length",
            "20", "--num-evals", "3", "--num-eval-envs", "2"]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """Adam and the shipped learned optimizer (a train_lopt.py checkpoint) in one tiny comparison."""
    out_dir = tmp_path_factory.mktemp("brax")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # progress lines come from JAX callbacks; they print here too
        eb.main(eb.parse_args([*TINY_PPO, "--optimizers", "adam", "lopt",
                               "--lopt-path", train_lopt.PRETRAINED_OPTIMIZER,
                               "--out-dir", str(out_dir), "--run-name", "tiny"]))
    (out_dir / "stdout.txt").write_text(stdout.getvalue())
    return out_dir / "tiny"


def test_small_budget_evaluates_after_each_update(tiny_run):
    """2 updates for --num-evals 3: a note, then one progress line per evaluation, each with a rate and an ETA."""
    stdout = (tiny_run.parent / "stdout.txt").read_text()
    assert "note: 2 PPO updates in --total-timesteps 80, fewer than --num-evals 3" in stdout
    for name in ("adam", "lopt"):
        lines = [line for line in stdout.splitlines() if line.startswith(f"[{name}] ") and "eval return" in line]
        assert [line.split()[1] for line in lines] == ["0/80", "40/80", "80/80"]
        assert all("env steps/s" in line and "ETA" in line for line in lines[1:])


def test_returns_csv(tiny_run):
    """One row per optimizer, seed and evaluation; env steps from 0 to the budget; finite returns."""
    with open(tiny_run / "returns.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["optimizer", "seed", "env_steps", "eval_return"]
    for name in ("adam", "lopt"):
        for seed in ("0", "1"):
            mine = [r for r in rows if r["optimizer"] == name and r["seed"] == seed]
            assert [int(r["env_steps"]) for r in mine] == [0, 40, 80]
            assert all(np.isfinite(float(r["eval_return"])) for r in mine)


def test_summary_and_plot(tiny_run):
    summary = json.loads((tiny_run / "summary.json").read_text())
    for s in summary["optimizers"].values():  # IQM with its interval, over the seeds' final returns
        iqm, low, high = s["final_return_iqm_ci"]
        assert low <= iqm <= high and min(s["final_returns"]) <= iqm <= max(s["final_returns"])
        assert s["learning_rate"] > 0
    assert set(summary["optimizers"]) == {"adam", "lopt"}
    for s in summary["optimizers"].values():
        assert len(s["final_returns"]) == 2
        assert np.isclose(s["final_return_mean"], np.mean(s["final_returns"]))
        assert s["wall_time_s"] > 0 and s["env_steps_per_s"] > 0
        # Training is timed apart from the evaluations. Here an evaluation is 2 envs x 20 steps and a period
        # one update of 20 gradient steps, so training takes most of the time; a callback that fired early
        # would say otherwise.
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
    # Fewer updates than evaluations: one evaluation after each update, none repeating the one before.
    updates, steps = eb.eval_schedule(eb.parse_args([*TINY_PPO, "--num-evals", "10"]))
    assert list(updates) == [0, 1, 1] and list(steps) == [0, 40, 80]


@pytest.mark.parametrize("clock", ["frozen", "ticking"])
def test_progress_lines_never_divide_by_zero(monkeypatch, capsys, clock):
    """The original crash: no training time measured yet (frozen clock) or no env steps yet (an evaluation
    right after the first) printed a rate or ETA by dividing by zero. Now such values print '?'."""
    ticks = itertools.count(1000.0) if clock == "ticking" else itertools.repeat(1000.0)
    monkeypatch.setattr(eb, "time", SimpleNamespace(time=lambda: next(ticks)))  # one tick per reading
    progress = eb.ProgressPrinter("adam", np.array([0, 0, 40]), num_seeds=2)
    for index in range(3):
        progress.trained(index)
        progress(index, np.array([1.0, 3.0]))
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and all("eval return 2.0 +- 1.0" in line for line in lines)
    assert "ETA ?" in lines[1]  # no env steps yet: no rate to extrapolate from
    if clock == "frozen":
        assert all("? env steps/s (? without evaluation)" in line for line in lines[1:])
    else:
        # 2 seeds x 40 steps over 4 ticks since the first evaluation, 2 of which were training.
        assert "| 20 env steps/s (40 without evaluation)" in lines[2] and "ETA 0s" in lines[2]


def test_summary_table_without_measured_time():
    """summary.json stores no rate (null) where no time was measured; the table prints '?' for it."""
    assert eb.steps_per_second(100, 0.0) is None and eb.steps_per_second(100, 4.0) == 25
    table = eb.format_summary_table({"adam": dict(final_return_mean=1.0, final_return_std=0.5, wall_time_s=0.0,
                                                  final_return_iqm_ci=[1.0, 0.5, 1.5], env_steps_per_s=None,
                                                  train_env_steps_per_s=None)})
    assert table.splitlines()[1].split()[-2:] == ["?", "?"]


# Careless values, each rejected by check_settings before anything is built: (flags, start of the message).
BAD_SETTINGS = [
    (["--num-seeds", "0"], "--num-seeds 0: must be a finite number > 0"),
    (["--num-envs", "-4"], "--num-envs -4: must be a finite number > 0"),
    (["--batch-size", "0"], "--batch-size 0: must be"),
    (["--num-minibatches", "0"], "--num-minibatches 0: must be"),
    (["--unroll-length", "0"], "--unroll-length 0: must be"),
    (["--num-updates-per-batch", "0"], "--num-updates-per-batch 0: must be"),
    (["--num-evals", "0"], "--num-evals 0: must be"),
    (["--num-eval-envs", "0"], "--num-eval-envs 0: must be"),
    (["--episode-length", "-10"], "--episode-length -10: must be"),
    (["--action-repeat", "0"], "--action-repeat 0: must be"),
    (["--total-timesteps", "-5"], "--total-timesteps -5: must be a finite number > 0"),
    (["--total-timesteps", "1"], "--total-timesteps 1: must be at least 40, one PPO update"),
    (["--learning-rates", "nan"], "--learning-rates nan: give one or more finite numbers > 0"),
    (["--learning-rates", "1e-3", "-1e-3"], "--learning-rates 0.001 -0.001: give one or more"),
    (["--learning-rates"], "--learning-rates : give one or more"),
    (["--lopt-lr", "inf"], "--lopt-lr inf: must be"),
    (["--grad-clip", "-1"], "--grad-clip -1.0: must be a finite number >= 0"),
    (["--max-grad-norm", "0"], "--max-grad-norm 0.0: must be a finite number > 0"),
    (["--max-grad-norm", "nan"], "--max-grad-norm nan: must be"),
    (["--reward-scaling", "0"], "--reward-scaling 0.0: must be"),
    (["--clipping-epsilon", "-0.3"], "--clipping-epsilon -0.3: must be"),
    (["--entropy-cost", "-0.01"], "--entropy-cost -0.01: must be a finite number >= 0"),
    (["--value-coef", "nan"], "--value-coef nan: must be"),
    (["--discounting", "1.5"], "--discounting 1.5: must be in [0, 1]"),
    (["--gae-lambda", "nan"], "--gae-lambda nan: must be in [0, 1]"),
    (["--seed", "-1"], "--seed -1: must be an integer in [0, 4294967295]"),
    (["--num-envs", "3"], "--num-envs 3: must divide --batch-size x --num-minibatches (8)"),
    (["--action-repeat", "3"], "--episode-length 20: must be a multiple of --action-repeat (3)"),
    (["--optimizers"], "--optimizers: give at least one"),
]


@pytest.mark.parametrize("flags, message", BAD_SETTINGS, ids=[" ".join(flags) for flags, _ in BAD_SETTINGS])
def test_bad_settings_are_rejected(flags, message):
    with pytest.raises(UserError) as error:
        eb.check_settings(eb.parse_args([*TINY_PPO, *flags]))
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_edge_settings_that_are_allowed():
    """Bounds that make sense: no discounting of the future, GAE as one-step TD, no clip before the lopt."""
    eb.check_settings(eb.parse_args([*TINY_PPO, "--discounting", "1", "--gae-lambda", "0", "--grad-clip", "0",
                                     "--entropy-cost", "0", "--total-timesteps", "40", "--max-grad-norm", "None"]))


@pytest.mark.parametrize("path, problem", [("checkpoints", "is a directory"), ("README.md", "cannot read")])
def test_unusable_lopt_path_names_the_flag(path, problem):
    """A folder or a foreign file as --lopt-path: a UserError naming the flag, while the checkpoint loads
    (before the environment is built or anything compiles)."""
    with pytest.raises(UserError, match=f"^--lopt-path: .*{problem}"):
        eb.make_optimizers(eb.parse_args([*TINY_PPO, "--lopt-path", os.path.join(REPO, path)]))


def test_learning_rate_sweep_and_symmetric_clips():
    """Every hand-designed optimizer runs at each --learning-rates value; adam, rmsprop, sgd and lopt get the same
    element-wise clip (a gradient of 100 steps like one of 1), adam_brax gets Brax's own setting (none)."""
    args = eb.parse_args([*TINY_PPO, "--optimizers", "adam", "adam_brax", "lopt", "--learning-rates", "1e-3", "1e-4"])
    runs = eb.make_optimizers(args)
    assert list(runs) == ["adam@1e-03", "adam@1e-04", "adam_brax@1e-03", "adam_brax@1e-04", "lopt"]
    assert [lr for lr, _ in runs.values()] == [1e-3, 1e-4, 1e-3, 1e-4, args.lopt_lr]
    params = {"w": jnp.zeros(2)}

    def two_steps(tx, first):  # the second step remembers the first gradient through Adam's moments
        state = tx.init(params)
        _, state = tx.update({"w": jnp.asarray(first)}, state, params)
        return tx.update({"w": jnp.ones(2)}, state, params)[0]["w"]

    for name in ("adam@1e-03", "lopt"):  # clipped at 1: a first gradient of 100 acts like one of 1
        tx = runs[name][1]
        np.testing.assert_allclose(two_steps(tx, [100.0, 1.0]), two_steps(tx, [1.0, 1.0]), rtol=1e-6)
    brax_adam = runs["adam_brax@1e-03"][1]  # Brax's setting: no element-wise clip, so the 100 is remembered
    assert not np.allclose(two_steps(brax_adam, [100.0, 1.0]), two_steps(brax_adam, [1.0, 1.0]), rtol=1e-3)
    sgd = eb.make_optimizers(eb.parse_args([*TINY_PPO, "--optimizers", "sgd", "--learning-rates", "0.1"]))["sgd"][1]
    np.testing.assert_allclose(sgd.update({"w": jnp.array([100.0, -0.5])}, sgd.init(params))[0]["w"], [-0.1, 0.05],
                               rtol=1e-6)  # clip, then the lr; one learning rate: the run is named by the optimizer


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
    # Under a regular file: fails even as root; checked before the environment is built.
    "bad_out_dir": (["--optimizers", "adam", "--out-dir", "README.md/sub"], "--out-dir README.md/sub"),
}


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Every error case as `python eval_brax.py ...` (tests/script_cases.py: one process for all of them); each fails
    before compiling anything."""
    folder = tmp_path_factory.mktemp("cli")
    paths = {"corrupt": str(folder / "corrupt.msgpack"), "foreign": str(folder / "foreign.msgpack")}
    with open(paths["corrupt"], "wb") as f:
        f.write(b"\xc1\xc1 this is not msgpack")
    save_msgpack(paths["foreign"], {"weights": np.zeros(3)})  # readable, but not an optimizer checkpoint
    cases = {}
    for name, (argv, _) in CLI_CASES.items():
        argv = [a.format(**paths) for a in argv] + ["--env", "fast"] * ("--env" not in argv)
        cases[name] = argv + ["--out-dir", str(folder)] * ("--out-dir" not in argv)
    return script_cases.run("eval_brax.py", cases), paths


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_cli_errors_are_one_line(cli, case):
    """Exit status 2, one stderr line starting with 'error:' that names the culprit, no traceback."""
    results, paths = cli
    proc, named = results[case], CLI_CASES[case][1].format(**paths)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and named in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout


def test_unknown_env_lists_brax_environments(cli):
    assert "inverted_double_pendulum" in cli[0]["unknown_env"].stderr and "ant" in cli[0]["unknown_env"].stderr


# ------------------------------------------------------------------------------------------------
# --protocol: the lr picked on selection seeds, reported on others, every run saved and reused
# ------------------------------------------------------------------------------------------------

PEAK_LR = {"adam": 3e-3, "sign_sgd": 1e-4, "lopt": 3e-4, "open": 1e-3, "adam_brax": 3e-4}  # adam's: beyond the grid


def synthetic_runs(calls: list, fail_after: int | None = None):
    """run_optimizer's stand-in: a final return that peaks at PEAK_LR[optimizer] (in log lr), the same on every
    seed, so the picks are known; it records what it was asked to run. PPO itself is tested by tiny_run above."""

    def run_optimizer(name, args, env, optimizer, keys):
        if fail_after is not None and len(calls) == fail_after:
            raise KeyboardInterrupt  # a protocol killed mid-way
        calls.append((name, np.asarray(keys)))
        optimizer_name, lr = name.split()[1].split("@")
        final = -abs(np.log10(float(lr)) - np.log10(PEAK_LR[optimizer_name]))
        evaluations = len(eb.eval_schedule(args)[1])
        returns = np.linspace(-1.0, final, evaluations)[:, None] * np.ones(len(keys))
        return returns, {"final_returns": list(returns[-1]), "wall_time_s": 0.0}

    return run_optimizer


def protocol_argv(results_dir, *flags):
    return ["--protocol", "--protocol-tasks", "fast", "--selection-seeds", "3", "--num-seeds", "2",
            "--results-dir", str(results_dir), *TINY_PPO[2:], *flags]


@pytest.fixture
def fast_task(monkeypatch):
    monkeypatch.setitem(eb.PROTOCOL_BACKENDS, "fast", "positional")


def test_protocol_picks_on_selection_seeds_and_reports_on_others(tmp_path, monkeypatch, fast_task):
    calls = []
    monkeypatch.setattr(eb, "run_optimizer", synthetic_runs(calls))
    eb.cli(protocol_argv(tmp_path))
    protocol = json.loads((tmp_path / "fast" / "protocol.json").read_text())
    # adam's peak (3e-3) is past the grid's top: the grid grows there (1e-3 x 10/3) and stops once it brackets it
    assert protocol["picked_lr"] == {"adam": 3.33e-3, "sign_sgd": 1e-4, "lopt": 3e-4, "open": 1e-3}
    assert list(protocol["selection_mean_final_return"]["adam"]) == ["1.00e-04", "3.00e-04", "1.00e-03", "3.33e-03",
                                                                      "1.11e-02"]
    assert protocol["reported"] == {"adam": "adam@3.33e-03_reported.json", "sign_sgd": "sign_sgd@1.00e-04_reported.json",
                                    "lopt": "lopt@3.00e-04_reported.json",
                                    "open": "open@1.00e-03_reported.json",
                                    "lopt_paper_lr": "lopt@3.00e-04_reported.json",
                                    "adam_brax": "adam_brax@3.00e-04_reported.json"}
    selection = [k for name, k in calls if name.endswith("selection")]
    reported = [k for name, k in calls if name.endswith("reported")]
    assert all(len(k) == 3 for k in selection) and all(len(k) == 2 for k in reported)
    assert all(np.array_equal(k, selection[0]) for k in selection) and all(np.array_equal(k, reported[0]) for k in reported)
    assert not set(map(bytes, selection[0])) & set(map(bytes, reported[0]))  # no lr is picked on a reported seed
    np.testing.assert_array_equal(reported[0], jax_random_split(0, 2))  # the reported seeds are a plain run's
    run = json.loads((tmp_path / "fast" / "adam@3.33e-03_reported.json").read_text())
    assert np.array(run["returns"]).shape == (2, len(run["env_steps"]))  # [seed, evaluation], for the curves
    assert run["lopt_path"] is None and protocol["lopt_path"] == "checkpoints/optim4rl_gridworld.msgpack"
    # selection: adam's grid grew twice upwards, sign-SGD's once downwards (its best, 1e-4, was the bottom edge),
    # OPEN's once upwards (1e-3, the top edge); then the five distinct reported runs
    assert len(calls) == 5 + 4 + 3 + 4 + 5


def jax_random_split(seed, n):
    import jax

    return np.asarray(jax.random.split(jax.random.PRNGKey(seed), n))


def test_protocol_resumes_from_its_saved_runs(tmp_path, monkeypatch, fast_task):
    """Killed after 4 runs, a rerun trains only what is missing; a third run trains nothing; a new checkpoint
    retrains the learned optimizer's runs alone."""
    calls = []
    monkeypatch.setattr(eb, "run_optimizer", synthetic_runs(calls, fail_after=4))
    with pytest.raises(KeyboardInterrupt):
        eb.cli(protocol_argv(tmp_path))
    assert len(list((tmp_path / "fast").glob("*.json"))) == 4 and not (tmp_path / "fast" / "protocol.json").exists()
    monkeypatch.setattr(eb, "run_optimizer", synthetic_runs(calls))
    eb.cli(protocol_argv(tmp_path))
    assert len(calls) == 21 and len({name for name, _ in calls}) == 21  # nothing ran twice
    first = (tmp_path / "fast" / "protocol.json").read_text()
    eb.cli(protocol_argv(tmp_path))
    assert len(calls) == 21 and (tmp_path / "fast" / "protocol.json").read_text() == first
    other = tmp_path / "other.msgpack"  # the same optimizer, another file content: its runs are not reused
    checkpoint = train_lopt.load_msgpack(train_lopt.PRETRAINED_OPTIMIZER)
    checkpoint["meta_step"] = checkpoint.get("meta_step", 0) + 1
    save_msgpack(str(other), checkpoint)
    eb.cli(protocol_argv(tmp_path, "--lopt-path", str(other)))
    assert {name.split()[1].split("@")[0] for name, _ in calls[21:]} == {"lopt"} and len(calls) == 21 + 4
    # ... into files of its own (lopt-<sha256[:8]>@...), beside the baselines' runs it shares: nothing is overwritten
    tag = eb.file_sha256(str(other))[:8]
    assert (tmp_path / "fast" / "protocol.json").read_text() == first
    other_protocol = json.loads((tmp_path / "fast" / f"protocol-{tag}.json").read_text())
    assert other_protocol["reported"]["lopt"].startswith(f"lopt-{tag}@")
    assert other_protocol["reported"]["adam"] == json.loads(first)["reported"]["adam"]
    assert len(list((tmp_path / "fast").glob(f"lopt-{tag}@*.json"))) == 4


# Bad --protocol input, each rejected before any run (in-process: the one-line CLI form is tested above)
PROTOCOL_ERRORS = {
    "unknown task": (["--protocol-tasks", "hopper", "pong"], "--protocol-tasks pong: unknown; choose from "
                                                             "inverted_double_pendulum, hopper, reacher, ant, "
                                                             "pendulum"),
    "--env": (["--env", "hopper"], "--env: not with --protocol; choose tasks with --protocol-tasks"),
    "no update": (["--protocol-tasks", "reacher", "--total-timesteps", "100"], "--total-timesteps 100: must be at least"),
    "no selection seed": (["--selection-seeds", "0"], "--selection-seeds 0: must be"),
    "not an optimizer": (["--lopt-path", os.path.join(REPO, "README.md")], "--lopt-path: "),
    "unwritable": (["--results-dir", os.path.join(REPO, "README.md", "sub")], "--results-dir "),
}


@pytest.mark.parametrize("case", list(PROTOCOL_ERRORS))
def test_protocol_bad_input_names_the_problem_and_writes_nothing(case, tmp_path):
    flags, message = PROTOCOL_ERRORS[case]
    argv = ["--protocol", *flags] + ["--results-dir", str(tmp_path / "results")] * ("--results-dir" not in flags)
    with pytest.raises(UserError) as error:
        eb.cli(argv)
    assert str(error.value).startswith(message) and "\n" not in str(error.value), str(error.value)
    assert not (tmp_path / "results").exists() or not os.listdir(tmp_path / "results")


@pytest.mark.parametrize("task", list(eb.GYMNAX_TASKS))
def test_gymnax_task_steps_as_gymnax_does_and_brax_wrappers_end_its_episodes(task):
    """The validation family's adapter: one step is gymnax's step_env with the tanh policy's [-1, 1] mapped onto the
    task's action bounds; Brax's training wrappers end each episode at --episode-length and reset it."""
    import gymnax
    import jax
    from brax import envs

    env = envs.get_environment(task, backend="positional")
    inner, params = gymnax.make(eb.GYMNAX_TASKS[task])
    state = env.reset(jax.random.PRNGKey(1))
    obs, expected_state = inner.reset_env(jax.random.PRNGKey(1), params)
    np.testing.assert_allclose(state.obs, obs)
    high = inner.action_space(params).high
    for action in (-1.0, 0.5):
        stepped = env.step(state, jnp.full((env.action_size,), action))
        obs, _, reward, done, _ = inner.step_env(jax.random.PRNGKey(0), expected_state,
                                                 jnp.full((env.action_size,), action * high), params)
        np.testing.assert_allclose(stepped.obs, obs, rtol=1e-6)
        np.testing.assert_allclose(stepped.reward, reward, rtol=1e-6)
        assert stepped.done == done
    wrapped = envs.training.wrap(env, episode_length=3, action_repeat=1)
    state = wrapped.reset(jax.random.split(jax.random.PRNGKey(0), 2))
    first_obs = state.obs
    step = jax.jit(wrapped.step)
    for t in range(3):
        state = step(state, jnp.zeros((2, env.action_size)))
        assert np.all(np.asarray(state.done) == (t == 2)) and np.all(np.asarray(state.info["truncation"]) == (t == 2))
    np.testing.assert_allclose(state.obs, first_obs)  # auto-reset to the episode's first state
