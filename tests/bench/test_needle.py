"""The needle harness (scaling_bench/needle.py) in --quick mode on the tiny model.

Random-init weights answer at random, so accuracy is not asserted here; the structure, the metrics'
ranges and the harness's replay shortcut are.
"""

import json

import pytest

from scaling_bench.harness import needle
from mosaic_ray.config import EngineConfig
from mosaic_ray.engine.interface import AskRequest
from mosaic_ray.engine.stream_engine import StreamEngine
from mosaic_ray.model.registry import load_model

BUDGETS = ("0.05", "0.1", "0.2")
METHODS = ("full", "frame", "token", "cluster", "oracle", "near-needle")
NEEDLES = 3  # --quick


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("needle")
    assert needle.main(["--model", "tiny", "--quick", "--out", str(out)]) == 0
    return out, json.loads((out / "needle.json").read_text())


def test_writes_json_png_and_table(quick_run):
    out, res = quick_run
    assert (out / "needle.png").stat().st_size > 1000
    table = (out / "needle.md").read_text()
    assert "| method | budget | accuracy (95 % Wilson interval) |" in table and "| cluster | 5% |" in table
    lo, hi = res["methods"]["cluster"]["budgets"]["0.05"]["accuracy_ci95"]
    assert 0.0 <= lo <= res["methods"]["cluster"]["budgets"]["0.05"]["accuracy"] <= hi <= 1.0
    assert res["schema"] == needle.SCHEMA and res["settings"]["quick"] is True
    assert res["model"] == "tiny" and res["weights"] == "random-init"


def test_stream_puts_needles_in_the_past(quick_run):
    _, res = quick_run
    st = res["stream"]
    assert st["frames"] == res["settings"]["frames"] and len(st["needles"]) == NEEDLES
    assert st["past_tokens"] > res["settings"]["window"]
    for nd in st["needles"]:
        lo, hi = nd["tokens"]
        assert res["settings"]["sink"] <= lo < hi
        assert nd["in_past"] == (hi <= res["settings"]["sink"] + st["past_tokens"])
    assert st["needles"][0]["in_past"]  # the oldest needle left the window before the questions
    times = [nd["time_s"] for nd in st["needles"]]
    assert times == sorted(times) and len(set(times)) == NEEDLES


def test_methods_budgets_and_metrics(quick_run):
    _, res = quick_run
    methods = res["methods"]
    assert list(methods) == list(METHODS)
    assert list(methods["full"]["budgets"]) == list(methods["near-needle"]["budgets"]) == ["all"]
    for name in ("frame", "token", "cluster", "oracle"):
        assert list(methods[name]["budgets"]) == list(BUDGETS)
    for name, m in methods.items():
        for b, a in m["budgets"].items():
            assert a["questions"] == NEEDLES and len(a["per_question"]) == NEEDLES
            assert a["correct"] == sum(q["correct"] for q in a["per_question"])
            assert sum(k["questions"] for k in a["by_kind"].values()) == NEEDLES
            assert a["accuracy"] == pytest.approx(a["correct"] / NEEDLES)
            for q in a["per_question"]:
                assert isinstance(q["answer"], str) and isinstance(q["correct"], bool)
                assert 0.0 <= q["needle_recall"] <= 1.0 + 1e-6
                assert 0.0 <= q["fill"] <= 1.0 + 1e-6, (name, b, q["fill"])  # never more than the budget
                if name in ("full", "near-needle"):  # the whole past (near-needle: around the needle) is there
                    assert q["needle_recall"] == pytest.approx(1.0) and q["copies"] == 0
                else:
                    assert q["copies"] > 0 and q["budget_tokens"] < q["past_tokens"]
    makeup = methods["cluster"]["makeup"]
    assert makeup["clusters_per_head_mean"] > 1 and len(makeup["per_needle"]) == NEEDLES
    assert 0.0 <= makeup["needle_cluster_text_share_mean"] <= 1.0
    assert set(res["goal"]) == set(BUDGETS)


@pytest.fixture(scope="module")
def tiny_adapter():
    return load_model("tiny", "cpu")


