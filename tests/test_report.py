"""`vlsi-edge report` on small synthetic results documents: the join by item id, agreement, retention and paired
tests against direct calls of `scoring`; the files it writes; one-line errors that leave no output on inputs that
disagree; and the HTML as headless Chromium renders it (plots and table numbers in the DOM, an error page fails)."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import types
from html.parser import HTMLParser
from pathlib import Path

import pytest
from vlsi_edge.benchmarks.report import PARITY_HEADER, build_report, load_documents, tables
from vlsi_edge.export import parity as PAR

from vlsi_edge.cli import main
from vlsi_edge.data.scoring import mcnemar, paired_bootstrap, summarize
from vlsi_edge.results import make_results

N = 20
TEACHER = [i % 5 != 0 for i in range(N)]           # 16 / 20 right
STUDENT = [i % 5 not in (0, 1) for i in range(N)]  # 12 / 20 right
EXPORT = [i % 5 not in (0, 1) and i != 2 for i in range(N)]  # 11 / 20 right
TOK, FP = "tok" * 8, "w" * 16


def _items(correct, ids=None, unparsed=()):
    ids = list(range(N)) if ids is None else ids
    return [{"id": f"q{i}", "category": "colour" if i % 2 else "count", "cluster": f"img{i // 2}",
             "question": f"question {i}", "gold": "red", "raw": "red" if correct[i] else "blue",
             "parsed": None if i in unparsed else ("red" if correct[i] else "blue"), "correct": correct[i]}
            for i in ids]


PRECISIONS = {"vision_encoder": "fp16", "token_embedding": "fp32", "text_decoder": "fp16"}


def _parity(precisions=None, top1=0.995, backend="ort"):
    """A bundle's parity.json as export/parity.py `check` measures it and export/pipeline.py completes it."""
    precisions = precisions if isinstance(precisions, dict) else PRECISIONS
    counted = 200
    report = {"probes": 6,
              "vision_encoder": {"cosine": 0.99987, "max_abs": 0.0123},
              "token_embedding": {"max_abs": 0.0},
              "text_decoder": {"teacher_forced": {"n": 206, "counted": counted, "max_abs": 0.0871, "top1": top1,
                                                  "mean_kl": 0.00042},
                               "generation_steps": {"n": 23, "counted": 22, "max_abs": 0.0412, "top1": 1.0,
                                                    "mean_kl": 0.00031}},
              "generation": {"exact_match": 5 / 6, "mean_common_prefix": 3.5, "length_ratio": 1.0},
              "distinct_images": {"reference": True, "bundle": True, "first_step_logits": True}}
    failures = PAR.verdict(report, precisions)
    report.update({"backend": backend, "precisions": precisions, "passed": not failures, "failures": failures,
                   "gates": {part: PAR.GATES[name] for part, name in precisions.items()}})
    return report


def _doc(name, role, correct, producer="eval", split="test", ids=None, unparsed=(), **system):
    items = _items(correct, ids, unparsed)
    system = {"name": name, "role": role, "backend": "torch", "tokenizer_fingerprint": TOK, **system}
    extra = {}
    if producer == "bench":
        stats = {k: {"mean": v, "median": v, "p90": v * 1.2, "p99": v * 1.5, "stdev": 0.1} for k, v in
                 {"preprocess_ms": 1.25, "vision_ms": 12.5, "prefill_ms": 20.0, "ttft_ms": 33.75, "tpot_ms": 5.0,
                  "decode_tok_s": 200.0, "e2e_ms": 108.75}.items()}
        extra = {"latency": {"profile": "quick", "runs": 10, "warmup": 1, "max_new_tokens": 16, "load_ms": 250.0,
                             "stats": stats, "peak_rss_mb": 321.5, "bundle_mb": 4.25,
                             "roofline": {"bytes_per_token": 1e6, "achieved_gb_s": 0.2, "bandwidth_gb_s": 10.0,
                                          "fraction": 0.02}},
                 "parity": _parity(system.get("precision"))}
    return make_results(producer, system, {"spec": "builtin:shapes", "split": split}, items, summarize(items),
                        **extra)


def _write(tmp_path: Path, name: str, doc: dict) -> str:
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(doc))
    return str(path)


@pytest.fixture
def inputs(tmp_path):
    """teacher, student (2 extra items, one parse failure) and its ORT export (bench, latency + parity)."""
    teacher = _doc("teacher", "teacher", TEACHER, weights_fingerprint="t" * 16)
    student = _doc("student", "student", STUDENT + [True, True], ids=list(range(N + 2)), unparsed=(5,),
                   weights_fingerprint=FP)
    export = _doc("student-ort", "export", EXPORT, producer="bench", backend="ort",
                  precision=PRECISIONS, weights_fingerprint=FP)
    teacher["items"].reverse()  # the join is by id, not by position
    return [_write(tmp_path, n, d) for n, d in (("teacher", teacher), ("student", student), ("export", export))]


