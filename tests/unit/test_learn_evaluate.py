from click.testing import CliRunner

from rtim.cli import main
from rtim.learn.evaluate import format_summary, run, summarise


def test_rtim_learns_the_market_better_than_random_and_than_any_single_offer():
    result = run(seed=11, decisions=4000)
    assert result.random / result.oracle < 0.25
    assert result.context_free / result.oracle < 0.7
    # (4,000 decisions: the start, while the offers are still being tried; the best
    # single offer per half is chosen knowing the whole run)
    assert result.rtim > 3 * result.random
    assert result.rtim > 1.3 * result.context_free
    # it learns: the last thousand decisions are better than the first
    assert result.curve[-1] > result.curve[0] + 0.2
    # and the responses went through the join: examples, some positive, duplicates refused
    assert result.examples > 3000 and result.positives > 300
    assert result.joins["duplicate"] > 0 and result.joins["unknown"] > 0


def test_the_same_seed_gives_the_same_numbers():
    assert run(seed=5, decisions=600).as_dict() == run(seed=5, decisions=600).as_dict()


def test_rtim_evaluate_prints_the_comparison():
    out = CliRunner().invoke(main, ["evaluate", "-n", "1000", "--seeds", "1,2"])
    assert out.exit_code == 0, out.output
    assert "RTIM, share of the oracle" in out.output
    assert "new offer takes, last quarter" in out.output


def test_a_run_too_short_for_a_curve_says_so():
    text = format_summary(summarise([run(seed=1, decisions=400)]))
    assert "RTIM/oracle per 1,000: (a run of fewer than 1,000)" in text
    longer = format_summary(summarise([run(seed=1, decisions=2000)]))
    assert len(longer.split("RTIM/oracle per 1,000: ")[1].splitlines()[0].split()) == 2
