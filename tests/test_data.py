"""prepare_data: the eleven raw shapes, cleaning rules, labels, the split, bad input, download, the atomic
output folder and its data card, and what prepare and --download refuse to replace."""

import hashlib
import http.server
import io
import json
import shutil
import subprocess
import sys
import threading
import zipfile
from collections import Counter

import pytest

from tests.conftest import ROOT
from tests.fixtures import shapes, write_raw
from utils.core.artifacts import DONE_MARKER
from utils.core.config import load_config
from utils.data.card import read_card, split_hash, verify_splits
from utils.data.download import DOWNLOAD_MARKER, git_blob_sha1
from utils.data.prepare import PrepareConfig, run_prepare
from utils.data.raw import TASKS, CleanOptions, load_raw
from utils.data.rows import SPLITS, DataError
from utils.data.split import duplicate_groups, near_duplicate_groups, nearest_neighbours, split_records
from utils.data.text import extract_numbers, followup_interval, jaccard, words

SYSTEM = "SYS"


def load(raw_dir, **opts):
    return load_raw(raw_dir, SYSTEM, CleanOptions(**opts))


def by_task(records):
    out = {}
    for r in records:
        out.setdefault(r["task"], []).append(r)
    return out


# ----------------------------------------------------------------------------- shapes
def test_every_shape_becomes_records(raw_dir):
    records, report = load(raw_dir)
    t = by_task(records)
    assert set(t) == set(TASKS), "all eleven files read"
    for r in records:
        m = r["messages"]
        assert m[0] == {"role": "system", "content": SYSTEM}
        assert [x["role"] for x in m[1:]] == ["user", "assistant"] * ((len(m) - 1) // 2)
        assert m[-1]["content"] == r["reference"] and r["reference"]
        assert r["id"].startswith(r["task"] + "-")
    # CD carries the disease; PP the advice as context; PRTK the yes/no label.
    assert all(r["label_disease"] for r in t["CD"])
    pp = t["PP"][0]
    assert pp["context"].startswith("You have atrial fibrillation") and "Medical advice" in pp["messages"][1]["content"]
    assert {r["label_yesno"] for r in t["PRTK"]} == {"yes", "no"}
    # CMD stores question and answer swapped upstream; measurements become context, 29999 is dropped.
    cmd = t["CMD"][0]
    assert cmd["question"].startswith("What is the diagnosis") and cmd["reference"].startswith("The rhythm is")
    assert "rr_interval=" in cmd["context"] and "qrs_axis" not in cmd["context"] and "Sinus bradycardia" in cmd["context"]
    # GRA: a mapping answer becomes text; the instruction stands in for the missing question.
    assert any("risk: high" in r["reference"] for r in t["GRA"])
    # LTD: a list of pairs and a mapping of pairs, each pair its own single-turn record.
    assert len(t["LTD"]) == 15 and all(len(r["messages"]) == 3 for r in t["LTD"])
    # MROD: the pairs of one item are one conversation of two turns.
    assert len(t["MROD"]) == 10 and all(len(r["messages"]) == 5 for r in t["MROD"])
    # MEE: keywords as a list or one string both become the answer.
    assert {r["reference"] for r in t["MEE"][:2]} <= {"sinus tachycardia, ST depression", "sinus tachycardia; ST depression"}
    # MC: phases flattened in order, patient -> user, doctor -> assistant; the correction is the last turn.
    mc = t["MC"][0]["messages"]
    assert [x["role"] for x in mc[1:]] == ["user", "assistant", "user", "assistant"]
    assert mc[-2]["content"] == "Sorry, I meant atrial flutter."


def test_unknown_role_names_alternate(tmp_path):
    items = [{"subject_id": 1, "result": "AF.", "Conversation": {"p1": [{"A_role": "I feel dizzy."},
                                                                        {"B_role": "Your ECG shows AF."}]}}]
    (tmp_path / TASKS["MC"].file).write_text(json.dumps(items))
    records, _ = load(tmp_path)
    assert [m["role"] for m in records[0]["messages"][1:]] == ["user", "assistant"]


# ----------------------------------------------------------------------------- cleaning
def test_cleaning_rules_counted(raw_dir):
    records, rep = load(raw_dir)
    refs = {r["reference"] for r in records}
    assert "It carries the impulse that sets the heart’s rhythm." in refs          # mojibake repaired
    assert not any("鈮" in r["reference"] or "\ufffd" in r["reference"] for r in records)  # unrecoverable dropped
    assert "Heart failure is the heart's inability to pump enough blood." in refs  # whitespace, zero-width
    assert not any(r["reference"] == "TEE is preferred over" for r in records)     # truncated dropped
    assert not any(r["question"] == "May I refuse the ECG?" for r in records)      # contradictory dropped
    assert rep["removed"] == Counter({"mojibake_unrecoverable": 1, "truncated_answer": 1, "exact_duplicate": 1,
                                      "contradictory_answer": 2})
    assert rep["repaired"]["mojibake_items"] == 1 and rep["repaired"]["whitespace_items"] == 1


def test_cleaning_can_keep_and_flag(raw_dir):
    records, rep = load(raw_dir, unrecoverable="keep", drop_truncated=False, drop_contradictory=False)
    flags = Counter(f for r in records for f in r["flags"])
    assert flags == Counter({"mojibake_unrecoverable": 1, "truncated_answer": 1, "contradictory_answer": 2})
    assert rep["flagged"] == flags


def test_counts_reconcile(raw_dir):
    records, rep = load(raw_dir)
    # LTD items hold several pairs each; every other file gives one record per item.
    items = sum(len(v) for k, v in shapes().items()) + 5  # 5 LTD items with two pairs
    assert items - sum(rep["removed"].values()) == len(records)


# ----------------------------------------------------------------------------- labels
@pytest.mark.parametrize("text,expected", [
    ("QRS > 120 ms", [(120.0, 120.0, "ms")]),
    ("PR 0.12-0.20 s", [(0.12, 0.2, "s")]),
    ("a rate of 60 to 100 beats per minute", [(60.0, 100.0, "bpm")]),
    ("ST elevation of 2 mm in V2", [(2.0, 2.0, "mm")]),
    ("EF below 35%", [(35.0, 35.0, "%")]),
    ("lead V2 and 12 leads", []),  # numbers without units are not measurements
])
def test_numbers(text, expected):
    assert [(n["low"], n["high"], n["unit"]) for n in extract_numbers(text)] == expected


def test_number_units_convert():
    a, b = extract_numbers("120 ms"), extract_numbers("0.12 s")
    assert a[0]["base_low"] == pytest.approx(b[0]["base_low"])


@pytest.mark.parametrize("text,days", [
    ("Come back every 3 months for an ECG.", 91.32), ("See us within two weeks.", 14.0),
    ("Follow up in 6-12 months.", 273.96), ("Take it daily.", None),
])
def test_followup(text, days):
    got = followup_interval(text)
    assert (got[1] if got else None) == (pytest.approx(days) if days else None)


# ----------------------------------------------------------------------------- bad input
BAD_FILES = [
    (b"", "empty file"),
    (b"{not json", "not valid JSON (line 1"),
    (b'{"Q": "a", "A": "b"}', "expected a JSON list of objects, found a JSON dict"),
    (b"[]", "empty list"),
    (b'[{"Q": "a", "A": "b."}, 3]', "item 1 is a JSON int"),
    ('[{"Q": "caf\u00e9", "A": "b."}]'.encode("latin-1"), "not UTF-8 text"),
    (b'[{"Q": "a", "A": "b."}, {"Prompt": "x", "Reply": "y"}]', "item 1 has keys ['Prompt', 'Reply'] which fit no known"),
]


@pytest.mark.parametrize("payload,words", BAD_FILES)
def test_bad_files(tmp_path, payload, words):
    f = tmp_path / TASKS["EBK"].file
    f.write_bytes(payload)
    with pytest.raises(DataError) as e:
        load(tmp_path)
    assert str(f) in str(e.value) and words in str(e.value) and "\n" not in str(e.value)


def test_skip_bad_items_counts(tmp_path):
    (tmp_path / TASKS["EBK"].file).write_text(json.dumps([{"Q": "a?", "A": "b."}, {"Prompt": "x"}]))
    records, rep = load(tmp_path, skip_bad_items=True)
    assert len(records) == 1 and rep["removed"]["bad_item"] == 1


def test_missing_dir_says_how_to_get_data(tmp_path):
    with pytest.raises(DataError, match="raw data directory not found.*--download"):
        load(tmp_path / "nope")


def test_cli_bad_file_one_line(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / TASKS["PRTK"].file).write_text("[1, 2")
    r = subprocess.run([sys.executable, "prepare_data.py", "--raw-dir", str(tmp_path / "raw"),
                        "--out-dir", str(tmp_path / "out"), "--tokenizer", ""], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith("error: ") and "not valid JSON" in r.stderr
    assert not (tmp_path / "out" / "sft").exists()


# ----------------------------------------------------------------------------- split
def test_near_duplicate_groups_exact():
    qs = ["what is the normal qrs duration", "what is the normal qrs duration in adults",
          "what is a normal qrs duration", "define atrial flutter", "define atrial flutter please"]
    g = near_duplicate_groups(qs, 0.8)
    # brute force reference: transitive closure of pairs with Jaccard >= 0.8
    sets = [set(words(q)) for q in qs]
    for i in range(len(qs)):
        for j in range(len(qs)):
            if jaccard(sets[i], sets[j]) >= 0.8:
                assert g[i] == g[j]
    assert g[3] != g[0]


def test_split_is_deterministic_and_stratified(raw_dir):
    records, _ = load(raw_dir)
    a = split_records(records, 0.1, 0.1, 0.8, seed=7)
    records2, _ = load(raw_dir)
    b = split_records(records2, 0.1, 0.1, 0.8, seed=7)
    assert {k: [r["id"] for r in v] for k, v in a.items()} == {k: [r["id"] for r in v] for k, v in b.items()}
    assert sum(len(v) for v in a.values()) == len(records)
    held = by_task(a["test"] + a["validation"])
    assert {"CD", "CK"} <= set(held)  # tasks with distinct prompts and answers reach the held-out splits
    groups_by_split = {k: {r["group"] for r in v} for k, v in a.items()}
    assert not groups_by_split["train"] & (groups_by_split["test"] | groups_by_split["validation"])
    # Items with the same answer (the fixtures' repeated PRTK item, say) are one group, on one side.
    by_ref = {}
    for r in records:
        by_ref.setdefault(r["reference"], []).append(r)
    same = [rs for rs in by_ref.values() if len(rs) > 1]
    assert same and all(len({(r["group"], r["split"]) for r in rs}) == 1 for rs in same)


def _record(i: int, prompt: str, answer: str, task: str = "PP") -> dict:
    return {"id": f"{task}-{i:03d}", "task": task, "reference": answer,
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt},
                         {"role": "assistant", "content": answer}]}