def _matching(run: Path) -> Path:
    run.mkdir()
    windows = [{"start_step": 10 * w, "end_step": 10 * w + 10, "counts": [[w, 1, 0], [0, 2 + w, w]]} for w in range(3)]
    total = [[sum(w["counts"][i][j] for w in windows) for j in range(3)] for i in range(2)]
    (run / "matching.json").write_text(json.dumps({"student_layers": [0, 1], "teacher_layers": [0, 1, 2],
                                                   "window": 10, "windows": windows, "total": total}))
    return run


def _pair(rep, system, kind):
    return next(c for c in rep["comparisons"] if c["system"] == system and c["kind"] == kind)


def test_join_agreement_retention_and_paired_tests(inputs):
    rep = build_report(load_documents(inputs), n_boot=2000)
    assert rep["n_joined"] == N and rep["teacher"] == "teacher" and rep["split"] == "test"
    acc = {s["name"]: s["metrics"]["overall"]["acc"] for s in rep["systems"]}
    assert acc == {"teacher": 0.8, "student": 0.6, "student-ort": 0.55}
    student = next(s for s in rep["systems"] if s["name"] == "student")
    assert student["n_file"] == N + 2 and student["metrics"]["overall"]["parse_failure_rate"] == 1 / N
    assert any("2 of its 22 items" in n for n in rep["notes"])

    vs_teacher = _pair(rep, "student", "vs teacher")
    assert vs_teacher["retention"] == pytest.approx(0.6 / 0.8)
    # equal parsed answers: both right (12) + both "blue" where both wrong (i % 5 == 0: 4), minus item 5's failure
    assert vs_teacher["agreement"] == pytest.approx((12 + 4 - 1) / N)
    clusters = [f"img{i // 2}" for i in range(N)]
    direct = paired_bootstrap(STUDENT, TEACHER, clusters, n_boot=2000)
    assert vs_teacher["bootstrap"]["diff"] == pytest.approx(-0.2) == pytest.approx(direct["diff"])
    assert vs_teacher["bootstrap"]["p"] == direct["p"] and vs_teacher["bootstrap"]["lo"] == direct["lo"]
    assert vs_teacher["mcnemar"] == mcnemar(STUDENT, TEACHER)
    assert (vs_teacher["mcnemar"]["b01"], vs_teacher["mcnemar"]["b10"]) == (4, 0)  # student wrong, teacher right

    exp = _pair(rep, "student-ort", "export vs PyTorch")  # paired through the weights fingerprint
    assert exp["reference"] == "student" and exp["retention"] == pytest.approx(0.55 / 0.6)
    assert exp["bootstrap"]["diff"] == pytest.approx(-0.05)
    assert exp["mcnemar"] == mcnemar(EXPORT, STUDENT) and exp["mcnemar"]["p"] == 1.0
    assert _pair(rep, "student-ort", "vs teacher")["retention"] == pytest.approx(0.55 / 0.8)

    lat = rep["latency"][0]
    assert (lat["system"], lat["backend"], lat["ttft_ms"], lat["roofline_fraction"]) == ("student-ort", "ort", 33.75,
                                                                                        0.02)
    (par,) = rep["parity"]
    parts = {p["part"]: p for p in par["parts"]}
    assert (par["system"], par["passed"], par["probes"], par["exact_match"]) == ("student-ort", True, 6, 5 / 6)
    assert parts["vision_encoder"]["precision"] == "fp16" and parts["vision_encoder"]["cosine"] == 0.99987
    assert parts["text_decoder"]["top1"] == 0.995 and parts["text_decoder"]["gate"] == PAR.GATES["fp16"]
    rows = _parity_table(rep)
    assert [r["part"] for r in rows] == ["vision_encoder", "token_embedding", "text_decoder",
                                         "all parts: greedy generation"]  # one row per part, one summary row
    dec, summary = rows[2], rows[3]
    assert (dec["top-1 (teacher-forced)"], dec["top-1 (generation steps)"]) == ("0.995 (gate ≥ 0.99)",
                                                                                "1.000 (gate ≥ 0.99)")
    assert dec["mean KL"] == "0.00042 (gate ≤ 0.001)" and dec["max abs diff"] == "0.0871" and dec["cosine"] == ""
    assert rows[0]["cosine"] == "0.99987 (gate ≥ 0.999)" and rows[1]["max abs diff"] == "0 (gate ≤ 0.001)"
    assert all(r["result"] == "pass" for r in rows)
    assert (summary["probes"], summary["exact match"], summary["mean common prefix"]) == ("6", "0.833", "3.50")


