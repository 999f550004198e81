"""Cost of one meta-step under each --meta-grad estimator, measured side by side in one process.

    python benchmarks/bench_meta_grad.py                       # train_lopt.py's defaults: the small grids, 8 agents
    python benchmarks/bench_meta_grad.py --num-agents 32

Both meta-steps (truncated: backward through the K inner updates; pes: forward only) are built from the same
train_lopt.Args, compiled, and then called in alternation `--repeats` times each; the medians and their ratio are
printed. Alternation keeps the ratio meaningful on a shared, noisy machine; the absolute times are not.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from dataclasses import dataclass

import jax
import numpy as np
import tyro

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import train_lopt as tl  # noqa: E402
from common import run_cli  # noqa: E402


@dataclass
class BenchArgs:
    num_agents: int = tl.Args.num_agents
    num_envs: int = tl.Args.num_envs
    repeats: int = 5


def main(bench: BenchArgs) -> None:
    args = dataclasses.replace(tl.Args(), num_agents=bench.num_agents, num_envs=bench.num_envs)
    tasks = tl.meta_task_names(args, tl.ENV_GROUPS[args.env_group])
    steps, states, times = {}, {}, {}
    for estimator in ("truncated", "pes"):
        meta = tl.make_meta_train(dataclasses.replace(args, meta_grad=estimator), tasks)
        start = time.time()
        state, _ = meta.meta_step(meta.init(jax.random.PRNGKey(0)))  # compiles
        jax.block_until_ready(state)
        print(f"{estimator}: compiled and ran one meta-step in {time.time() - start:.0f}s", flush=True)
        steps[estimator], states[estimator], times[estimator] = meta.meta_step, state, []
    for _ in range(bench.repeats):
        for estimator, meta_step in steps.items():
            start = time.time()
            states[estimator], _ = meta_step(states[estimator])
            jax.block_until_ready(states[estimator])
            times[estimator].append(time.time() - start)
    median = {k: float(np.median(v)) for k, v in times.items()}
    print(f"{', '.join(tasks)}; {args.num_agents} agents/task x {args.num_envs} envs, K = {args.inner_updates}")
    for estimator, seconds in median.items():
        print(f"{estimator:<10} {seconds * 1e3:8.0f} ms per meta-step (median of {bench.repeats})")
    print(f"pes / truncated: {median['pes'] / median['truncated']:.2f}x the time per meta-step")


if __name__ == "__main__":
    run_cli(main, tyro.cli(BenchArgs))