def test_near_duplicates_judged_on_prompt_and_on_answer():
    advice = "You have atrial fibrillation; take apixaban twice daily and avoid alcohol and heavy exercise"
    records = [
        # the same advice, questions a word apart: the questions alone are < 0.8, the whole prompt is not
        _record(0, f"Medical advice:\n{advice}.\n\nQuestion: How often should I come back?", "Every 3 months."),
        _record(1, f"Medical advice:\n{advice}.\n\nQuestion: How often should I return?", "In one year, with an ECG."),
        # different questions whose answers match word for word
        _record(2, "Is my pacemaker safe near a microwave oven?", "Yes, modern pacemakers are shielded from it."),
        _record(3, "Can I cook with a microwave with my device?", "Yes, modern pacemakers are shielded from it!"),
        _record(4, "What does a delta wave mean?", "Pre-excitation, as in Wolff-Parkinson-White syndrome."),
    ]
    assert jaccard(set(words("How often should I come back?")), set(words("How often should I return?"))) < 0.8
    g = duplicate_groups(records, 0.8)
    assert g.by_key["prompt"][0] == g.by_key["prompt"][1] and g.by_key["answer"][0] != g.by_key["answer"][1]
    assert g.by_key["answer"][2] == g.by_key["answer"][3] and g.by_key["prompt"][2] != g.by_key["prompt"][3]
    assert g.groups[0] == g.groups[1] and g.groups[2] == g.groups[3]
    assert len({g.groups[0], g.groups[2], g.groups[4]}) == 3
    assert g.stats() == {"items_in_groups": 4, "groups": 2, "largest": 2,
                         "by_prompt": {"items_in_groups": 2, "groups": 1, "largest": 2},
                         "by_answer": {"items_in_groups": 2, "groups": 1, "largest": 2}}


