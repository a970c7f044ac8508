"""`vlsi-edge report`: join results documents (eval, bench, phone) by item id into `report.md`, a self-contained
`report.html` with inline SVG plots, and `report.json` with the joined numbers (BENCH.md "Accuracy" level 3, "Reports").

    vlsi-edge report demo-out/preds-teacher.json demo-out/preds-vlsi-student.json demo-out/bench-onnx.json \
        --run demo-out/vlsi --out demo-out/report

Accuracy is recomputed on the items every document shares (the intersection of ids), so every system and every
paired test sees the same items. Agreement is the share of those items whose parsed answers are equal (two parse
failures do not agree). A document without items (a speed-only benchmark) only feeds the latency and parity tables.
Torch-free (numpy and the standard library): it runs on devices.
"""
from __future__ import annotations

import html
import json
import math
import re
import shutil
from pathlib import Path

from vlsi_edge.data.scoring import mcnemar, paired_bootstrap, summarize
from vlsi_edge.errors import UserError
from vlsi_edge.fileio import publish_dir, staging_dir
from vlsi_edge.results import SCHEMA, SCHEMA_VERSION, read_results

LATENCY = {"preprocess_ms": "preprocess ms", "vision_ms": "vision ms", "prefill_ms": "prefill ms",
           "ttft_ms": "TTFT ms", "tpot_ms": "TPOT ms", "decode_tok_s": "decode tok/s", "e2e_ms": "e2e ms"}
COLOURS = ("#4269d0", "#efb118", "#ff725c", "#6cc5b0", "#3ca951", "#ff8ab7", "#a463f2", "#97bbf5")
PHONE_KIT = "vlsi_edge.benchmarks.phone_kit"


# ---------------------------------------------------------------------------------------------------- inputs
def load_documents(paths) -> list[tuple[str, dict]]:
    """[(path, results document)]; a folder is a collected phone run, read by `phone_kit.ingest_phone_results`."""
    if not paths:
        raise UserError("no results documents given", "e.g. vlsi-edge report preds-teacher.json preds-student.json "
                                                      "--out report")
    docs = []
    for path in map(Path, paths):
        if path.is_dir():
            try:
                from vlsi_edge.benchmarks.phone_kit import ingest_phone_results
            except ModuleNotFoundError as e:
                if e.name != PHONE_KIT:
                    raise
                raise UserError(f"{path} is a folder (a phone run), but phone results cannot be read: {PHONE_KIT} "
                                "is not available", "pass the phone run's results JSON instead") from None
            doc = ingest_phone_results(path)
            if doc.get("schema") != SCHEMA or doc.get("schema_version") != SCHEMA_VERSION:
                raise UserError(f"{path}: the phone run did not give a version {SCHEMA_VERSION} results document")
        else:
            doc = read_results(path)
        if not isinstance(doc.get("items"), list) or not isinstance(doc.get("system"), dict):
            raise UserError(f"{path} has no `items` list or no `system`", "regenerate it with vlsi-edge eval/bench")
        docs.append((str(path), doc))
    return docs


def load_matching(run: Path) -> dict | None:
    """The run's matching.json as heatmap snapshots (first and last window, or the total); None when absent."""
    run = Path(run)
    if not run.is_dir():
        raise UserError(f"--run {run}: no such run folder", "pass the --out folder of `vlsi-edge distill`")
    path = run / "matching.json"
    if not path.exists():
        return None
    try:
        d = json.loads(path.read_text())
        rows, cols, windows = list(d["student_layers"]), list(d["teacher_layers"]), list(d.get("windows") or [])
        snaps = [windows[0], windows[-1]] if len(windows) >= 2 else [{"counts": d["total"]}]
        snaps = [{"label": f"steps {w['start_step']}-{w['end_step']}" if "start_step" in w else "all steps",
                  "counts": [[int(c) for c in r] for r in w["counts"]]} for w in snaps]
    except (ValueError, KeyError, TypeError, IndexError) as e:
        raise UserError(f"{path} is not a matching log ({type(e).__name__}: {e})") from None
    for s in snaps:
        if len(s["counts"]) != len(rows) or any(len(r) != len(cols) for r in s["counts"]):
            raise UserError(f"{path}: counts are not {len(rows)} student x {len(cols)} teacher layers")
    return {"file": str(path), "student_layers": rows, "teacher_layers": cols, "window": d.get("window"),
            "n_windows": len(windows), "snapshots": snaps, "total": d["total"]}