def _parity_table(rep) -> list[dict]:
    (table,) = [t for t in tables(rep) if t[0] == "parity"]
    assert table[2] == PARITY_HEADER
    return [dict(zip(PARITY_HEADER, row)) for row in table[3]]


def test_parity_failures_land_on_their_part(tmp_path):
    """An fp32 decoder gate (top-1 1.0, max abs 1e-3) fails the fixture's decoder; the other parts still pass, and
    a value is never rounded onto the other side of its gate (0.9996 is not shown as 1.000 against >= 1)."""
    precisions = {**PRECISIONS, "text_decoder": "fp32"}
    doc = _doc("ort", "export", EXPORT, producer="bench", backend="ort", precision=precisions)
    doc["parity"] = _parity(precisions, top1=0.9996)
    rep = build_report(load_documents([_write(tmp_path, "ort", doc)]), n_boot=200)
    assert rep["parity"][0]["passed"] is False and len(rep["parity"][0]["failures"]) == 3
    rows = {r["part"]: r for r in _parity_table(rep)}
    dec = rows["text_decoder"]
    assert dec["top-1 (teacher-forced)"] == "0.9996 (gate ≥ 1)" and dec["max abs diff"] == "0.0871 (gate ≤ 0.001)"
    assert dec["result"].startswith("FAIL: (teacher_forced): top-1 agreement 0.9996 < 1.0")
    assert "(generation_steps): max abs logit diff 0.0412 > 0.001" in dec["result"]
    assert rows["vision_encoder"]["result"] == rows["token_embedding"]["result"] == "pass"
    assert rows["all parts: greedy generation"]["result"] == "FAIL (3 failures above)"


def test_no_teacher_omits_teacher_comparisons(inputs):
    rep = build_report(load_documents(inputs[1:]), n_boot=200)
    assert rep["teacher"] is None and all(c["kind"] == "export vs PyTorch" for c in rep["comparisons"])
    rep = build_report(load_documents(inputs[1:]), teacher="student", n_boot=200)  # --teacher names one
    assert rep["teacher"] == "student" and _pair(rep, "student-ort", "vs teacher")["reference"] == "student"