def test_nearest_neighbours_is_exact():
    """The sparse closest-item search against every pair compared, wordless texts included."""
    texts = [x for item in shapes()["EBK"] + shapes()["CK"] for x in (item["Q"], item["A"])] + ["", "?!"]
    queries, pool = texts[::3], [t for i, t in enumerate(texts) if i % 3]
    got = nearest_neighbours(queries, pool, chunk=4)
    pool_sets = [set(words(t)) for t in pool]
    for q, (sim, j) in zip(queries, got):
        best = max(jaccard(set(words(q)), b) for b in pool_sets)
        assert sim == best and (j < 0 or jaccard(set(words(q)), pool_sets[j]) == sim)


def test_prepare_writes_sets_loadable_with_datasets(processed):
    import datasets

    for name in ("sft/train", "sft/validation", "grpo/train", "grpo/validation", "eval/test"):
        ds = datasets.load_dataset("json", data_files=str(processed / f"{name}.jsonl"), split="train")
        assert len(ds) > 0
    card = json.loads((processed / "data_card.json").read_text())
    assert card["records"] == sum(card["splits"].values())
    assert (processed / "data_card.md").read_text().startswith("# ECG-Expert-QA data card")
    row = json.loads((processed / "grpo/train.jsonl").read_text().splitlines()[0])
    assert row["prompt"][-1]["role"] == "user" and row["reference"]


