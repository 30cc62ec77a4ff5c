"""prepare_data: the eleven raw shapes, cleaning rules, labels, the split, bad input, download."""

import hashlib
import http.server
import io
import json
import subprocess
import sys
import threading
import zipfile
from collections import Counter

import pytest

from tests.conftest import ROOT
from tests.fixtures import shapes, write_raw
from utils.core.config import load_config
from utils.data.download import git_blob_sha1
from utils.data.prepare import PrepareConfig, run_prepare
from utils.data.raw import TASKS, CleanOptions, load_raw
from utils.data.rows import DataError
from utils.data.split import near_duplicate_groups, split_records
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
    assert {"CD", "CK", "EBK"} <= set(held)  # tasks with distinct questions reach the held-out splits
    groups_by_split = {k: {r["group"] for r in v} for k, v in a.items()}
    assert not groups_by_split["train"] & (groups_by_split["test"] | groups_by_split["validation"])


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


def test_real_split_has_no_leak(real):
    """No test question, nor a near-duplicate of one (word Jaccard >= threshold), is in train: checked by
    brute force over every test x train pair, independently of the prefix filter the split uses."""
    _, rows, cfg = real
    test = [frozenset(words(r["question"])) for r in rows if r["split"] == "test"]
    train = [frozenset(words(r["question"])) for r in rows if r["split"] == "train"]
    assert test and train
    t = cfg.near_duplicate_threshold
    # Size filter first (Jaccard >= t needs |a| >= t|b|), then the exact measure.
    by_len: dict[int, list[frozenset]] = {}
    for s in train:
        by_len.setdefault(len(s), []).append(s)
    leaks = 0
    for a in test:
        for n, group in by_len.items():
            if min(n, len(a)) < t * max(n, len(a)):
                continue
            leaks += sum(1 for b in group if len(a & b) >= t * len(a | b))
    assert leaks == 0


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


def test_pinned_blob_hashes_match_the_real_files(real_raw_dir):
    for p in real_raw_dir.glob("*.json"):
        task = next(t for t in TASKS.values() if t.file == p.name)
        assert git_blob_sha1(p.read_bytes()).startswith(task.blob), p.name


def test_git_blob_sha1_is_gits():
    assert git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"
    assert hashlib.sha1(b"blob 0\x00").hexdigest() == git_blob_sha1(b"")