# ------------------------------------------------------------------------------------------------------ join
def _systems(docs: list[tuple[str, dict]], teacher: str | None) -> list[dict]:
    names = [d["system"].get("name") or Path(p).stem for p, d in docs]
    systems = []
    for (path, doc), name in zip(docs, names):
        s = doc["system"]
        export = doc.get("producer") in ("bench", "phone") and s.get("backend") != "torch"
        systems.append({"name": name if names.count(name) == 1 else f"{name} ({Path(path).name})",
                        "system_name": name, "file": path, "producer": doc.get("producer"),
                        "role": s.get("role") or ("export" if export else "student"),
                        **{k: s.get(k) for k in ("backend", "target", "precision", "weights_fingerprint",
                                                 "tokenizer_fingerprint")}, "doc": doc})
    if teacher is not None:
        found = [s for s in systems if teacher in (s["name"], s["system_name"])]
        if not found:
            raise UserError(f"--teacher {teacher}: no input system has that name",
                            "systems: " + ", ".join(s["name"] for s in systems))
        for s in systems:
            s["role"] = "teacher" if s is found[0] else ("student" if s["role"] == "teacher" else s["role"])
    elif sum(s["role"] == "teacher" for s in systems) > 1:
        raise UserError("several inputs are teachers (" + ", ".join(s["name"] for s in systems
                                                                    if s["role"] == "teacher") + ")",
                        "pick one with --teacher NAME")
    return systems


def _check_inputs(systems: list[dict], teacher: dict | None) -> None:
    split_of = [(s, (s["doc"].get("data") or {}).get("split")) for s in systems]
    split_of = [(s, sp) for s, sp in split_of if sp is not None]
    for s, sp in split_of[1:]:
        if sp != split_of[0][1]:
            raise UserError(f"{s['file']} holds predictions for a different split ({sp!r}) than "
                            f"{split_of[0][0]['file']} ({split_of[0][1]!r})", "score every system on the same --split")
    for s in systems:
        if teacher is None or s is teacher or not (s["role"] == "export" or s["producer"] in ("bench", "phone")):
            continue
        a, b = s["tokenizer_fingerprint"], teacher["tokenizer_fingerprint"]
        if a and b and a != b:
            raise UserError(f"{s['file']} ({s['name']}) and the teacher {teacher['file']} ({teacher['name']}) use "
                            f"different tokenizers (tokenizer_fingerprint {a[:12]} vs {b[:12]})",
                            "compare systems exported from a student of the teacher's family")


def _join(systems: list[dict]) -> list[str]:
    for s in systems:
        s["items"] = {}
        for item in s["doc"]["items"]:
            key = str(item["id"])
            if key in s["items"]:
                raise UserError(f"{s['file']} lists item id {key!r} twice", "regenerate it with vlsi-edge eval/bench")
            s["items"][key] = item
    scored = [s for s in systems if s["items"]]
    if not scored:
        return []
    common = [i for i in scored[0]["items"] if all(i in s["items"] for s in scored[1:])]
    if not common:
        raise UserError("the results documents share no item ids (" + ", ".join(
            f"{s['file']}: {len(s['items'])} items" for s in scored) + ")",
            "evaluate every system on the same --data and --split")
    return common


def _compare(a: dict, b: dict, ids: list[str], clusters, kind: str, n_boot: int) -> dict:
    """Paired comparison of system `a` against reference `b` on the same item ids."""
    ca = [bool(a["items"][i]["correct"]) for i in ids]
    cb = [bool(b["items"][i]["correct"]) for i in ids]
    agree = sum(a["items"][i].get("parsed") is not None and a["items"][i].get("parsed") == b["items"][i].get("parsed")
                for i in ids)
    acc_a, acc_b = sum(ca) / len(ids), sum(cb) / len(ids)
    return {"system": a["name"], "reference": b["name"], "kind": kind, "n": len(ids), "acc": acc_a,
            "acc_reference": acc_b, "retention": acc_a / acc_b if acc_b else None, "agreement": agree / len(ids),
            "bootstrap": paired_bootstrap(ca, cb, clusters, n_boot=n_boot), "mcnemar": mcnemar(ca, cb)}


def _latency(s: dict) -> dict | None:
    lat = s["doc"].get("latency")
    if not isinstance(lat, dict):
        return None
    stats, roof = lat.get("stats") or {}, lat.get("roofline") or {}
    pick = lambda key, stat="median": (stats.get(key) or {}).get(stat)
    return {"system": s["name"], "backend": s["backend"], "precision": _precision(s["precision"]),
            "profile": lat.get("profile"), "runs": lat.get("runs"), "max_new_tokens": lat.get("max_new_tokens"),
            "load_ms": lat.get("load_ms"), **{k: pick(k) for k in LATENCY}, "ttft_p90": pick("ttft_ms", "p90"),
            "e2e_p90": pick("e2e_ms", "p90"), "peak_rss_mb": lat.get("peak_rss_mb"), "bundle_mb": lat.get("bundle_mb"),
            "roofline_fraction": roof.get("fraction"), "stats": stats}


