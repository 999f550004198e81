"""The README's and docs' results tables are what results/table.py makes of the committed result files."""

from __future__ import annotations

import json
import math
import os
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "results"))

import table  # noqa: E402  (results/table.py)


def test_every_listed_result_file_is_committed():
    for name in [*table.FILES, *table.SEED_FILES]:
        assert os.path.isfile(os.path.join(table.HERE, name)), name


@pytest.mark.parametrize("name", [f for f in table.BRAX_FILES if os.path.exists(os.path.join(table.HERE, f))])
def test_brax_files_store_what_their_seeds_give(name):
    """A Brax summary's IQM and interval are those of its per-seed final returns, with 8 or more seeds per run."""
    for run in table.load_brax(name)["optimizers"].values():
        assert len(run["final_returns"]) >= 8
        np.testing.assert_allclose(run["final_return_iqm_ci"], run["recomputed_iqm_ci"], rtol=1e-9)


@pytest.mark.parametrize("document", table.DOCUMENTS)
def test_document_tables_are_regenerated_from_the_result_files(document):
    """Every <!-- table:NAME --> block equals what `python results/table.py --write` would write there."""
    with open(os.path.join(REPO, document)) as f:
        text = f.read()
    found = table.blocks(text)
    assert found, f"{document} has no generated table"
    prefix = "../" * document.count(os.sep)
    regenerated = table.blocks(table.rewrite(text, table.tables(), prefix))
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
