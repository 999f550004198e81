"""The README's and docs' results tables are what results/table.py makes of the committed result files."""

from __future__ import annotations

import hashlib
import json
import math
import re
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "results"))

import table  # noqa: E402  (results/table.py)


def test_every_listed_result_file_is_committed():
    for name in [*table.FILES, *table.SEED_FILES, *table.ENVS_32_FILES, *table.ENVS_32_1E6_FILES, *table.ALIGNED_FILES,
                 *table.BRAX_FILES]:
        assert os.path.isfile(os.path.join(table.HERE, name)), name


@pytest.mark.parametrize("name", [f for f in table.BRAX_FILES if os.path.exists(os.path.join(table.HERE, f))])
def test_brax_files_store_what_their_seeds_give(name):
    """A Brax summary's IQM and interval are those of its per-seed final returns, with 8 or more seeds per run."""
    for run in table.load_brax(name)["optimizers"].values():
        assert len(run["final_returns"]) >= 8
        np.testing.assert_allclose(run["final_return_iqm_ci"], run["recomputed_iqm_ci"], rtol=1e-9)


@pytest.fixture(scope="module")
def regenerated_tables():
    return table.tables()  # every document's tables: built once per worker, not once per document


@pytest.mark.parametrize("document", table.DOCUMENTS)
def test_document_tables_are_regenerated_from_the_result_files(document, regenerated_tables):
    """Every <!-- table:NAME --> block equals what `python results/table.py --write` would write there."""
    with open(os.path.join(REPO, document)) as f:
        text = f.read()
    found = table.blocks(text)
    assert found, f"{document} has no generated table"
    prefix = "../" * document.count(os.sep)
    regenerated = table.blocks(table.rewrite(text, regenerated_tables, prefix))
    for name, body in found.items():
        assert body == regenerated[name], f"{document}: table {name} differs from results/table.py's; run it --write"


@pytest.mark.parametrize("name", list(table.FILES))
def test_stored_statistics_match_the_per_seed_returns(name):
    """The IQM and intervals a result file stores are those its per-seed returns give (nothing edited by hand),
    with 16 or more seeds per task and optimizer."""
    with open(os.path.join(table.HERE, name)) as f:
        stored = json.load(f)
    summary = table.load(name)["summary"]
    for task, result in stored["tasks"].items():
        assert all(len(v) >= 16 for v in result["returns"].values())
        for optimizer, stat in result["normalized_iqm_ci"].items():
            np.testing.assert_allclose(stat, summary["per_task"][task][optimizer], rtol=1e-9)
    for optimizer, stat in stored["aggregate"]["normalized_iqm_ci"].items():
        np.testing.assert_allclose(stat, summary["aggregate"][optimizer], rtol=1e-9)
    assert stored["aggregate"]["tasks"] == summary["informative_tasks"]
    assert all(math.isfinite(x) for x in summary["aggregate"]["adam"])


# /tmp/x, /work/y/z.msgpack; not a/b, not URLs, not a system program such as /usr/bin/time (the same everywhere)
ABSOLUTE_PATH = re.compile(r"(?<![\w.:/~-])/(?!usr/)(?:[\w.-]+/)+[\w.-]*")


def committed_strings(path: str) -> list[str]:
    """The text a committed file records: a msgpack checkpoint's strings, or a text file's contents."""
    if path.endswith(".msgpack"):
        from common import load_msgpack

        found = []

        def walk(node):
            if isinstance(node, dict):
                for value in node.values():
                    walk(value)
            elif isinstance(node, str):
                found.append(node)

        walk(load_msgpack(path))
        return found
    if path.endswith((".json", ".csv", ".log", ".md", ".txt")):
        with open(path) as f:
            return [f.read()]
    return []


def test_the_absolute_path_pattern():
    assert ABSOLUTE_PATH.search('"lopt_path": "/work/frozen3/checkpoints/optim4rl_gridworld.msgpack"')
    assert ABSOLUTE_PATH.search("--out-dir /tmp/bare --seed 0")
    assert not ABSOLUTE_PATH.search("/usr/bin/time: Elapsed (wall clock) time")
    for harmless in ("checkpoints/optim4rl_gridworld.msgpack", "1e5 / 1e6", "https://github.com/sail-sg/optim4rl",
                     "env steps/s", "small_dense_long/small_dense_short"):
        assert not ABSOLUTE_PATH.search(harmless), harmless


@pytest.mark.parametrize("folder", ["results", "checkpoints"])
def test_committed_evidence_names_no_absolute_path(folder):
    """Result and checkpoint files record paths relative to the repository (common.recorded), never the machine
    or scratch folder they were made in."""
    root = os.path.join(REPO, folder)
    files = [os.path.join(d, f) for d, _, names in os.walk(root) for f in names]
    assert files
    for path in files:
        for text in committed_strings(path):
            match = ABSOLUTE_PATH.search(text)
            assert match is None, f"{os.path.relpath(path, REPO)} records {match.group(0)}"


@pytest.mark.parametrize("task", sorted(table.load_protocol()))
def test_brax_protocol_files_hold_what_the_protocol_says(task):
    """A finished task of `eval_brax.py --protocol`: every lr it swept has its selection run, whose mean is the one
    recorded; the picked lr is the best of them; every reported run has 8 or more seeds, their curves start from
    the same untrained policy and run to the budget; the learned optimizer is the checkpoint recorded."""
    folder = os.path.join(table.HERE, "brax", task)
    protocol = table.load_protocol()[task]
    for name, sweep in protocol["selection_mean_final_return"].items():
        for lr, mean in sweep.items():
            with open(os.path.join(folder, f"{name}@{lr}_selection.json")) as f:
                run = json.load(f)
            assert run["fingerprint"]["seeds"] == "selection" and len(run["final_returns"]) == protocol["selection_seeds"]
            assert np.mean(run["final_returns"]) == pytest.approx(mean, rel=1e-12)
        assert f"{protocol['picked_lr'][name]:.2e}" == max(sweep, key=sweep.get)
    initial = None
    for label, run in protocol["runs"].items():
        assert run["fingerprint"]["seeds"] == "reported" and run["returns"].shape[0] >= 8
        assert run["env_steps"][0] == 0 and run["env_steps"][-1] == protocol["env_steps_per_seed"]
        np.testing.assert_array_equal(run["returns"][:, -1], run["final_returns"])
        initial = run["returns"][:, 0] if initial is None else initial
        # The same seeds: the same networks. Not bit for bit: hopper's contacts amplify the float rounding that differs
        # between compiled programs (6e-4 measured), while two different seeds' untrained returns differ by more than 1e-2.
        np.testing.assert_allclose(run["returns"][:, 0], initial, rtol=1e-2)
    with open(os.path.join(REPO, protocol["lopt_path"]), "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == protocol["lopt_sha256"]