def test_phase_task_selection(tmp_path, raw_dir):
    cfg = load_config(PrepareConfig, None, {"raw_dir": str(raw_dir), "out_dir": str(tmp_path / "p"),
                                            "tokenizer": "", "grpo_tasks": ["PRTK", "EBK"],
                                            "system_prompt_file": str(ROOT / "data/system_prompt.txt")})
    run_prepare(cfg)
    tasks = {json.loads(x)["task"] for x in (tmp_path / "p/grpo/train.jsonl").read_text().splitlines()}
    assert tasks == {"PRTK", "EBK"}


# ----------------------------------------------------------------------------- the real data
@pytest.fixture(scope="module")
def real(real_raw_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("real")
    cfg = load_config(PrepareConfig, ROOT / "configs/cpu/prepare.yaml",
                      {"raw_dir": str(real_raw_dir), "out_dir": str(out), "tokenizer": "",
                       "system_prompt_file": str(ROOT / "data/system_prompt.txt")})
    card = run_prepare(cfg)
    rows = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines()]
    return card, rows, cfg


def test_real_counts_reconcile(real, real_raw_dir):
    card, rows, _ = real
    raw_items = sum(len(json.loads(p.read_text(encoding="utf-8"))) for p in real_raw_dir.glob("*.json"))
    assert raw_items - sum(card["cleaning"]["removed"].values()) == card["records"] == len(rows)
    assert card["cleaning"]["removed"]["exact_duplicate"] >= 30  # PRTK's 30 duplicate records (SCHEMAS.md)
    assert card["cleaning"]["contradictory_questions"] >= 1
    assert card["cleaning"]["removed"]["truncated_answer"] >= 1
    assert card["cleaning"]["repaired"]["mojibake_items"] > 0
    assert not any(ch in r["reference"] for r in rows for ch in "鈥鈮掳")
    for task, c in card["per_task"].items():
        assert c.get("test", 0) > 0 and c.get("validation", 0) > 0, task


