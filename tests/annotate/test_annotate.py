"""llmft annotate: candidates files, the append-only annotations file (resume, torn lines, duplicates, another
candidates file), exports by hand, agreement / position bias / win rates, and the page's API over real HTTP."""

from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request

import pytest

from llmft.annotate import export as X
from llmft.annotate.items import from_generations, read_items
from llmft.annotate.server import App, check_binding, make_server
from llmft.annotate.store import Store, shown_order
from llmft.errors import ConfigError, DataError
from tests.helpers.cli import assert_one_line_error, llmft

ITEMS = [
    {"id": "a", "prompt": "Name a colour.", "candidates": ["Blue.", "Red.", "A colour."], "constraints": []},
    {"id": "b", "prompt": [{"role": "user", "content": "Say hi."}], "candidates": ["Hi!", {"text": "Hello."}]},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def items(tmp_path):
    return read_items(write_jsonl(tmp_path / "cands.jsonl", ITEMS))


def test_candidates_from_generate_outputs(tmp_path):
    rows = [{"prompt": "p1", "constraints": [1]}, {"prompt": "p2"}, {"prompt": "p3"}]
    sft = write_jsonl(tmp_path / "sft.jsonl", [r | {"response": t, "finished": True} for r, t in
                                               zip(rows, ["x", "same", "y"], strict=True)])
    dpo = write_jsonl(tmp_path / "dpo.jsonl", [r | {"response": t, "finished": True} for r, t in
                                               zip(rows, ["z", "same", "y2"], strict=True)])
    items = from_generations([str(sft), str(dpo)], tmp_path / "c.jsonl")
    assert [it.id for it in items.items] == ["1", "3"]  # p2: both answered alike, nothing to compare
    first = items.items[0]
    assert [(c.text, c.sources) for c in first.candidates] == [("x", ["sft"]), ("z", ["dpo"])]
    assert first.row == {"constraints": [1]}  # the prompts file's other columns travel along
    write_jsonl(dpo, [r | {"response": "q"} for r in reversed(rows)])
    with pytest.raises(DataError, match=r"dpo.jsonl:1: its prompt differs"):
        from_generations([str(sft), str(dpo)], tmp_path / "c.jsonl")


def test_malformed_candidates_name_the_line(tmp_path):
    for row, message in [({"prompt": "p", "candidates": ["one"]}, "at least 2 answers"),
                         ({"candidates": ["a", "b"]}, "needs a 'prompt'"),
                         ({"prompt": "p", "candidates": ["a", 3]}, r"candidates\[1\] must be a string")]:
        with pytest.raises(DataError, match=rf"c.jsonl:2: .*{message}"):
            read_items(write_jsonl(tmp_path / "c.jsonl", [ITEMS[0], row]))


def test_judgements_are_appended_at_once_and_a_restart_continues(items, tmp_path):
    path = tmp_path / "ann.jsonl"
    store = Store(path, items, writable=True)
    store.append("ann", "a", "rate", {"candidate": 0, "rating": 5})
    line = json.loads(path.read_text().splitlines()[0])  # on disk before append returns
    assert line["schema"] == 1 and line["candidates"] == items.fingerprint and line["shown"] == shown_order("ann",
                                                                                                         items.items[0])
    store.append("ann", "a", "done", {})
    store.close()
    again = Store(path, items)  # a restart: the person continues at item b
    assert again.finished("ann") == {"a"} and again.finished("bob") == set()
    assert sorted(shown_order("ann", items.items[0])) == [0, 1, 2]
    assert shown_order("ann", items.items[0]) == shown_order("ann", items.items[0])  # same order on every visit


def test_a_revision_replaces_and_a_torn_last_line_is_dropped(items, tmp_path):
    path = tmp_path / "ann.jsonl"
    store = Store(path, items, writable=True)
    store.append("ann", "a", "rate", {"candidate": 0, "rating": 2})
    store.append("ann", "a", "rate", {"candidate": 0, "rating": 4})
    store.close()
    with open(path, "a") as f:
        f.write('{"schema": 1, "candidates": "')  # killed mid-write: never confirmed to the page
    torn = path.read_text()
    reader = Store(path, items)  # export / report: skips it, changes nothing (it may be a line being written)
    assert [j.line["rating"] for j in reader.current()] == [4] and path.read_text() == torn
    again = Store(path, items, writable=True)  # the server, restarted: drops it
    again.append("ann", "a", "rate", {"candidate": 1, "rating": 1})
    assert len(path.read_text().splitlines()) == 3 and all(json.loads(x) for x in path.read_text().splitlines())
    with pytest.raises(DataError, match="being written by another"):
        Store(path, items, writable=True)  # one writer per file
    again.close()


def test_a_last_line_without_its_newline_is_kept_and_closed(items, tmp_path):
    path = tmp_path / "ann.jsonl"
    store = Store(path, items, writable=True)
    store.append("ann", "a", "rate", {"candidate": 0, "rating": 2})
    store.close()
    path.write_text(path.read_text().rstrip("\n"))  # whole, but for its newline
    again = Store(path, items, writable=True)
    again.append("ann", "a", "rate", {"candidate": 1, "rating": 5})
    assert [j.where.rsplit(":", 1)[1] for j in again.judgements] == ["1", "2"]
    assert [json.loads(x)["rating"] for x in path.read_text().splitlines()] == [2, 5]
    again.close()


@pytest.mark.parametrize("change, message", [
    (lambda ln: ln | {"candidates": "0" * 16}, "made on another candidates file"),
    (lambda ln: ln | {"item": "zz"}, "item 'zz' is not in"),
    (lambda ln: ln | {"rating": 9}, "'rating' must be a whole number 1-5"),
    (lambda ln: ln | {"schema": 7}, "annotation schema 7"),
    (lambda ln: {"item": "a"}, "an annotation needs schema"),
    (lambda ln: ln | {"shown": []}, "'shown' must list each of the 3 candidates"),
    (lambda ln: ln | {"candidate": True}, "'candidate' must be a candidate index"),
])
def test_bad_annotation_lines_name_file_and_line(items, tmp_path, change, message):
    path = tmp_path / "ann.jsonl"
    writer = Store(path, items, writable=True)
    writer.append("ann", "a", "rate", {"candidate": 0, "rating": 3})
    writer.close()
    good = json.loads(path.read_text())
    path.write_text(json.dumps(good) + "\n" + json.dumps(change(good)) + "\n")
    with pytest.raises(DataError, match=rf"ann.jsonl:2: {message}"):
        Store(path, items)


def test_a_duplicate_judgement_and_bad_judgements_are_refused(items, tmp_path):
    path = tmp_path / "ann.jsonl"
    writer = Store(path, items, writable=True)
    writer.append("ann", "a", "pick", {"best": 1, "worst": 2})
    writer.close()
    path.write_text(path.read_text() * 2)  # the same file appended twice
    with pytest.raises(DataError, match=r"ann.jsonl:2: duplicate judgement \(the same as .*ann.jsonl:1\)"):
        Store(path, items)
    store = Store(tmp_path / "other.jsonl", items, writable=True)
    for action, fields, message in [("pick", {"best": 1, "worst": 1}, "must differ"),
                                    ("rank", {"order": [0, 0, 1]}, "each of the 3 candidates once"),
                                    ("rank", {"order": 5}, "each of the 3 candidates once"),
                                    ("rate", {"candidate": 0, "rating": True}, "whole number 1-5"),
                                    ("edit", {"candidate": 0, "text": " Blue. "}, "leaves the answer as it was"),
                                    ("compare", {"winner": 0}, "exactly 2 candidates"),
                                    ("frown", {}, "unknown action")]:
        with pytest.raises(DataError, match=message):
            store.append("ann", "a", action, fields)
    assert not (tmp_path / "other.jsonl").exists()  # nothing written for a refused judgement


def judged(items, tmp_path):
    """Two people on item a (shown order aside): ann ranks 1 > 0 > 2 and rates 0: 2, 1: 5; bob picks best 1, worst 0
    and rates 0: 4, 1: 4, 2: 1; ann edits answer 2 of item a; on item b ann rates 0: 5, 1: 1."""
    store = Store(tmp_path / "ann.jsonl", items, writable=True)
    for who, item, action, fields in [
        ("ann", "a", "rank", {"order": [1, 0, 2]}), ("ann", "a", "rate", {"candidate": 0, "rating": 2}),
        ("ann", "a", "rate", {"candidate": 1, "rating": 5}), ("bob", "a", "pick", {"best": 1, "worst": 0}),
        ("bob", "a", "rate", {"candidate": 0, "rating": 4}), ("bob", "a", "rate", {"candidate": 1, "rating": 4}),
        ("bob", "a", "rate", {"candidate": 2, "rating": 1}), ("ann", "a", "edit", {"candidate": 2, "text": "Green."}),
        ("ann", "b", "rate", {"candidate": 0, "rating": 5}), ("ann", "b", "rate", {"candidate": 1, "rating": 1}),
    ]:
        store.append(who, item, action, fields)
    store.close()
    return store


def test_exports_by_hand(items, tmp_path):
    store = judged(items, tmp_path)
    found = {v.item.id: v for v in X.verdicts(store)}
    a = found["a"]
    # votes on a: (0,1): ann 1≻0, bob 1≻0 → 1 ≻ 0; (0,2): ann 0≻2, bob 2≻0 (worst was 0) → a draw; (1,2): both 1≻2
    assert a.prefer(0, 1, 1.0) == (1, 0, None) and a.prefer(1, 2, 1.0) == (1, 2, None)
    # the draw falls to ratings: 0 → (2 + 4) / 2 = 3, 2 → 1: gap 2 ≥ 1, margin 2
    assert a.prefer(0, 2, 1.0) == (0, 2, 2.0) and a.order(1.0) == [1, 0, 2]
    dpo = X.rows_for("dpo", list(found.values()))
    assert [(r["chosen"], r["rejected"], r.get("margin")) for r in dpo] == [
        ("Red.", "A colour.", None), ("Green.", "A colour.", None), ("Hi!", "Hello.", 4.0)]
    assert dpo[0]["constraints"] == [] and dpo[2]["prompt"] == ITEMS[1]["prompt"]
    assert len(X.rows_for("dpo", list(found.values()), pairs="all")) == 3 + 1 + 1
    assert [r["responses"] for r in X.rows_for("ranked", list(found.values()))] == [
        ["Red.", "Blue.", "A colour."], ["Hi!", "Hello."]]
    kto = X.rows_for("kto", list(found.values()), threshold=4)  # means: a 3, 4.5, 1; b 5, 1
    assert [(r["completion"], r["label"]) for r in kto] == [  # "A colour." rated 1 and edited: once, undesirable
        ("Blue.", False), ("Red.", True), ("A colour.", False), ("Green.", True), ("Hi!", True), ("Hello.", False)]
    assert [r["completion"] for r in X.rows_for("sft", list(found.values()))] == ["Green.", "Red.", "Hi!"]


def test_an_edited_answer_is_never_also_desirable(items, tmp_path):
    """Rated 5 by one person and edited by another: kto labels it undesirable (someone found it worth fixing) and
    its edit desirable, each once; sft takes the edit, not the answer that needed it."""
    store = Store(tmp_path / "ann.jsonl", items, writable=True)
    store.append("ann", "a", "rate", {"candidate": 1, "rating": 5})
    store.append("bob", "a", "edit", {"candidate": 1, "text": "Red, like a cherry."})
    store.close()
    found = X.verdicts(store)
    assert [(r["completion"], r["label"]) for r in X.rows_for("kto", found)] == [
        ("Red.", False), ("Red, like a cherry.", True)]
    assert [r["completion"] for r in X.rows_for("sft", found)] == ["Red, like a cherry."]


def test_a_tie_takes_back_the_persons_ratings_too(items, tmp_path):
    """Rate A 5 and B 2, then tie: the person says no answer is better, so no pair comes from their ratings."""
    store = Store(tmp_path / "ann.jsonl", items, writable=True)
    store.append("ann", "b", "rate", {"candidate": 0, "rating": 5})
    store.append("ann", "b", "rate", {"candidate": 1, "rating": 2})
    store.append("ann", "b", "tie", {})
    store.close()
    assert X.rows_for("dpo", X.verdicts(store)) == []
    store = Store(tmp_path / "bob.jsonl", items, writable=True)  # ratings after the tie count again
    store.append("bob", "b", "tie", {})
    store.append("bob", "b", "rate", {"candidate": 0, "rating": 5})
    store.append("bob", "b", "rate", {"candidate": 1, "rating": 2})
    store.close()
    assert [(r["chosen"], r["margin"]) for r in X.rows_for("dpo", X.verdicts(store))] == [("Hi!", 3.0)]


def test_critiques_in_words_are_kept_revised_taken_back_and_exported(items, tmp_path):
    """Critiques of one answer and of the item as a whole: a later one replaces the person's earlier one, "" takes it
    back, a tie keeps them (they are about one answer, not the others); each criticised answer is one row."""
    store = Store(tmp_path / "ann.jsonl", items, writable=True)
    for who, item, fields in [("ann", "a", {"candidate": 0, "text": "Too short."}),
                              ("ann", "a", {"candidate": 0, "text": "Say which blue."}),  # revised
                              ("bob", "a", {"candidate": 0, "text": "Fine, but terse."}),
                              ("bob", "a", {"candidate": 2, "text": "Names no colour."}),
                              ("bob", "a", {"candidate": 2, "text": ""}),  # taken back
                              ("ann", "b", {"candidate": None, "text": "Neither asks how I am."})]:
        store.append(who, item, "critique", fields)
    store.append("ann", "a", "rate", {"candidate": 0, "rating": 2})
    store.append("bob", "a", "tie", {})
    with pytest.raises(DataError, match="'text'"):
        store.append("ann", "a", "critique", {"candidate": 1})
    with pytest.raises(DataError, match="candidate index 0..2"):
        store.append("ann", "a", "critique", {"candidate": 3, "text": "x"})
    store.close()
    rows = X.rows_for("critiques", X.verdicts(store))
    assert [(r["completion"], r["critique"], r["critics"], r.get("rating")) for r in rows] == [
        ("Blue.", "Say which blue.\nFine, but terse.", ["ann", "bob"], 2.0),
        ("Hi!", "Neither asks how I am.", ["ann"], None), ("Hello.", "Neither asks how I am.", ["ann"], None)]
    assert rows[0]["constraints"] == [] and rows[1]["prompt"] == ITEMS[1]["prompt"]
    assert X.report(Store(tmp_path / "ann.jsonl", items))["critiques"] == 3  # ann's a/0, bob's a/0, ann's b


def test_the_reference_answer_of_a_messages_prompt_never_reaches_the_items(tmp_path):
    """An SFT eval set's rows end with the reference answer: generate answers without it, and the items (what
    annotators see, what every export carries) are built the same way."""
    turns = [{"role": "user", "content": "Name a colour."}]
    rows = [{"messages": turns + [{"role": "assistant", "content": "THE REFERENCE"}], "constraints": []}]
    a = write_jsonl(tmp_path / "a.jsonl", [r | {"response": "Blue.", "finished": True} for r in rows])
    b = write_jsonl(tmp_path / "b.jsonl", [r | {"response": "Red.", "finished": True} for r in rows])
    items = from_generations([str(a), str(b)], tmp_path / "c.jsonl")
    assert items.items[0].prompt == turns and "THE REFERENCE" not in (tmp_path / "c.jsonl").read_text()
    store = Store(tmp_path / "ann.jsonl", items, writable=True)
    store.append("ann", "1", "rate", {"candidate": 0, "rating": 5})
    store.append("ann", "1", "edit", {"candidate": 1, "text": "Green."})
    store.close()
    for target in X.TARGETS:
        assert "THE REFERENCE" not in json.dumps(X.rows_for(target, X.verdicts(store)))


def test_agreement_position_bias_and_win_rates_by_hand(items, tmp_path):
    store = judged(items, tmp_path)
    # item a, pairs both decided: (0,1) alike (1≻0); (0,2) ann 0≻2, bob 2≻0: unlike; (1,2) alike → 2 of 3
    ag = X.agreement(store)
    assert ag["pairs_compared"] == 3 and ag["pairwise_agreement"] == pytest.approx(2 / 3)
    assert ag["mean_rating_gap"] == pytest.approx((2 + 1) / 2)  # answer 0: |2 − 4|, answer 1: |5 − 4|
    pb = X.position_bias(store)  # ann's rank and bob's pick both prefer candidate 1
    first = [shown_order(who, items.items[0])[0] == 1 for who in ("ann", "bob")]
    assert pb["choices"] == 2 and pb["first_shown_preferred"] == sum(first) / 2 and pb["chance"] == pytest.approx(1 / 3)
    lo, hi = X.wilson(0.5, 10)  # (0.5 + 0.19208 ± 1.96·√(0.025 + 0.0096040)) / 1.38416
    assert lo == pytest.approx(0.236590, abs=1e-6) and hi == pytest.approx(0.763410, abs=1e-6)


def test_blind_comparisons_give_win_rates(tmp_path):
    pairs = [{"id": str(i), "prompt": f"p{i}", "candidates": [{"text": f"a{i}", "sources": ["sft"]},
                                                                {"text": f"b{i}", "sources": ["dpo"]}]}
             for i in range(4)]
    pairs[3]["candidates"].reverse()  # the models on the other sides in one item: the same comparison
    items = read_items(write_jsonl(tmp_path / "c.jsonl", pairs))
    store = Store(tmp_path / "ann.jsonl", items, writable=True)
    for i, winner in enumerate([1, 1, 0, 0]):  # item 3: candidate 0 is dpo's answer
        store.append("ann", str(i), "compare", {"winner": winner})
    store.append("bob", "0", "compare", {"winner": None})
    assert list(X.win_rates(store)) == ["dpo vs sft"]
    rate = X.win_rates(store)["dpo vs sft"]
    assert (rate["wins"], rate["losses"], rate["ties"], rate["win_rate"]) == (3, 1, 1, 0.7)
    assert rate["ci95"] == pytest.approx(X.wilson(0.7, 5))


# --------------------------------------------------------------------------------------------- the server
@pytest.fixture
def served(items, tmp_path):
    def start(mode="feedback", token=None, loopback=True, data=items):
        store = Store(tmp_path / f"ann-{len(started)}.jsonl", data, writable=True)
        server = make_server(App(data, store, mode, token, "ann", loopback), "127.0.0.1", 0)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append((server, store))
        return f"http://127.0.0.1:{server.server_address[1]}", store

    started = []
    yield start
    for server, store in started:
        server.shutdown()
        server.server_close()
        store.close()


def call(url, body=None, headers=None, ctype="application/json"):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={**({"Content-Type": ctype} if data else {}),
                                                          **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


def test_the_api_serves_items_in_shown_order_and_saves_judgements(served, items):
    url, store = served()
    status, page = call(url + "/")
    assert status == 200 and "llmft annotate" in page and '"ann"' in page  # the default annotator filled in
    view = json.loads(call(url + "/api/item?annotator=bob")[1])
    assert view["item"]["id"] == "a" and view["done"] == 0 and view["total"] == 2
    assert [c["index"] for c in view["item"]["candidates"]] == shown_order("bob", items.items[0])
    status, body = call(url + "/api/judge", {"annotator": "bob", "item": "a", "action": "rate", "candidate": 2,
                                             "rating": 3})
    assert status == 200 and json.loads(body)["saved"] and store.judgements[-1].line["rating"] == 3
    call(url + "/api/judge", {"annotator": "bob", "item": "a", "action": "done"})
    view = json.loads(call(url + "/api/item?annotator=bob")[1])
    assert view["item"]["id"] == "b" and view["done"] == 1
    again = json.loads(call(url + "/api/item?annotator=bob&index=0")[1])  # going back shows what was said
    assert again["finished"] and [j["action"] for j in again["judgements"]] == ["rate", "done"]
    status, body = call(url + "/api/judge", {"annotator": "bob", "item": "a", "action": "rate", "candidate": 7,
                                             "rating": 3})
    assert status == 400 and "candidate index 0..2" in json.loads(body)["error"]


def test_the_server_refuses_what_it_must(served, items, tmp_path):
    url, store = served(token="s3cret")
    assert call(url + "/")[0] == 403 and call(url + "/?token=wrong")[0] == 403
    assert call(url + "/?token=s3cret")[0] == 200
    assert call(url + "/api/item?annotator=x", headers={"X-Llmft-Token": "s3cret"})[0] == 200
    form = call(url + "/api/judge", {"annotator": "x", "item": "a", "action": "done"},
                headers={"X-Llmft-Token": "s3cret"}, ctype="application/x-www-form-urlencoded")
    assert form[0] == 415 and not store.judgements  # no cross-site form posts
    status, _ = call(url + "/", headers={"Host": "evil.example:80", "X-Llmft-Token": "s3cret"})
    assert status == 403  # a DNS-rebound name on loopback
    with pytest.raises(ConfigError, match="--allow-remote"):
        check_binding("0.0.0.0", False, None)
    assert len(check_binding("0.0.0.0", True, None)) >= 16 and check_binding("127.0.0.1", False, None) is None
    url, _ = served(mode="compare", data=read_items(write_jsonl(tmp_path / "two.jsonl", [ITEMS[1]])))
    status, body = call(url + "/api/judge", {"annotator": "x", "item": "b", "action": "rate", "candidate": 0,
                                             "rating": 2})
    assert status == 400 and "compares answers blind" in body
    with pytest.raises(ConfigError, match="item 'a' has 3"):
        App(items, store, "compare", None, None, True)


def test_cli_export_report_and_one_line_errors(items, tmp_path, capsys, monkeypatch):
    judged(items, tmp_path)
    cands, ann, out = items.path, tmp_path / "ann.jsonl", tmp_path / "pairs.jsonl"
    code, stdout, err = llmft(capsys, monkeypatch, "annotate", "export", cands, "--annotations", ann, "--to", "dpo",
                              "--out", out, "--report", tmp_path / "rep.json")
    assert code == 0, err
    assert len(out.read_text().splitlines()) == 3 and "agreement: 66.7% of 3 answer pairs" in stdout
    assert json.loads((tmp_path / "rep.json").read_text())["finished_by"] == {"ann": 0, "bob": 0}
    code, _, err = llmft(capsys, monkeypatch, "annotate", "export", cands, "--annotations", ann, "--to", "ppo",
                         "--out", out)
    assert_one_line_error(code, err, "--to must be one of dpo, reward, ranked, kto, sft")
    code, _, err = llmft(capsys, monkeypatch, "annotate", "report", cands, "--annotations", tmp_path / "none.jsonl")
    assert_one_line_error(code, err, "annotations file not found")
    write_jsonl(tmp_path / "cands.jsonl", ITEMS[:1])  # the candidates changed under the annotations
    code, _, err = llmft(capsys, monkeypatch, "annotate", "report", cands, "--annotations", ann)
    assert_one_line_error(code, err, "ann.jsonl:1: made on another candidates file")


# ------------------------------------------------------------------------------------------------ imports
LS_TASKS = [  # Label Studio's JSON export of the pairwise RLHF template (left = answer1)
    {"id": 17, "data": {"prompt": "Say hi.", "answer1": "Hi!", "answer2": "Go away."},
     "annotations": [
         {"id": 1, "completed_by": 3, "was_cancelled": False, "created_at": "2024-05-01T10:00:00Z",
          "result": [{"from_name": "comparison", "to_name": "comparison", "type": "pairwise",
                      "value": {"selected": "left"}}]},
         {"id": 2, "completed_by": {"id": 5, "email": "eve@x.org"}, "was_cancelled": False,
          "result": [{"type": "pairwise", "value": {"selected": "right"}}]},
         {"id": 3, "completed_by": 7, "was_cancelled": True, "result": []},
         {"id": 4, "completed_by": 8, "result": []}]},  # no choice: said nothing
    {"id": 18, "data": {"prompt": "Name a fruit.", "answer1": "A rock.", "answer2": "An apple."},
     "annotations": [{"id": 5, "completed_by": 3, "result": [{"type": "pairwise", "value": {"selected": "right"}}]}]},
]


def test_label_studio_pairwise_export_imports_and_exports(tmp_path, capsys, monkeypatch):
    src = tmp_path / "ls.json"
    src.write_text(json.dumps(LS_TASKS))
    code, out, err = llmft(capsys, monkeypatch, "annotate", "import", src, "--from", "label-studio",
                           "--candidates", tmp_path / "c.jsonl")
    assert code == 0, err
    assert "3 judgements by 2 people" in out
    store = Store(tmp_path / "c.annotations.jsonl", read_items(tmp_path / "c.jsonl"))
    assert [(j.annotator, j.line["winner"]) for j in store.judgements] == [
        ("label-studio:3", 0), ("label-studio:eve@x.org", 1), ("label-studio:3", 1)]
    rows = X.rows_for("dpo", X.verdicts(store))
    assert [(r["chosen"], r["rejected"]) for r in rows] == [("An apple.", "A rock.")]  # 17: one vote each way
    assert X.win_rates(store)["answer2 vs answer1"]["wins"] == 2
    code, _, err = llmft(capsys, monkeypatch, "annotate", "import", src, "--from", "label-studio",
                         "--candidates", tmp_path / "c.jsonl")
    assert_one_line_error(code, err, "exists: import into a new annotations file")
    minimal = tmp_path / "min.json"  # JSON-MIN: one row per annotation
    minimal.write_text(json.dumps([{"id": 17, "prompt": "Say hi.", "answer1": "Hi!", "answer2": "Yo.",
                                    "comparison": [{"selected": "left"}], "annotator": 3}]))
    minimal.write_text(json.dumps([  # JSON-MIN: one row per annotation, grouped back into one item per task
        {"id": 17, "prompt": "Say hi.", "answer1": "Hi!", "answer2": "Yo.", "comparison": [{"selected": "left"}],
         "annotator": 3, "annotation_id": 1},
        {"id": 17, "prompt": "Say hi.", "answer1": "Hi!", "answer2": "Yo.", "comparison": [{"selected": "left"}],
         "annotation_id": 2}]))  # no annotator: a person of its own
    code, _, err = llmft(capsys, monkeypatch, "annotate", "import", minimal, "--from", "label-studio",
                         "--candidates", tmp_path / "m.jsonl")
    assert code == 0, err
    store = Store(tmp_path / "m.annotations.jsonl", read_items(tmp_path / "m.jsonl"))
    assert len(store.items) == 1 and store.annotators() == ["label-studio:3", "label-studio:unknown-2"]
    bad = tmp_path / "bad.json"  # three answers cannot be a blind comparison: nothing is written
    bad.write_text(json.dumps([{"id": 1, "data": {"prompt": "p", "a": "x", "b": "y", "c": "z"},
                                "annotations": [{"result": [{"type": "pairwise", "value": {"selected": "left"}}]}]}]))
    code, _, err = llmft(capsys, monkeypatch, "annotate", "import", bad, "--from", "label-studio", "--fields",
                         "prompt,a,b,c", "--candidates", tmp_path / "b.jsonl")
    assert_one_line_error(code, err, "bad.json row 0: a blind comparison needs items of exactly 2 candidates")
    assert not list(tmp_path.glob("b.*")) and not list(tmp_path.glob(".importing-*"))


def test_argilla_rows_import_in_both_layouts(tmp_path):
    from llmft.annotate import imports

    v2 = {"id": "rec-0", "prompt": "p", "response1": "a", "response2": "b",
          "rating.responses": [4, 2], "rating.responses.users": ["u1", "u2"],
          "rating.responses.status": ["submitted", "draft"],
          "ranking.responses": [["response2", "response1"], ["response1", "response2"]],
          "ranking.responses.users": ["u1", "u2"], "ranking.responses.status": ["submitted", "discarded"],
          "corrected.responses": ["better b"], "corrected.responses.users": ["u1"],
          "corrected.responses.status": ["submitted"]}
    v1 = {"external_id": "rec-1", "prompt": "q", "response1": "c", "response2": "d",
          "rating": [{"user_id": "u1", "value": 5, "status": "submitted"}],
          "ranking": [{"user_id": "u1", "value": {"rank": [1, 1], "value": ["response2", "response1"]},
                       "status": "submitted"},
                      {"user_id": "u2", "value": {"rank": [2, 1], "value": ["response1", "response2"]},
                       "status": "submitted"}],
          "corrected": [{"user_id": "u1", "value": "d ", "status": "submitted"}]}  # unchanged: not an edit
    src = write_jsonl(tmp_path / "argilla.jsonl", [v2, v1])
    found = imports.argilla(str(src), "prompt", ["response1", "response2"], "ranking", {"rating": "response1"},
                            {"corrected": "response2"})
    found_without_where = [[j[:3] for j in judgements] for _, judgements in found]
    assert found[0][1][0][3].endswith("argilla.jsonl:1")  # where each came from, for error messages
    assert found_without_where[0] == [("argilla:u1", "rank", {"order": [1, 0]}),
                           ("argilla:u1", "rate", {"candidate": 0, "rating": 4}),
                           ("argilla:u1", "edit", {"candidate": 1, "text": "better b"})]
    assert found_without_where[1] == [("argilla:u1", "tie", {}), ("argilla:u2", "rank", {"order": [1, 0]}),
                           ("argilla:u1", "rate", {"candidate": 0, "rating": 5})]
    store = imports.write(found, tmp_path / "c.jsonl", tmp_path / "a.jsonl")
    assert store.finished("argilla:u1") == {"rec-0", "rec-1"}
    with pytest.raises(DataError, match=r"argilla.jsonl:1: rating: ratings are whole numbers 1-5, got 9"):
        write_jsonl(src, [v2 | {"rating.responses": [9, 2]}])
        imports.argilla(str(src), "prompt", ["response1", "response2"], None, {"rating": "response1"}, {})


def test_cycles_identical_answers_and_taking_back(tmp_path):
    rows = [{"id": "c", "prompt": "p", "candidates": ["A", "B", "C", "D"]},
            {"id": "same", "prompt": "q", "candidates": ["Same.", "Same. ", "Other."]}]
    items = read_items(write_jsonl(tmp_path / "c.jsonl", rows))
    store = Store(tmp_path / "ann.jsonl", items, writable=True)
    # a cycle A ≻ B ≻ C ≻ A (one person each), with D below all: no strict order, so no ranked row
    for who, order in [("p1", [0, 1, 2, 3]), ("p2", [1, 2, 0, 3]), ("p3", [2, 0, 1, 3])]:
        store.append(who, "c", "rank", {"order": order})
    store.append("p1", "same", "rate", {"candidate": 0, "rating": 5})
    store.append("p1", "same", "rate", {"candidate": 1, "rating": 1})
    found = X.verdicts(store)
    assert X.rows_for("ranked", found) == []
    pairs = X.rows_for("dpo", found, pairs="all")
    assert ("Same.", "Same. ") not in [(r["chosen"], r["rejected"]) for r in pairs]  # the same text: no pair
    store.append("p1", "c", "tie", {})  # p1 takes the ranking back: A ≻ B and C ≻ A stand (p2, p3), B ≻ C too
    store.append("p1", "same", "skip", {})  # ... and the ratings of the other item
    found = {v.item.id: v for v in X.verdicts(store)}
    assert found["c"].prefer(0, 1, 1.0) is None and found["c"].prefer(2, 0, 1.0) == (2, 0, None)
    assert "same" not in found
    with pytest.raises(ConfigError, match="--min-gap must be > 0"):
        X.rows_for("dpo", list(found.values()), min_gap=0)
    store.close()
