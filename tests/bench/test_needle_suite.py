"""The needle suite (scaling_bench/needle_suite.py) in --quick mode on the tiny model: the pooling
adds up, the pairing counts what it says, and the files are written. Accuracy is not asserted
(random weights)."""

import json

import pytest

from scaling_bench.harness import needle_suite


@pytest.fixture(scope="module")
def suite(tmp_path_factory):
    out = tmp_path_factory.mktemp("suite")
    assert needle_suite.main(["--quick", "--budgets", "0.1", "--out", str(out)]) == 0
    return out, json.loads((out / "needle_suite.json").read_text())


def test_pooled_counts_are_the_streams_summed(suite):
    out, res = suite
    assert (out / "needle_suite.png").stat().st_size > 1000 and (out / "needle_suite.md").exists()
    assert [s["name"] for s in res["streams"]] == [sp.name for sp in needle_suite.QUICK]
    for method, budgets in res["pooled"].items():
        for b, t in budgets.items():
            per = [res["runs"][s["name"]]["methods"][method][b] for s in res["streams"]]
            assert t["questions"] == sum(p["questions"] for p in per) == 6
            assert t["correct"] == sum(p["correct"] for p in per)
            assert sum(k["questions"] for k in t["by_kind"].values()) == t["questions"]
            assert t["hidden"]["questions"] == 3  # one of the two quick streams is hidden
            lo, hi = t["accuracy_ci95"]
            assert lo <= t["accuracy"] <= hi
    assert set(res["goal"]) == {"0.1"} and "within_2pt_of_full" in res["goal"]["0.1"]
    for name in ("bunny-q", "city-q"):
        assert (out / "needle_suite" / name / "needle.json").exists()


def test_pairing_counts_only_the_discordant_questions():
    run = {"methods": {"cluster": {"budgets": {"0.1": {"per_question": [{"correct": c} for c in (1, 1, 0, 0, 1)]}}},
                       "token": {"budgets": {"0.1": {"per_question": [{"correct": c} for c in (1, 0, 1, 0, 0)]}}}}}
    got = needle_suite.paired({"a": run, "b": run}, "cluster", "token", "0.1")
    assert got["only_cluster"] == 4 and got["only_token"] == 2 and 0 < got["p_mcnemar"] <= 1


def test_unknown_stream_is_refused():
    with pytest.raises(SystemExit):
        needle_suite.main(["--quick", "--streams", "nope"])