def test_cli_writes_md_html_json(inputs, tmp_path, capsys):
    out = tmp_path / "report"
    rc = main(["report", *inputs, "--run", str(_matching(tmp_path / "run")), "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    assert capsys.readouterr().out.strip() == str(out / "report.html")
    assert sorted(p.name for p in out.iterdir()) == ["report.html", "report.json", "report.md"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report")]
    rep = json.loads((out / "report.json").read_text())
    assert rep["n_joined"] == N and len(rep["matching"]["snapshots"]) == 2
    md = (out / "report.md").read_text()
    assert "| student | teacher | vs teacher | 20 | 0.600 | 0.800 | -0.200 |" in md and "| 33.75 |" in md
    assert "| student-ort | text_decoder | fp16 | 0.995 (gate ≥ 0.99) | 1.000 (gate ≥ 0.99) |" in md
    page = (out / "report.html").read_text()
    # accuracy, per category, latency, parity per part, matching first + last window
    assert page.count('class="plot"') == 6 and "Parity per part: max |export - PyTorch|" in page
    assert "<script" not in page and "http://" not in page.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert main(["report", *inputs, "--out", str(out)]) == 2  # exists: refused without --overwrite
    assert main(["report", *inputs[:2], "--out", str(out), "--overwrite"]) == 0
    assert json.loads((out / "report.json").read_text())["latency"] == []


def _one_line_error(capsys, rc, *needles):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


BAD = {
    "other_split": (lambda: _doc("student", "student", STUDENT, split="val"), ["different split", "'val'", "'test'",
                                                                              "teacher.json", "bad.json"]),
    "other_tokenizer": (lambda: _doc("ort", "export", EXPORT, producer="bench", backend="ort",
                                     tokenizer_fingerprint="other" * 4), ["different tokenizers", "bad.json",
                                                                          "teacher.json"]),
    "no_shared_ids": (lambda: _doc("student", "student", STUDENT + STUDENT, ids=list(range(N, 2 * N))),
                      ["share no item ids"]),
    "old_schema": (lambda: {**_doc("student", "student", STUDENT), "schema_version": 0}, ["schema version 0"]),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_inputs_are_one_line_and_write_nothing(case, tmp_path, capsys):
    make, needles = BAD[case]
    teacher = _write(tmp_path, "teacher", _doc("teacher", "teacher", TEACHER))
    out = tmp_path / "out" / "report"
    rc = main(["report", teacher, _write(tmp_path, "bad", make()), "--out", str(out)])
    _one_line_error(capsys, rc, *needles)
    assert not (tmp_path / "out").exists()


def test_cli_refuses_missing_inputs_and_unknown_teacher(inputs, tmp_path, capsys):
    out = tmp_path / "report"
    with pytest.raises(SystemExit) as e:
        main(["report", "--out", str(out)])
    assert e.value.code == 2 and len(capsys.readouterr().err.strip().splitlines()) == 1
    _one_line_error(capsys, main(["report", *inputs, "--teacher", "nobody", "--out", str(out)]), "--teacher nobody")
    _one_line_error(capsys, main(["report", str(tmp_path / "nope.json"), "--out", str(out)]), "not found")
    _one_line_error(capsys, main(["report", *inputs, "--run", str(tmp_path / "no-run"), "--out", str(out)]),
                    "no such run folder")
    second = _write(tmp_path, "teacher2", _doc("teacher2", "teacher", TEACHER))
    _one_line_error(capsys, main(["report", *inputs, second, "--out", str(out)]), "several inputs are teachers")
    assert not out.exists()


def test_phone_run_folder(inputs, tmp_path, capsys, monkeypatch):
    phone = tmp_path / "phone-run"
    phone.mkdir()
    monkeypatch.setitem(sys.modules, "vlsi_edge.benchmarks.phone_kit", None)  # the module is not there
    _one_line_error(capsys, main(["report", inputs[0], str(phone), "--out", str(tmp_path / "r")]),
                    "phone results cannot be read")
    doc = _doc("student-pte", "export", EXPORT, producer="phone", backend="executorch", weights_fingerprint=FP)
    kit = types.SimpleNamespace(ingest_phone_results=lambda path: doc)
    monkeypatch.setitem(sys.modules, "vlsi_edge.benchmarks.phone_kit", kit)
    rep = build_report(load_documents([*inputs[:2], str(phone)]), n_boot=200)
    assert _pair(rep, "student-pte", "export vs PyTorch")["acc"] == 0.55


# ------------------------------------------------------------------------------------- headless Chromium DOM
class _Dom(HTMLParser):
    """Counts elements whose class holds "plot" (and the <svg> inside them) and collects <td> texts."""

    def __init__(self):
        super().__init__()
        self.plots, self.svgs_in_plots, self.cells, self._td, self._depth = 0, 0, [], None, 0

    def handle_starttag(self, tag, attrs):
        if "plot" in (dict(attrs).get("class") or "").split():
            self.plots += 1
            self._depth = 1
        elif self._depth:
            self._depth += 1
            self.svgs_in_plots += tag == "svg"
        if tag == "td":
            self._td = ""

    def handle_endtag(self, tag):
        if self._depth:
            self._depth -= 1
        if tag == "td" and self._td is not None:
            self.cells.append(self._td.strip())
            self._td = None

    def handle_data(self, data):
        if self._td is not None:
            self._td += data


def _dump_dom(url: str, profile: Path) -> str:
    cmd = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--disable-component-update", "--no-first-run", f"--user-data-dir={profile}", "--dump-dom", url]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=90).stdout


def _dom_ok(dom: str, plots: int, numbers: list[str]) -> bool:
    parser = _Dom()
    parser.feed(dom)
    return parser.plots == plots and parser.svgs_in_plots == plots and all(n in parser.cells for n in numbers)


@pytest.mark.skipif(shutil.which("chromium") is None, reason="chromium is not on PATH (apt-get install chromium)")
def test_html_renders_in_headless_chromium(inputs, tmp_path):
    out = tmp_path / "report"
    assert main(["report", *inputs, "--run", str(_matching(tmp_path / "run")), "--out", str(out)]) == 0
    # acc, CI bound, difference, p-value, TTFT, peak RSS, parity: decoder top-1 and vision cosine with their gates,
    # a matching count
    rep = json.loads((out / "report.json").read_text())
    p = f"{_pair(rep, 'student', 'vs teacher')['mcnemar']['p']:.4g}"
    numbers = ["0.800", "0.600", "0.550", "-0.200", p, "33.75", "321.5", "0.995 (gate ≥ 0.99)",
               "0.99987 (gate ≥ 0.999)", "9"]
    page = out / "report.html"
    assert _dom_ok(_dump_dom(page.as_uri(), tmp_path / "profile"), 6, numbers)
    # an error page (missing file) and a half-written page must fail the same check
    assert not _dom_ok(_dump_dom((tmp_path / "missing.html").as_uri(), tmp_path / "profile"), 6, numbers)
    broken = tmp_path / "broken.html"
    broken.write_text(page.read_text()[: len(page.read_text()) // 3])
    assert not _dom_ok(_dump_dom(broken.as_uri(), tmp_path / "profile"), 6, numbers)