def _pairs_at_or_above(held: list[frozenset], pool: list[frozenset], t: float) -> list[tuple[int, int]]:
    """Every (held, pool) pair with word Jaccard >= t, by brute force (a size filter first: Jaccard >= t
    needs min(|a|, |b|) >= t * max(|a|, |b|)), independently of the split's prefix filter and the card's
    sparse search."""
    by_len: dict[int, list[tuple[int, frozenset]]] = {}
    for j, b in enumerate(pool):
        by_len.setdefault(len(b), []).append((j, b))
    found = []
    for i, a in enumerate(held):
        for n, group in by_len.items():
            if min(n, len(a)) < t * max(n, len(a)):
                continue
            found += [(i, j) for j, b in group if jaccard(a, b) >= t]
    return found


@pytest.mark.slow  # ~40 s on 2 cores: every held-out x train pair of a size that could reach the threshold
def test_real_split_has_no_leak(real):
    """No test or validation item has a train item (nor a test item a validation item) whose prompt (the
    turns before the answer: context and question) or whose answer reaches the threshold. (Changed: the
    split used to judge the question alone; two Patient Prognosis items asking the same question about
    different advice may now sit on both sides, while items whose advice or answers match no longer do.)"""
    _, rows, cfg = real
    t = cfg.near_duplicate_threshold
    texts = {"prompt": lambda r: "\n".join(m["content"] for m in r["messages"][:-1] if m["role"] != "system"),
             "answer": lambda r: r["reference"]}
    by_split = {s: [r for r in rows if r["split"] == s] for s in ("train", "validation", "test")}
    assert all(by_split.values())
    for key, text in texts.items():
        sets = {s: [frozenset(words(text(r))) for r in rs] for s, rs in by_split.items()}
        for held, pool in (("test", "train"), ("validation", "train"), ("test", "validation")):
            leaks = _pairs_at_or_above(sets[held], sets[pool], t)
            first = [(by_split[held][i]["id"], by_split[pool][j]["id"]) for i, j in leaks[:5]]
            assert not leaks, (key, held, pool, first)


def test_real_card_reports_closest_train_items(real):
    card, rows, cfg = real
    assert card["splits"]["train"] > 8000 and card["splits"]["test"] > 400
    assert card["near_duplicates"]["items_in_groups"] > card["near_duplicates"]["by_prompt"]["items_in_groups"]
    for held in ("test", "validation"):
        for key in ("prompt", "answer"):
            s = card["closest_train"][held][key]
            assert s["items"] == card["splits"][held] and s["max"] < cfg.near_duplicate_threshold
            assert s["at_or_above"][str(cfg.near_duplicate_threshold)] == 0 and len(s["closest"]) == 10
    ids = {r["id"]: r["split"] for r in rows}
    assert all(ids[c["id"]] == "test" and ids[c["train_id"]] == "train"
               for c in card["closest_train"]["test"]["prompt"]["closest"])


# ----------------------------------------------------------------------------- the output folder and its card
def _cfg(raw_dir, out_dir, **over):
    return load_config(PrepareConfig, None, {"raw_dir": str(raw_dir), "out_dir": str(out_dir), "tokenizer": "",
                                             "system_prompt_file": str(ROOT / "data/system_prompt.txt"), **over})