PARITY_PARTS = ("vision_encoder", "token_embedding", "text_decoder")


def _failure_part(line: str) -> str | None:
    """The part a parity.json failure line names ('part: ...' or 'part (view): ...'); None for any other line."""
    head = re.match(r"\s*(\w+)", line)
    return head.group(1) if head and head.group(1) in PARITY_PARTS else None


def _parity(s: dict) -> dict | None:
    """The bundle's parity.json (export/parity.py `check` + the verdict pipeline.py adds) cut to what the report shows:
    per part its precision, gate and gated numbers, the failure lines naming it; per system the generation summary."""
    parity = s["doc"].get("parity")
    if not isinstance(parity, dict):
        return None
    sub = lambda d, key: d.get(key) if isinstance(d, dict) and isinstance(d.get(key), dict) else {}
    precisions, gates = sub(parity, "precisions"), sub(parity, "gates")
    failures = [str(f) for f in parity.get("failures") or []]
    vis, emb, dec = sub(parity, "vision_encoder"), sub(parity, "token_embedding"), sub(parity, "text_decoder")
    forced, steps = sub(dec, "teacher_forced"), sub(dec, "generation_steps")
    numbers = {"vision_encoder": {"cosine": vis.get("cosine"), "max_abs": vis.get("max_abs")},
               "token_embedding": {"max_abs": emb.get("max_abs")},
               "text_decoder": {"top1": forced.get("top1"), "mean_kl": forced.get("mean_kl"),
                                "max_abs": forced.get("max_abs"), "counted": forced.get("counted"),
                                "steps_top1": steps.get("top1")}}
    parts = [{"part": part, "precision": precisions.get(part), "gate": sub(gates, part), **numbers[part],
              "failures": [f for f in failures if _failure_part(f) == part]}
             for part in PARITY_PARTS if part in parity or part in precisions]
    gen = sub(parity, "generation")
    passed = parity.get("passed") if isinstance(parity.get("passed"), bool) else None
    return {"system": s["name"], "backend": parity.get("backend"), "passed": passed,
            "failures": failures, "other_failures": [f for f in failures if _failure_part(f) is None],
            "probes": parity.get("probes"), "exact_match": gen.get("exact_match"),
            "mean_common_prefix": gen.get("mean_common_prefix"), "length_ratio": gen.get("length_ratio"),
            "parts": parts}


def build_report(docs: list[tuple[str, dict]], teacher: str | None = None, matching: dict | None = None,
                 n_boot: int = 10000) -> dict:
    """The joined numbers (report.json) from [(path, results document)]; raises UserError on inputs that disagree."""
    if not docs:
        raise UserError("no results documents given")
    systems = _systems(docs, teacher)
    t = next((s for s in systems if s["role"] == "teacher"), None)
    _check_inputs(systems, t)
    ids = _join(systems)
    if not ids and not any(s["doc"].get("latency") for s in systems):
        raise UserError("the results documents hold no items and no latency: nothing to report")
    scored = [s for s in systems if s["items"]]
    notes = []
    clusters = None
    if ids and any(scored[0]["items"][i].get("cluster") is not None for i in ids):
        first = scored[0]["items"]
        clusters = [f"#item{i}" if first[i].get("cluster") is None else str(first[i]["cluster"]) for i in ids]
    for s in scored:
        if len(s["items"]) > len(ids):
            notes.append(f"{s['name']}: {len(s['items']) - len(ids)} of its {len(s['items'])} items are not in "
                         "every document and were left out")
    comparisons = []
    for s in scored:
        if t is not None and s is not t and t["items"]:
            comparisons.append(_compare(s, t, ids, clusters, "vs teacher", n_boot))
    for e in (s for s in scored if s["role"] == "export"):
        fp = e["weights_fingerprint"]
        ref = [s for s in scored if s is not e and s["role"] != "export" and fp and s["weights_fingerprint"] == fp]
        ref.sort(key=lambda s: s["role"] != "student")
        if not ref:
            notes.append(f"{e['name']}: no PyTorch eval with the same weights_fingerprint among the inputs; "
                         "export/PyTorch retention omitted")
            continue
        a, b = e["tokenizer_fingerprint"], ref[0]["tokenizer_fingerprint"]
        if a and b and a != b:
            raise UserError(f"{e['file']} ({e['name']}) and its PyTorch student {ref[0]['file']} use different "
                            f"tokenizers (tokenizer_fingerprint {a[:12]} vs {b[:12]})")
        comparisons.append(_compare(e, ref[0], ids, clusters, "export vs PyTorch", n_boot))
    if t is None:
        notes.append("no teacher among the inputs (system.role teacher or --teacher NAME): teacher comparisons omitted")
    return {
        "schema": "vlsi-edge/report", "version": 1, "inputs": [s["file"] for s in systems],
        "split": next((sp for s in systems if (sp := (s["doc"].get("data") or {}).get("split"))), None),
        "n_joined": len(ids), "teacher": t["name"] if t else None,
        "systems": [{**{k: s[k] for k in ("name", "file", "producer", "role", "backend", "target", "precision",
                                          "weights_fingerprint", "tokenizer_fingerprint")},
                     "n_file": len(s["items"]), "metrics": summarize([s["items"][i] for i in ids])}
                    for s in scored],
        "comparisons": comparisons,
        "latency": [row for row in map(_latency, systems) if row],
        "parity": [p for p in map(_parity, systems) if p],
        "matching": matching, "notes": notes,
    }


