"""``rtim evaluate --worker``: the simulated market through a real worker on an embedded broker."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from rtim.cli import main
from rtim.learn import evaluate


def test_the_market_goes_through_a_real_worker_which_learns_it(tmp_path: Path) -> None:
    # 1,200 decisions: six waves, enough for the models to show what they learned.
    report = tmp_path / "report.json"
    out = CliRunner().invoke(
        main, ["evaluate", "--worker", "-n", "1200", "--seeds", "1", "--json", str(report)]
    )
    assert out.exit_code == 0, out.output
    assert "RTIM, share of the oracle" in out.output
    assert "seed 1: through the worker in" in out.output
    summary = json.loads(report.read_text())
    [run] = summary["runs"]
    assert run["decisions"] == 1200 and run["decisions_per_s"] > 0 and run["wall_s"] > 0
    # The same moments as offline: random and context-free, as shares of the oracle, do
    # not depend on who decides.
    offline = evaluate.run(1, 1200).as_dict()
    for measure in ("random_share_of_oracle", "context_free_share_of_oracle"):
        assert run[measure] == offline[measure]
    assert 0 < run["rtim_share_of_oracle"] < 1
    # The worker's models learned from its own training examples: RTIM gets well over
    # twice random's value (2.4-2.6 on this seed; about 1.55 with models that never learn).
    assert run["rtim_vs_random"] > 2.0
    # The responses went through the worker's join: joined, repeated, unknown, and the
    # closed decisions written as examples.
    joins = run["joins"]
    assert joins["joined"] > 100 and joins["duplicate"] > 0 and joins["unknown"] > 0
    assert joins["positive"] > 30 and run["examples"] > 500