def test_prepare_records_hashes_that_verify_splits_checks(processed):
    assert (processed / DONE_MARKER).is_file()
    card = read_card(processed)
    for name, entry in card["outputs"].items():
        data = (processed / name).read_bytes()
        assert entry == {"rows": data.count(b"\n"), "sha256": hashlib.sha256(data).hexdigest()}
    hashes = verify_splits(processed, list(SPLITS))
    assert hashes == {s: card["outputs"][f"{s}.jsonl"]["sha256"] for s in SPLITS}
    assert split_hash(processed, "eval/test") == hashes["eval/test"]
    md = (processed / "data_card.md").read_text()
    assert all(h in md for h in hashes.values())

    path = processed / "sft/train.jsonl"
    path.write_bytes(path.read_bytes().replace(b"atrial", b"Atrial", 1))  # one byte differs, same row count
    for call in (lambda: verify_splits(processed, ["eval/test", "sft/train"]),
                 lambda: split_hash(processed, "sft/train")):
        with pytest.raises(DataError) as e:
            call()
        msg = str(e.value)
        assert str(path) in msg and "changed since prepare_data.py wrote it" in msg and "\n" not in msg
    assert verify_splits(processed, ["eval/test"]) == {"eval/test": hashes["eval/test"]}  # the others still pass


@pytest.mark.parametrize("damage,expected", [
    (shutil.rmtree, "processed data folder not found"),
    (lambda d: (d / DONE_MARKER).unlink(), f"no {DONE_MARKER} marker"),
    (lambda d: (d / "data_card.json").unlink(), "data_card.json: not found"),
    (lambda d: (d / "data_card.json").write_text("{"), "data_card.json: unreadable"),
    (lambda d: (d / "data_card.json").write_text("{}"), "no 'outputs' table"),
    (lambda d: (d / "eval/test.jsonl").unlink(), "test.jsonl: not found, though the data card lists it"),
])
def test_card_errors_are_one_line_and_say_how_to_fix(processed, damage, expected):
    damage(processed)
    with pytest.raises(DataError) as e:
        verify_splits(processed, ["eval/test"])
    msg = str(e.value)
    assert expected in msg and "prepare_data.py" in msg and "\n" not in msg


def test_interrupted_prepare_leaves_the_previous_folder_whole(tmp_path, raw_dir, processed, monkeypatch):
    from utils.data import prepare

    before = {p.relative_to(processed): p.read_bytes() for p in processed.rglob("*") if p.is_file()}

    def crash(*a, **k):
        raise KeyboardInterrupt  # killed after the split files are written, before the card

    monkeypatch.setattr(prepare, "card_markdown", crash)
    with pytest.raises(KeyboardInterrupt):
        run_prepare(_cfg(raw_dir, processed, val_fraction=0.2, test_fraction=0.2))  # would change every split
    after = {p.relative_to(processed): p.read_bytes() for p in processed.rglob("*") if p.is_file()}
    assert after == before and verify_splits(processed, list(SPLITS))
    leftovers = [p for p in processed.parent.iterdir() if p.name.startswith("processed.")]
    assert leftovers and not any((p / DONE_MARKER).exists() for p in leftovers)  # visibly unfinished


def test_prepare_replaces_only_a_folder_it_wrote(tmp_path, raw_dir, processed):
    run_prepare(_cfg(raw_dir, processed, seed=99))  # its own folder: replaced
    assert "seed: 99" in (processed / "prepare_config.yaml").read_text() and (processed / DONE_MARKER).is_file()
    (tmp_path / "empty").mkdir()
    run_prepare(_cfg(raw_dir, tmp_path / "empty"))  # an empty folder holds nothing to lose
    assert verify_splits(tmp_path / "empty", ["eval/test"])

    theirs = tmp_path / "theirs"
    (theirs / "eval").mkdir(parents=True)
    (theirs / "notes.txt").write_text("mine")
    (theirs / "data_card.json").write_text("{}")  # a card alone does not make it ours: no marker
    with pytest.raises(DataError) as e:
        run_prepare(_cfg(raw_dir, theirs))
    msg = str(e.value)
    assert str(theirs) in msg and "not written by prepare_data.py" in msg and "--out-dir" in msg and "\n" not in msg
    assert (theirs / "notes.txt").read_text() == "mine" and not (theirs / "sft").exists()
    assert not list(tmp_path.glob("theirs.*"))  # refused before any work