# ---------------------------------------------------------------------------------------------------- tables
def _precision(p) -> str | None:
    return ", ".join(f"{k}={v}" for k, v in p.items()) if isinstance(p, dict) else p


def _f(x, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return str(x)
    return str(x) if isinstance(x, int) else f"{x:.{digits}f}"


def _g(x) -> str:
    return "n/a" if x is None else f"{x:.4g}"


PARITY_HEADER = ["system", "part", "precision", "top-1 (teacher-forced)", "top-1 (generation steps)", "mean KL",
                 "max abs diff", "cosine", "probes", "exact match", "mean common prefix", "result"]
_AT_LEAST = ("top1", "cosine")  # gated from below; the others (max_abs, mean_kl) from above


def _gated(x, metric: str, gate: dict, fixed: int | None = None) -> str:
    """`x` with its gate threshold beside it, e.g. "0.995 (gate ≥ 0.99)"; the digits grow until the shown number
    falls on the same side of the gate as `x` (0.99987 never reads as 0.9999 against a 0.9999 gate)."""
    if x is None or isinstance(x, bool) or not isinstance(x, (int, float)):
        return "n/a"
    limit = gate.get("top1" if metric == "steps_top1" else metric)
    above = metric in _AT_LEAST or metric == "steps_top1"
    ok = lambda v: v >= limit if above else v <= limit
    for extra in range(12):
        shown = f"{x:.{fixed + extra}f}" if fixed is not None else f"{x:.{3 + extra}g}"
        if not isinstance(limit, (int, float)) or ok(float(shown)) == ok(x):
            break
    if not isinstance(limit, (int, float)):
        return shown
    return f"{shown} (gate {'≥' if above else '≤'} {limit:g})"


def _part_verdict(part: dict, passed) -> str:
    if part["failures"]:
        return "FAIL: " + "; ".join(f.strip()[len(part["part"]):].lstrip(": ") for f in part["failures"])
    return "n/a" if passed is None else "pass"


def _parity_rows(p: dict) -> list[list[str]]:
    """One row per part (its gated numbers, blank where a metric is not gated for that part) and a summary row."""
    rows = []
    for part in p["parts"]:
        cells = [_gated(part.get(metric), metric, part["gate"], fixed) if metric in part else ""
                 for metric, fixed in (("top1", 3), ("steps_top1", 3), ("mean_kl", None), ("max_abs", None),
                                       ("cosine", 5))]
        rows.append([p["system"], part["part"], _f(part["precision"]), *cells, "", "", "",
                     _part_verdict(part, p["passed"])])
    verdict = "n/a" if p["passed"] is None else ("pass" if p["passed"] else "FAIL")
    if p["other_failures"]:
        verdict = "FAIL: " + "; ".join(p["other_failures"])
    elif p["passed"] is False:
        verdict = f"FAIL ({len(p['failures'])} failure{'s' * (len(p['failures']) != 1)} above)"
    rows.append([p["system"], "all parts: greedy generation", "", "", "", "", "", "", _f(p["probes"]),
                 _f(p["exact_match"]), _f(p["mean_common_prefix"], 2), verdict])
    return rows


def tables(rep: dict) -> list[tuple[str, str, list[str], list[list[str]]]]:
    """(key, title, header, rows) of every table, shared by the Markdown and the HTML."""
    out = []
    systems = rep["systems"]
    if systems:
        out.append(("accuracy", "Accuracy", ["system", "role", "backend", "precision", "n", "acc", "CI low", "CI high",
                                 "parse failures", "items in file"],
                    [[s["name"], s["role"], _f(s["backend"]), _f(_precision(s["precision"])),
                      _f(s["metrics"]["overall"]["n"]), _f(s["metrics"]["overall"]["acc"]),
                      _f(s["metrics"]["overall"]["lo"]), _f(s["metrics"]["overall"]["hi"]),
                      _f(s["metrics"]["overall"]["parse_failure_rate"]), _f(s["n_file"])] for s in systems]))
        cats = sorted({c for s in systems for c in s["metrics"]["per_category"]})
        n_cat = {c: next(s["metrics"]["per_category"][c]["n"] for s in systems if c in s["metrics"]["per_category"])
                 for c in cats}
        out.append(("category", "Accuracy per category", ["system"] + [f"{c} (n={n_cat[c]})" for c in cats],
                    [[s["name"]] + [_f((s["metrics"]["per_category"].get(c) or {}).get("acc")) for c in cats]
                     for s in systems]))
    if rep["comparisons"]:
        out.append(("paired", "Paired comparisons", ["system", "reference", "comparison", "n", "acc", "acc reference",
                                           "difference", "diff CI low", "diff CI high", "bootstrap p",
                                           "McNemar b01", "McNemar b10", "McNemar p", "retention", "agreement"],
                    [[c["system"], c["reference"], c["kind"], _f(c["n"]), _f(c["acc"]), _f(c["acc_reference"]),
                      _f(c["bootstrap"]["diff"]), _f(c["bootstrap"]["lo"]), _f(c["bootstrap"]["hi"]),
                      _g(c["bootstrap"]["p"]), _f(c["mcnemar"]["b01"]), _f(c["mcnemar"]["b10"]), _g(c["mcnemar"]["p"]),
                      _f(c["retention"]), _f(c["agreement"])] for c in rep["comparisons"]]))
    if rep["latency"]:
        out.append(("latency", "Latency (medians over the timed runs)",
                    ["system", "backend", "precision", "profile", "runs", "load ms", *LATENCY.values(),
                     "TTFT p90 ms", "e2e p90 ms", "peak RSS MB", "bundle MB", "roofline fraction"],
                    [[r["system"], _f(r["backend"]), _f(r["precision"]), _f(r["profile"]), _f(r["runs"]),
                      _f(r["load_ms"], 1), *[_f(r[k], 2) for k in LATENCY], _f(r["ttft_p90"], 2), _f(r["e2e_p90"], 2),
                      _f(r["peak_rss_mb"], 1), _f(r["bundle_mb"], 2), _f(r["roofline_fraction"])]
                     for r in rep["latency"]]))
    if rep["parity"]:
        out.append(("parity", "Parity per part (export vs PyTorch; gates from the bundle's parity.json)",
                    PARITY_HEADER, [row for p in rep["parity"] for row in _parity_rows(p)]))
    m = rep["matching"]
    if m:
        out.append(("matching", "Layer matching counts over the run (student layer x teacher layer)",
                    ["student \\ teacher"] + [str(c) for c in m["teacher_layers"]],
                    [[str(r)] + [str(c) for c in row] for r, row in zip(m["student_layers"], m["total"])]))
    return out


def _header_lines(rep: dict) -> list[str]:
    return [(f"Split: {rep['split']}; items joined across every document: {rep['n_joined']}; "
             f"teacher: {rep['teacher'] or 'none'}."), "Inputs: " + ", ".join(rep["inputs"])]


def render_markdown(rep: dict) -> str:
    lines = ["# vlsi-edge report", "", *_header_lines(rep), "", "Plots are in report.html.", ""]
    for _, title, header, rows in tables(rep):
        lines += [f"## {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(c.replace("|", "\\|") for c in row) + " |" for row in rows]
        lines.append("")
    if rep["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in rep["notes"]] + [""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ SVG plots
def _e(s) -> str:
    return html.escape(str(s))


def _text(x: float, y: float, s, anchor: str = "middle", extra: str = "") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}"{extra}>{_e(s)}</text>'


def _svg(width: float, height: float, title: str, body: list[str]) -> str:
    heading = _text(width / 2, 16, title, extra=' font-weight="bold"')
    return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{width:.0f}" height="{height:.0f}" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" font-family="sans-serif" font-size="11">'
            f'<title>{_e(title)}</title>{heading}' + "".join(body) + "</svg>")


def _legend(names: list[str], x: float, y: float) -> list[str]:
    return [f'<rect x="{x:.1f}" y="{y + 16 * i:.1f}" width="10" height="10" fill="{COLOURS[i % len(COLOURS)]}"/>'
            + _text(x + 14, y + 9 + 16 * i, n, "start") for i, n in enumerate(names)]


def _short(s: str, n: int = 18) -> str:
    return s if len(s) <= n else s[:n - 1] + "…"


def bar_chart(title: str, groups: list[str], series: list[tuple], ymax: float = 1.0, ylabel: str = "accuracy") -> str:
    """Vertical grouped bars; `series` is [(name, values, lows, highs)], one value per group (None: no bar), and
    lows/highs (or None) draw CI error bars."""
    left, top, plot_h, group_w = 50, 30, 200, max(72, 20 * len(series) + 16)
    plot_w = group_w * len(groups)
    width, height = left + plot_w + 20 + (170 if len(series) > 1 else 0), top + plot_h + 40
    y = lambda v: top + plot_h * (1 - min(max(v, 0.0), ymax) / ymax)
    body = [f'<line x1="{left}" x2="{left + plot_w}" y1="{y(ymax * k / 5):.1f}" y2="{y(ymax * k / 5):.1f}" '
            f'stroke="#ddd"/>' + _text(left - 4, y(ymax * k / 5) + 4, f"{ymax * k / 5:.1f}", "end") for k in range(6)]
    body.append(_text(12, top + plot_h / 2, ylabel, extra=f' transform="rotate(-90 12 {top + plot_h / 2:.0f})"'))
    bar_w = (group_w - 16) / len(series)
    for g, group in enumerate(groups):
        x0 = left + g * group_w + 8
        for k, (name, values, lows, highs) in enumerate(series):
            v = values[g]
            if v is None:
                continue
            x = x0 + k * bar_w
            body.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bar_w - 2:.1f}" height="{y(0) - y(v):.1f}" '
                        f'fill="{COLOURS[k % len(COLOURS)]}"><title>{_e(name)} {_e(group)}: {v:.3f}</title></rect>')
            if lows and lows[g] is not None and highs[g] is not None:
                cx = x + (bar_w - 2) / 2
                body.append(f'<path d="M{cx:.1f},{y(lows[g]):.1f}V{y(highs[g]):.1f}M{cx - 4:.1f},{y(lows[g]):.1f}h8'
                            f'M{cx - 4:.1f},{y(highs[g]):.1f}h8" stroke="#222" fill="none"/>')
        body.append(_text(x0 + (group_w - 16) / 2, top + plot_h + 14, _short(group, group_w // 6)))
    body.append(f'<path d="M{left},{top}V{top + plot_h}H{left + plot_w}" stroke="#444" fill="none"/>')
    if len(series) > 1:
        body += _legend([s[0] for s in series], left + plot_w + 20, top)
    return _svg(width, height, title, body)


def stacked_chart(title: str, labels: list[str], parts: list[tuple[str, list]], unit: str = "ms") -> str:
    """Horizontal stacked bars, one per label; `parts` is [(name, values)]."""
    left, top, plot_w, bar_h = 150, 30, 420, 22
    totals = [sum(v[i] or 0.0 for _, v in parts) for i in range(len(labels))]
    raw = max(max(totals, default=0.0), 1e-9) / 5
    step = next(m * 10 ** math.floor(math.log10(raw)) for m in (1, 2, 2.5, 5, 10)
                if m * 10 ** math.floor(math.log10(raw)) >= raw)
    xmax = step * 5
    x = lambda v: left + plot_w * v / xmax
    plot_h = len(labels) * (bar_h + 8)
    body = [f'<line x1="{x(step * k):.1f}" x2="{x(step * k):.1f}" y1="{top}" y2="{top + plot_h}" stroke="#ddd"/>'
            + _text(x(step * k), top + plot_h + 14, f"{step * k:g}") for k in range(6)]
    body.append(_text(left + plot_w / 2, top + plot_h + 30, unit))
    for i, label in enumerate(labels):
        yy, acc = top + i * (bar_h + 8) + 4, 0.0
        body.append(_text(left - 6, yy + bar_h / 2 + 4, _short(label, 24), "end"))
        for k, (name, values) in enumerate(parts):
            v = values[i] or 0.0
            body.append(f'<rect x="{x(acc):.1f}" y="{yy}" width="{x(acc + v) - x(acc):.1f}" height="{bar_h}" '
                        f'fill="{COLOURS[k % len(COLOURS)]}"><title>{_e(label)} {_e(name)}: {v:.2f} {unit}</title>'
                        '</rect>')
            acc += v
    body += _legend([p[0] for p in parts], left + plot_w + 36, top)
    return _svg(left + plot_w + 140, max(top + plot_h + 40, top + 16 * len(parts) + 10), title, body)


def log_bar_chart(title: str, groups: list[str], series: list[tuple], ylabel: str, gate_name: str = "gate") -> str:
    """Vertical grouped bars on a log10 axis (decade ticks); `series` is [(name, values, gates)], one value and one
    gate (or None) per group. A bar runs from the axis floor up to its value, a gate is a dashed red line across the
    bar, and an exact zero, which a log axis cannot place, is written as "0" on the floor."""
    left, top, plot_h, group_w = 64, 30, 200, max(96, 22 * len(series) + 16)
    plot_w = group_w * len(groups)
    seen = [v for _, values, gates in series for v in (*values, *gates) if isinstance(v, (int, float)) and v > 0]
    lo = math.floor(math.log10(min(seen, default=1e-6))) - 1
    hi = max(math.floor(math.log10(max(seen, default=1.0))) + 1, lo + 2)
    y = lambda v: top + plot_h * (hi - math.log10(v)) / (hi - lo)
    floor = top + plot_h
    step = max(1, math.ceil((hi - lo) / 8))
    body = [f'<line x1="{left}" x2="{left + plot_w}" y1="{y(10.0 ** k):.1f}" y2="{y(10.0 ** k):.1f}" stroke="#ddd"/>'
            + _text(left - 4, y(10.0 ** k) + 4, f"1e{k}", "end") for k in range(lo, hi + 1, step)]
    body.append(_text(12, top + plot_h / 2, ylabel, extra=f' transform="rotate(-90 12 {top + plot_h / 2:.0f})"'))
    bar_w = (group_w - 16) / len(series)
    any_gate = False
    for g, group in enumerate(groups):
        x0 = left + g * group_w + 8
        for k, (name, values, gates) in enumerate(series):
            v, gate, x = values[g], gates[g], x0 + k * bar_w
            if isinstance(v, (int, float)) and v > 0:
                body.append(f'<rect x="{x:.1f}" y="{y(v):.1f}" width="{bar_w - 2:.1f}" height="{floor - y(v):.1f}" '
                            f'fill="{COLOURS[k % len(COLOURS)]}"><title>{_e(name)} {_e(group)}: {v:.3g}</title></rect>')
            elif v == 0:
                body.append(_text(x + (bar_w - 2) / 2, floor - 4, "0", extra=f' fill="{COLOURS[k % len(COLOURS)]}"'))
            if isinstance(gate, (int, float)) and gate > 0:
                any_gate = True
                body.append(f'<line x1="{x - 1:.1f}" x2="{x + bar_w - 1:.1f}" y1="{y(gate):.1f}" y2="{y(gate):.1f}" '
                            f'stroke="#d00" stroke-width="2" stroke-dasharray="4 2"><title>{_e(name)} {_e(group)}: '
                            f'{_e(gate_name)} {gate:g}</title></line>')
        for i, line in enumerate(group.split("\n")):
            body.append(_text(x0 + (group_w - 16) / 2, floor + 14 + 12 * i, _short(line, group_w // 6)))
    body.append(f'<path d="M{left},{top}V{floor}H{left + plot_w}" stroke="#444" fill="none"/>')
    legend = _legend([s[0] for s in series], left + plot_w + 20, top)
    if any_gate:
        yy = top + 16 * len(series)
        legend += [f'<line x1="{left + plot_w + 20}" x2="{left + plot_w + 30}" y1="{yy + 5}" y2="{yy + 5}" '
                   'stroke="#d00" stroke-width="2" stroke-dasharray="4 2"/>' + _text(left + plot_w + 34, yy + 9,
                                                                                      gate_name, "start")]
    lines = max(len(g.split("\n")) for g in groups)
    return _svg(left + plot_w + 190, max(floor + 8 + 12 * lines, top + 16 * (len(series) + 1) + 10), title,
                body + legend)


def heatmap(title: str, counts: list[list[int]], rows: list, cols: list) -> str:
    """Counts as shaded cells (student layers down, teacher layers across), each with its number."""
    cell = max(16, min(32, 480 // max(len(cols), 1)))
    left, top = 60, 60
    vmax = max((c for r in counts for c in r), default=0) or 1
    body = [_text(left + cell * len(cols) / 2, top - 18, "teacher layer"),
            _text(14, top + cell * len(rows) / 2, "student layer",
                  extra=f' transform="rotate(-90 14 {top + cell * len(rows) / 2:.0f})"')]
    body += [_text(left + (j + 0.5) * cell, top - 4, c) for j, c in enumerate(cols)]
    for i, (r, row) in enumerate(zip(rows, counts)):
        body.append(_text(left - 6, top + (i + 0.5) * cell + 4, r, "end"))
        for j, c in enumerate(row):
            f = c / vmax
            rgb = ",".join(str(round(255 - (255 - t) * f)) for t in (8, 81, 156))
            body.append(f'<rect x="{left + j * cell}" y="{top + i * cell}" width="{cell}" height="{cell}" '
                        f'fill="rgb({rgb})" stroke="#fff"><title>student {r}, teacher {cols[j]}: {c}</title></rect>')
            if cell >= 20:
                body.append(_text(left + (j + 0.5) * cell, top + (i + 0.5) * cell + 4, c,
                                  extra=f' fill="{"#fff" if f > 0.5 else "#222"}" font-size="9"'))
    return _svg(max(left + cell * len(cols) + 20, 260), top + cell * len(rows) + 20, title, body)


def plots(rep: dict) -> list[tuple[str, str]]:
    """(table key, SVG) of every plot; each is drawn under the heading of its table."""
    out, systems = [], rep["systems"]
    if systems:
        ov = [s["metrics"]["overall"] for s in systems]
        out.append(("accuracy", bar_chart(f"Accuracy with 95% CI (n={rep['n_joined']})", [s["name"] for s in systems],
                             [("accuracy", [o["acc"] for o in ov], [o["lo"] for o in ov], [o["hi"] for o in ov])])))
        cats = sorted({c for s in systems for c in s["metrics"]["per_category"]})
        out.append(("category", bar_chart("Accuracy per category", cats,
                             [(s["name"], [(s["metrics"]["per_category"].get(c) or {}).get("acc") for c in cats],
                               None, None) for s in systems])))
    if rep["latency"]:
        lat = rep["latency"]
        decode = [r["e2e_ms"] - r["ttft_ms"] if r["e2e_ms"] is not None and r["ttft_ms"] is not None else None
                  for r in lat]
        out.append(("latency", stacked_chart("Latency breakdown per request (medians)",
                                 [f"{r['system']}" for r in lat],
                                 [("preprocess", [r["preprocess_ms"] for r in lat]),
                                  ("vision", [r["vision_ms"] for r in lat]),
                                  ("prefill", [r["prefill_ms"] for r in lat]), ("decode", decode)])))
    drawn = [p for p in rep["parity"] if any(isinstance(part.get("max_abs"), (int, float)) for part in p["parts"])]
    if drawn:
        label = {"vision_encoder": "vision_encoder\n(image embeds)", "token_embedding": "token_embedding\n(embeds)",
                 "text_decoder": "text_decoder\n(logits, forced)"}
        names = [n for n in PARITY_PARTS if any(part["part"] == n for p in drawn for part in p["parts"])]
        part_of = lambda p, n: next((part for part in p["parts"] if part["part"] == n), {})
        out.append(("parity", log_bar_chart(
            "Parity per part: max |export - PyTorch| (log scale, lower is better)", [label[n] for n in names],
            [(p["system"], [part_of(p, n).get("max_abs") for n in names],
              [(part_of(p, n).get("gate") or {}).get("max_abs") for n in names]) for p in drawn],
            "max abs diff", "gate (max abs)")))
    m = rep["matching"]
    for snap in (m or {}).get("snapshots", []):
        out.append(("matching", heatmap(f"Layer matching, {snap['label']}", snap["counts"], m["student_layers"],
                                        m["teacher_layers"])))
    return out


CSS = """body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse;margin:0.5em 0 1.5em}
td,th{border:1px solid #ccc;padding:2px 6px;font-size:13px;text-align:right}
td:first-child,th:first-child{text-align:left}
.plot{display:inline-block;margin:0.5em 1em 1em 0;vertical-align:top}"""


def render_html(rep: dict) -> str:
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8"><title>vlsi-edge report</title>',
             f"<style>{CSS}</style></head><body>", "<h1>vlsi-edge report</h1>"]
    parts += [f"<p>{_e(line)}</p>" for line in _header_lines(rep)]
    figures = plots(rep)
    for key, title, header, rows in tables(rep):
        parts.append(f"<h2>{_e(title)}</h2>")
        parts += [f'<figure class="plot">{svg}</figure>' for k, svg in figures if k == key]
        parts += ["<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header)
                  + "</tr></thead><tbody>"]
        parts += ["<tr>" + "".join(f"<td>{_e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</tbody></table>")
    if rep["notes"]:
        parts += ["<h2>Notes</h2><ul>"] + [f"<li>{_e(n)}</li>" for n in rep["notes"]] + ["</ul>"]
    return "\n".join(parts + ["</body></html>", ""])


# ---------------------------------------------------------------------------------------------------- write
def write_report(inputs, out, run=None, teacher: str | None = None, overwrite: bool = False,
                 n_boot: int = 10000) -> Path:
    """Join `inputs` and publish OUT/{report.md, report.html, report.json} at once; returns OUT/report.html."""
    out = Path(out)
    if out.exists() and not overwrite and not (out.is_dir() and not any(out.iterdir())):
        raise UserError(f"output {out} already exists", "pass --overwrite or choose another --out")
    rep = build_report(load_documents(inputs), teacher=teacher, matching=load_matching(run) if run else None,
                       n_boot=n_boot)
    text = {"report.json": json.dumps(rep, indent=1) + "\n", "report.md": render_markdown(rep),
            "report.html": render_html(rep)}
    tmp = staging_dir(out)
    try:
        for name, body in text.items():
            (tmp / name).write_text(body, encoding="utf-8")
        publish_dir(tmp, out, overwrite, lambda: UserError(f"output {out} appeared while writing the report",
                                                           "pass --overwrite or choose another --out"))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out / "report.html"
