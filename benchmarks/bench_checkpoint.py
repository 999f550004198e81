"""How much checkpointing slows meta-training: the meta-step rate with a save after every meta-step, against none.

    python benchmarks/bench_checkpoint.py                       # small_dense_long, 128 agents, a save every step
    python benchmarks/bench_checkpoint.py --env-group gridworld --num-agents 16

Four ways are timed in alternation in one process, `--repeats` blocks of `--steps` meta-steps each (after a
compiled warm-up), and their median seconds per meta-step reported:
- none: no checkpoint;
- ours: train_lopt's Checkpointer (optimizer.msgpack at once; the train state copied to the host and written in
  numpy's .npy format by a background thread);
- orbax: the train state saved asynchronously by orbax's CheckpointManager (what the Checkpointer first used);
- msgpack: the whole train state serialised by flax and written before the next meta-step (train_lopt before).
Asynchronous ways include the wait for their last write inside the block. The ratios to `none` are the figures
that count: the machine is shared and noisy, absolute times are not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import jax
import numpy as np
import orbax.checkpoint as ocp  # installed with flax; only this benchmark uses it
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import ENV_GROUPS, run_cli, save_msgpack  # noqa: E402


@dataclass
class BenchArgs:
    env_group: str = "small_dense_long"
    num_agents: int = 128
    num_envs: int = 1
    """environment streams per agent (as in the paper preset)"""
    steps: int = 5
    """meta-steps per timed block, each followed by a save (except in `none`)"""
    repeats: int = 3


def main(bench: BenchArgs) -> None:
    if bench.env_group not in ENV_GROUPS:
        raise SystemExit(f"error: --env-group {bench.env_group!r}: choose from {', '.join(ENV_GROUPS)}")
    folder = tempfile.mkdtemp(prefix="bench_checkpoint_")
    args = dataclasses.replace(tl.Args(), env_group=bench.env_group, num_agents=bench.num_agents,
                               num_envs=bench.num_envs, out_dir=folder)
    meta = tl.make_meta_train(args, ENV_GROUPS[bench.env_group])
    state = meta.init(jax.random.PRNGKey(0))
    init_params = jax.device_get(state.lopt_params)
    state, _ = meta.meta_step(state)
    jax.block_until_ready(state)
    state_mb = sum(x.nbytes for x in jax.tree.leaves(state)) / 2**20
    print(f"{bench.env_group}, {bench.num_agents} agents/task: train state {state_mb:,.1f} MiB; "
          f"{bench.repeats} blocks of {bench.steps} meta-steps per way, alternating", flush=True)
    stack = contextlib.ExitStack()  # closed last: waits for the last writes, then removes the folder
    stack.callback(shutil.rmtree, folder, ignore_errors=True)
    checkpointer = stack.enter_context(tl.Checkpointer(os.path.join(folder, "ours"), args))
    manager = ocp.CheckpointManager(os.path.join(folder, "orbax"), options=ocp.CheckpointManagerOptions(
        max_to_keep=1, enable_async_checkpointing=True, create=True))
    stack.callback(manager.close)

    def save_orbax(state):
        manager.save(int(state.meta_step), args=ocp.args.StandardSave(state))

    def save_whole_msgpack(state):
        save_msgpack(os.path.join(folder, "msgpack", "train_state.msgpack"), {"state": state, "bad_steps": 0})

    ways = {"none": (None, None), "ours": (lambda s: checkpointer.save(s, init_params, 0), checkpointer.wait),
            "orbax": (save_orbax, manager.wait_until_finished), "msgpack": (save_whole_msgpack, None)}
    times = {name: [] for name in ways}
    with stack:
        for _ in range(bench.repeats):
            for name, (save, wait) in ways.items():
                start = time.perf_counter()
                for _ in range(bench.steps):
                    state, metrics = meta.meta_step(state)
                    jax.device_get(metrics)  # what the training loop waits for before it saves
                    if save:
                        save(state)
                if wait:
                    wait()
                jax.block_until_ready(state)
                times[name].append((time.perf_counter() - start) / bench.steps)
                print(f"  {name:<8} {times[name][-1]:.3f} s/meta-step", flush=True)
    base = np.median(times["none"])
    print(f"{'way':<8} {'s/meta-step (median)':>22} {'rate vs none':>14}")
    for name, t in times.items():
        print(f"{name:<8} {np.median(t):>22.3f} {base / np.median(t):>14.3f}")


if __name__ == "__main__":
    run_cli(lambda: main(tyro.cli(BenchArgs, description=__doc__.split("\n")[0])))