# ----------------------------------------------------------------------------- download
def _archive(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(f"ECG-Expert-QA-abc123/{name}", data)
        z.writestr("ECG-Expert-QA-abc123/README.md", "readme")
    return buf.getvalue()


@pytest.fixture
def server(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www."""
    www = tmp_path / "www"
    www.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(www), **k)

        def log_message(self, *a):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_download_verifies_and_prepares(tmp_path, server):
    www, base = server
    src = write_raw(tmp_path / "src", tasks=["EBK", "PRTK"])
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    (www / "a.zip").write_bytes(_archive(files))
    expected = {n: git_blob_sha1(d)[:8] for n, d in files.items()}
    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text(json.dumps({"expected_blobs": expected}))
    raw = tmp_path / "raw"
    r = subprocess.run([sys.executable, "prepare_data.py", "--config", str(cfg_file), "--download",
                        "--download-url", f"{base}/a.zip", "--raw-dir", str(raw), "--out-dir", str(tmp_path / "out"),
                        "--tokenizer", ""], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert {p.name for p in raw.glob("*.json")} == set(files)
    assert (tmp_path / "out/eval/test.jsonl").is_file()


def test_download_rejects_wrong_file(tmp_path, server):
    from utils.data.download import download

    www, base = server
    (www / "a.zip").write_bytes(_archive({TASKS["EBK"].file: b'[{"Q": "tampered?", "A": "x."}]'}))
    raw = tmp_path / "raw"
    with pytest.raises(DataError, match="has git blob .* expected deadbeef: not the pinned commit"):
        download(raw, f"{base}/a.zip", {TASKS["EBK"].file: "deadbeef"})
    assert not raw.exists()
    with pytest.raises(DataError, match="download failed"):
        download(raw, f"{base}/missing.zip", {TASKS["EBK"].file: "deadbeef"})


def test_download_replaces_only_a_folder_it_made(tmp_path, server):
    from utils.data.download import download

    www, base = server
    src = write_raw(tmp_path / "src", tasks=["EBK"])
    files = {p.name: p.read_bytes() for p in src.iterdir()}
    (www / "a.zip").write_bytes(_archive(files))
    expected = {n: git_blob_sha1(d)[:8] for n, d in files.items()}
    raw = tmp_path / "raw"
    download(raw, f"{base}/a.zip", expected)
    marker = json.loads((raw / DOWNLOAD_MARKER).read_text())
    assert marker["url"] == f"{base}/a.zip" and marker["git_blobs"] == {n: git_blob_sha1(d) for n, d in files.items()}
    (raw / "stale.txt").write_text("from an older download")
    download(raw, f"{base}/a.zip", expected)  # its own folder: replaced whole
    assert not (raw / "stale.txt").exists() and (raw / DOWNLOAD_MARKER).is_file()

    shared = write_raw(tmp_path / "shared", tasks=["PRTK"])  # e.g. a shared copy of the data
    before = {p.name: p.read_bytes() for p in shared.iterdir()}
    cfg = _cfg(shared, tmp_path / "out", download=True, download_url=f"{base}/a.zip", expected_blobs=expected)
    for call in (lambda: download(shared, f"{base}/a.zip", expected), lambda: run_prepare(cfg)):
        with pytest.raises(DataError) as e:
            call()
        msg = str(e.value)
        assert str(shared) in msg and "not made by --download" in msg and "--raw-dir" in msg and "\n" not in msg
    assert {p.name: p.read_bytes() for p in shared.iterdir()} == before
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("shared.*"))


def test_pinned_blob_hashes_match_the_real_files(real_raw_dir):
    for p in real_raw_dir.glob("*.json"):
        task = next(t for t in TASKS.values() if t.file == p.name)
        assert git_blob_sha1(p.read_bytes()).startswith(task.blob), p.name


def test_git_blob_sha1_is_gits():
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert hashlib.sha1(b"blob 0\x00").hexdigest() == git_blob_sha1(b"")