def test_replayed_stream_answers_like_a_direct_ingest(tiny_adapter):
    """The harness ingests once and replays the cache calls per method: the stream (and so the
    answer) must be what an engine of that method builds by ingesting the stream itself."""
    s = needle.parse_args(["--model", "tiny", "--quick", "--frames", "12", "--out", "unused"])
    frames, _ = needle.load_frames(s)
    events = needle.plan_stream(frames, s)
    rec = needle.record_stream(tiny_adapter, events, s, log=lambda *_: None)
    request = AskRequest(needle.NEEDLE_SETS[0][0].question, max_tokens=4)
    for method in ("cluster", "frame", "token"):
        config = needle.Variant(method, method).cache_config(s.sink, s.window, 1 << 20, 0.1)
        config = config.model_copy(update={"pool": config.pool.model_copy(update={"capacity_bytes": 64 << 20})})
        replayed = StreamEngine(EngineConfig(model="tiny", device="cpu", cache=config), adapter=tiny_adapter)
        needle.install(replayed, "s", config, rec)
        direct = StreamEngine(EngineConfig(model="tiny", device="cpu", cache=config), adapter=tiny_adapter)
        direct.open_stream("s")
        for ev in events:
            if ev.frames is not None:
                direct.append_frames("s", ev.frames, ev.ts)
            else:
                direct.append_text("s", ev.text, ev.ts[0])
        # later budgets restore a snapshot of the replayed stream
        restored = StreamEngine(EngineConfig(model="tiny", device="cpu", cache=config), adapter=tiny_adapter)
        needle.install(restored, "s", config, snapshot=replayed.export_stream("s"))
        a, b = replayed.stream_info("s"), direct.stream_info("s")
        assert {k: a[k] for k in ("tokens", "past_tokens", "frames", "texts", "duration_s", "kv_bytes_host")} == \
               {k: b[k] for k in ("tokens", "past_tokens", "frames", "texts", "duration_s", "kv_bytes_host")}
        expected = direct.answer("s", request).token_ids
        assert replayed.answer("s", request).token_ids == expected, method
        assert restored.answer("s", request).token_ids == expected, method


def test_independent_questions_start_from_the_ingested_stream(tmp_path, quick_run):
    _, sequential = quick_run
    assert needle.main(["--model", "tiny", "--quick", "--independent", "--budgets", "0.1", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "needle.json").read_text())
    for name in ("full", "cluster"):
        b = "all" if name == "full" else "0.1"
        past = [q["past_tokens"] for q in res["methods"][name]["budgets"][b]["per_question"]]
        assert len(set(past)) == 1, past  # every question sees the stream as ingested
        grown = [q["past_tokens"] for q in sequential["methods"][name]["budgets"][b]["per_question"]]
        assert grown[0] == past[0] and grown[-1] > grown[0]  # sequential: earlier Q/As joined the stream


def test_answers_are_judged_by_whole_words_and_order_needles_by_their_decoy():
    by_kind = {n.kind: n for n in needle.NEEDLE_SETS[0]}
    count, order = by_kind["count"], by_kind["order"]
    assert count.judge("Seven.") and count.judge("7 kites") and not count.judge("17")
    assert order.judge("A fox.") and not order.judge("goat") and not order.judge("the fox and the goat")
    assert needle.NEEDLE_SETS[0][0].judge("PEACH.") and not needle.NEEDLE_SETS[0][0].judge("peaches")


def test_an_order_needle_has_its_decoy_before_its_cue_and_its_cue_right_before_it():
    s = needle.parse_args(["--model", "tiny", "--needle-set", "1", "--frames", "60", "--out", "unused"])
    frames = [(i * 0.5, None) for i in range(60)]
    texts = [ev.text for ev in needle.plan_stream(frames, s) if ev.text is not None]
    for nd in needle.NEEDLE_SETS[1]:
        assert texts.count(nd.fact) == 1
        if nd.kind == "order":
            i = texts.index(nd.fact)
            assert texts[i - 1] == nd.cue and texts.index(nd.decoy) < i - 1
    answers = [nd.answer for nd in needle.NEEDLE_SETS[1]]
    for nd in needle.NEEDLE_SETS[1]:  # an answer appears in its own fact only
        others = [t for t in texts if t != nd.fact]
        assert not any(nd.judge(t) for t in others), nd.answer
    assert len(set(answers)) == len(answers)
