"""`klstream report` and `klstream top` on a real run scored over HTTP by the emulator.

The data the page embeds is decoded here with numpy and checked against the run's own tables;
the page itself is opened from disk in headless Chromium (Debian's chromium and chromium-driver,
driven by selenium) and checked as a user would see it.
"""

from __future__ import annotations

import base64
import gzip
import json
import math
import re
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from cli import invoke as cli
from cli import start_process
from hypothesis import given
from hypothesis import strategies as st
from test_lookahead import toy_prices

from klstream.emulator import EmulatorServer, FaultConfig
from klstream.errors import KlstreamError
from klstream.output.report import (
    FLAG_ERROR,
    FLAG_OUTSIDE_TOPK,
    FLAG_TOP1_DIFFERS,
    FLAG_UNSCORED,
    KL_SCALE,
    LOGPROB_UNITS,
    LOGRATIO_SCALE,
    PAYLOAD_MAGIC,
    LogScale,
    ReportOptions,
    SignedLogScale,
    build_payload,
    parse_response_key,
    write_report,
)
from klstream.storage.database import connect
from klstream.storage.rundir import RunDir
from klstream.storage.sqlfiles import load_sql

if TYPE_CHECKING:
    from conftest import ToyInputs

CLEAN = "toy-d0.5"
FLAKY = "toy-d1"
THREE = ("toy-d0.2", "toy-d0.5", "toy-d1")
"""The Model 2s of the priced run, in the report's (alphabetical) order."""
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
ResponseKey = tuple[str, int]


@dataclass(frozen=True)
class Run:
    run_dir: Path
    hazard: ResponseKey
    """The response whose text does not match its tokens."""


@pytest.fixture(scope="session")
def scored_run(toy_inputs: ToyInputs, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """The toy inputs (one response's text altered) scored by two Model 2s over HTTP: one clean,
    one behind 503s without retries, so that it has failures."""
    root = tmp_path_factory.mktemp("report-run")
    inputs = root / "inputs"
    shutil.copytree(toy_inputs.directory, inputs)
    altered = inputs / "story-1.json"
    document = json.loads(altered.read_text(encoding="utf-8"))
    document["responses"][1]["text"] += " (edited)"
    altered.write_text(json.dumps(document), encoding="utf-8")
    run_dir = root / "run"
    assert cli("explode", inputs, "-o", run_dir).exit_code == 0
    with EmulatorServer() as server:
        clean = cli("score", run_dir, "--model2", CLEAN, "--base-url", server.base_url)
        assert clean.exit_code == 0, clean.output
        server.set_faults(FaultConfig(rate_503=0.15, seed=5))
        flaky = cli(
            "score", run_dir, "--model2", FLAKY, "--base-url", server.base_url, "--max-retries", 0
        )
    assert flaky.exit_code == 6 and "remain unscored" in flaky.output, flaky.output
    return Run(run_dir, ("story-1", 1))


@pytest.fixture(scope="session")
def priced_run(toy_inputs: ToyInputs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The toy inputs scored by three Model 2s over HTTP, with lookahead (the default, so one
    request answers several positions) and at list prices."""
    root = tmp_path_factory.mktemp("priced-run")
    run_dir = root / "run"
    assert cli("explode", toy_inputs.directory, "-o", run_dir).exit_code == 0
    prices = toy_prices(root)
    with EmulatorServer() as server:
        for model2 in THREE:
            result = cli(
                "score",
                run_dir,
                "--model2",
                model2,
                "--base-url",
                server.base_url,
                "--prices",
                prices,
            )
            assert result.exit_code == 0, result.output
    return run_dir


# --- the payload, decoded as the page decodes it ----------------------------------------------


@dataclass(frozen=True)
class Decoded:
    header: dict[str, Any]
    arrays: dict[str, np.ndarray]

    def tokens(self, name: str = "tokens") -> list[str]:
        dictionary = self.header["dictionary"]
        return [dictionary[i] for i in self.arrays[name]]


def decode(html: str) -> Decoded:
    """Unpack the page's payload: base64, gzip, then the header and typed arrays."""
    found = re.search(r'<script id="klstream-data" type="application/octet-stream">([^<]*)<', html)
    assert found is not None
    raw = gzip.decompress(base64.b64decode(found.group(1)))
    assert raw[:4] == PAYLOAD_MAGIC
    length = int.from_bytes(raw[4:8], "little")
    header = json.loads(raw[8 : 8 + length])
    base = math.ceil((8 + length) / 8) * 8
    arrays = {}
    for name, (dtype, at, n) in header["sections"].items():
        item = np.dtype(dtype).newbyteorder("<")
        planes = np.frombuffer(raw, np.uint8, count=n * item.itemsize, offset=base + at)
        arrays[name] = planes.reshape(item.itemsize, n).T.copy().view(item).reshape(n)
    return Decoded(header, arrays)


def report_of(run: Run, tmp_path: Path, options: ReportOptions | None = None) -> Decoded:
    result = write_report(run.run_dir, tmp_path / "report.html", options)
    return decode(result.path.read_text(encoding="utf-8"))


def query(run_dir: Path, sql: str, params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    with closing(connect(run_dir)) as con:
        rows: list[dict[str, Any]] = con.sql(sql, params=params or {}).to_arrow_table().to_pylist()
        return rows


def model_index(decoded: Decoded, model2: str) -> int:
    index: int = decoded.header["models"].index(model2)
    return index


def keys_in_order(run_dir: Path) -> list[ResponseKey]:
    rows = query(run_dir, "SELECT stem, response_index FROM responses ORDER BY ALL")
    return [(r["stem"], r["response_index"]) for r in rows]


def test_response_table_matches_the_runs_statistics(scored_run: Run, tmp_path: Path) -> None:
    decoded = report_of(scored_run, tmp_path)
    a, header = decoded.arrays, decoded.header
    assert header["models"] == [CLEAN, FLAKY]
    keys = keys_in_order(scored_run.run_dir)
    stems = [header["stems"][s] for s in a["response/stem"]]
    assert list(zip(stems, a["response/index"].tolist(), strict=True)) == keys
    responses = query(scored_run.run_dir, "SELECT * FROM responses ORDER BY stem, response_index")
    assert list(a["response/num_tokens"]) == [r["num_tokens"] for r in responses]
    assert [header["prompts"][p] for p in a["response/prompt"]] == [r["prompt"] for r in responses]
    hazards = [keys[row] for row in np.flatnonzero(a["response/match_text"] == 0)]
    assert hazards == [scored_run.hazard]
    for model2 in (CLEAN, FLAKY):
        m = model_index(decoded, model2)
        stats = query(
            scored_run.run_dir,
            "SELECT * FROM response_stats WHERE model2 = $m ORDER BY stem, response_index",
            {"m": model2},
        )
        assert [(s["stem"], s["response_index"]) for s in stats] == keys
        for name in ("mean_kl", "max_kl", "total_kl"):
            np.testing.assert_allclose(a[f"response/{m}/{name}"], [s[name] for s in stats])
        failed = query(
            scored_run.run_dir,
            "SELECT stem, response_index, count(*) FILTER (WHERE status = 'error') AS n "
            "FROM kl WHERE model2 = $m GROUP BY ALL ORDER BY ALL",
            {"m": model2},
        )
        assert list(a[f"response/{m}/failed"]) == [r["n"] for r in failed]
        assert list(a[f"response/{m}/scored"]) == [s["num_scored"] for s in stats]
    assert a["response/1/failed"].sum() > 0 and a["response/0/failed"].sum() == 0


def test_every_position_carries_its_token_quantized_values_and_flags(
    scored_run: Run, tmp_path: Path
) -> None:
    decoded = report_of(scored_run, tmp_path)
    a = decoded.arrays
    positions = query(
        scored_run.run_dir, "SELECT token FROM positions ORDER BY stem, response_index, position"
    )
    assert decoded.tokens() == [p["token"] for p in positions]
    assert int(a["response/offset"][-1]) == len(positions)
    for model2 in (CLEAN, FLAKY):
        m = model_index(decoded, model2)
        kl = query(
            scored_run.run_dir,
            "SELECT *, kl_floor / nullif(entropy1 + entropy2, 0) AS normalized FROM kl "
            "WHERE model2 = $m ORDER BY stem, response_index, position",
            {"m": model2},
        )
        for column, name, scale in (
            ("kl_floor", "kl", KL_SCALE),
            ("normalized", "normalized", KL_SCALE),
            ("logratio", "logratio", LOGRATIO_SCALE),
        ):
            want = np.array([np.nan if r[column] is None else r[column] for r in kl])
            got = scale.decode(a[f"{name}/{m}"])
            assert np.array_equal(np.isnan(got), np.isnan(want))
            present = ~np.isnan(want)
            inside = present & (np.abs(want) >= 10**scale.low)
            np.testing.assert_allclose(got[inside], want[inside], rtol=0.06)
            assert np.all(np.abs(got[present & ~inside]) <= 10**scale.low)
        flags = a[f"flags/{m}"]
        assert [bool(f & FLAG_ERROR) for f in flags] == [r["status"] == "error" for r in kl]
        assert [bool(f & FLAG_UNSCORED) for f in flags] == [r["status"] == "unscored" for r in kl]
        assert [bool(f & FLAG_OUTSIDE_TOPK) for f in flags] == [
            r["m1_token_in_m2_topk"] is False for r in kl
        ]
        assert [bool(f & FLAG_TOP1_DIFFERS) for f in flags] == [
            r["top1_agree"] is False for r in kl
        ]
    errors = query(
        scored_run.run_dir,
        "SELECT model2, error FROM (SELECT *, row_number() OVER (PARTITION BY model2 "
        "ORDER BY stem, response_index, position) - 1 AS row_at FROM kl) WHERE status = 'error' "
        "ORDER BY model2, row_at",
    )
    assert errors and all(e["model2"] == FLAKY for e in errors)
    messages = decoded.header["error_messages"]
    assert [messages[i] for i in a["errors/message"]] == [e["error"] for e in errors]
    failed_positions = np.flatnonzero(a[f"flags/{model_index(decoded, FLAKY)}"] & FLAG_ERROR)
    assert list(a["errors/position"]) == list(failed_positions)


def test_detail_goes_to_named_then_most_divergent_responses_within_budget(
    scored_run: Run, tmp_path: Path
) -> None:
    keys = keys_in_order(scored_run.run_dir)
    ranking = query(
        scored_run.run_dir,
        "SELECT stem, response_index, min(least(a, b)) AS best FROM (SELECT stem, "
        "response_index, rank() OVER (PARTITION BY model2 ORDER BY mean_kl DESC) AS a, "
        "rank() OVER (PARTITION BY model2 ORDER BY max_kl DESC) AS b FROM response_stats) "
        "GROUP BY ALL ORDER BY best, stem, response_index",
    )
    lengths = dict(
        zip(
            keys,
            (
                r["num_tokens"]
                for r in query(
                    scored_run.run_dir,
                    "SELECT num_tokens FROM responses ORDER BY stem, response_index",
                )
            ),
            strict=True,
        )
    )
    named = (keys[-1][0], keys[-1][1])
    budget = lengths[keys[0]] + lengths[keys[1]] + 3
    decoded = report_of(
        scored_run, tmp_path, ReportOptions(detail=(named,), detail_positions=budget)
    )
    chosen = [keys[row] for row in decoded.header["detail_rows"]]
    expected: list[ResponseKey] = [named]
    left = budget
    for r in ranking:
        key = (r["stem"], r["response_index"])
        if lengths[key] > left:
            break
        if key != named:
            expected.append(key)
            left -= lengths[key]
    assert chosen == expected and len(chosen) >= 2
    assert sum(lengths[k] for k in chosen[1:]) <= budget


def test_detail_carries_both_models_top_k_and_exact_values(scored_run: Run, tmp_path: Path) -> None:
    decoded = report_of(scored_run, tmp_path)
    a = decoded.arrays
    keys = keys_in_order(scored_run.run_dir)
    assert decoded.header["detail_rows"], "the demo-sized run fits the default budget"
    row = decoded.header["detail_rows"][0]
    stem, index = keys[row]
    d = 0
    start = int(a["detail/offset"][d])
    positions = query(
        scored_run.run_dir,
        "SELECT * FROM positions WHERE stem = $s AND response_index = $i ORDER BY position",
        {"s": stem, "i": index},
    )
    m1_tokens = decoded.tokens("detail/m1/tokens")
    for offset, pos in enumerate(positions):
        at = start + offset
        lo, hi = a["detail/m1/offset"][at], a["detail/m1/offset"][at + 1]
        assert m1_tokens[lo:hi] == pos["top_tokens"]
        assert list(a["detail/m1/logprobs"][lo:hi]) == [
            round(lp * LOGPROB_UNITS) for lp in pos["top_logprobs"]
        ]
    for model2 in (CLEAN, FLAKY):
        m = model_index(decoded, model2)
        answers = query(
            scored_run.run_dir,
            "SELECT p.position, s.top_tokens, s.top_logprobs, k.kl_floor, k.kl_lower, k.logratio "
            "FROM positions p JOIN kl k USING (stem, response_index, position) "
            "LEFT JOIN (SELECT * FROM scores_resolved WHERE status = 'ok' AND model2 = $m) s "
            "USING (stem, response_index, position) WHERE k.model2 = $m AND p.stem = $s "
            "AND p.response_index = $i ORDER BY p.position",
            {"m": model2, "s": stem, "i": index},
        )
        tokens = decoded.tokens(f"detail/{m}/tokens")
        for offset, answer in enumerate(answers):
            at = start + offset
            lo, hi = a[f"detail/{m}/offset"][at], a[f"detail/{m}/offset"][at + 1]
            assert tokens[lo:hi] == (answer["top_tokens"] or [])
            assert list(a[f"detail/{m}/logprobs"][lo:hi]) == [
                round(lp * LOGPROB_UNITS) for lp in answer["top_logprobs"] or []
            ]
            for column in ("kl_floor", "kl_lower", "logratio"):
                value = a[f"detail/{m}/{column}"][at]
                if answer[column] is None:
                    assert np.isnan(value)
                else:
                    assert value == pytest.approx(answer[column], rel=1e-5, abs=1e-7)


def test_summary_histogram_and_top_tokens(scored_run: Run, tmp_path: Path) -> None:
    decoded = report_of(scored_run, tmp_path)
    header = decoded.header
    for m, model2 in enumerate(header["models"]):
        summary = header["summaries"][m]
        kl = query(scored_run.run_dir, "SELECT * FROM kl WHERE model2 = $m", {"m": model2})
        values = [r["kl_floor"] for r in kl if r["kl_floor"] is not None]
        assert summary["positions"] == len(kl) and summary["scored"] == len(values)
        assert summary["mean_kl"] == pytest.approx(float(np.mean(values)))
        assert summary["outside_topk"] == sum(r["m1_token_in_m2_topk"] is False for r in kl)
        (costs,) = query(scored_run.run_dir, "SELECT * FROM costs WHERE model2 = $m", {"m": model2})
        assert summary["cost"]["requests"] == costs["requests"] > 0
        assert sum(header["histogram_counts"][m]) == len(values)
        positive = [v for v in values if v > 0]
        bins = [max(-80, min(19, math.floor(math.log10(v) * 10))) for v in positive]
        for b, n in zip(header["histogram"][m], header["histogram_counts"][m], strict=True):
            assert n == (bins.count(b) if b is not None else len(values) - len(positive))
        top = header["top_tokens"][m]
        assert [t["kl"] for t in top] == sorted(values, reverse=True)[: len(top)]
    keys = keys_in_order(scored_run.run_dir)
    first = header["top_tokens"][0][0]
    assert keys[first["row"]] == (first["stem"], first["response_index"])


def export_figures(output: str) -> dict[str, str]:
    """The figures ``klstream export`` prints, as printed (thousands separators dropped)."""
    patterns = {
        "positions": r"Positions:\s+([\d,]+)\s+scored ([\d,]+), failed ([\d,]+), unscored ([\d,]+)",
        "mean_kl": r"Mean +KLD:\s+(\S+) ± +(\S+)",
        "kl_estimate": r"Mean KL estimate:\s+(\S+) ± +(\S+)",
        "requests": r"Requests:\s+([\d,]+) .*input tokens ([\d,]+) uncached \+ ([\d,]+) cached, "
        r"output tokens ([\d,]+)",
        "usd": r"Cost \(list\):\s+\$([\d.]+) \(batch \$([\d.]+)\)",
    }
    found = {}
    for name, pattern in patterns.items():
        match = re.search(pattern, output)
        assert match is not None, f"{name} not in:\n{output}"
        found[name] = " ".join(group.replace(",", "") for group in match.groups())
    return found


def test_report_figures_are_what_the_cli_prints(priced_run: Path, tmp_path: Path) -> None:
    """Requests, tokens, USD, mean KL and kl_estimate with their standard errors, and the scored
    counts: the report carries what `klstream export` prints and the costs view holds, also on a
    lookahead run, where summing the scores' attempts counts a request once per step."""
    header = decode(write_report(priced_run, tmp_path / "r.html").path.read_text()).header
    assert header["models"] == list(THREE)
    for m, model2 in enumerate(THREE):
        shown = header["summaries"][m]
        printed = cli("export", priced_run, "-o", tmp_path / model2, "--model2", model2)
        assert printed.exit_code == 0, printed.output
        cli_figures = export_figures(printed.output)
        (costs,) = query(priced_run, "SELECT * FROM costs WHERE model2 = $m", {"m": model2})
        (attempts,) = query(
            priced_run, "SELECT sum(attempts) AS n FROM scores WHERE model2 = $m", {"m": model2}
        )
        assert attempts["n"] > costs["requests"], "lookahead steps share their request"
        assert shown["requests"] == int(cli_figures["requests"].split()[0]) == costs["requests"]
        shown_figures = {
            "positions": f"{shown['positions']} {shown['scored']} {shown['failed']} "
            f"{shown['unscored']}",
            "mean_kl": f"{shown['mean_kl']:.6f} {shown['mean_kl_stderr']:.6f}",
            "kl_estimate": f"{shown['mean_kl_estimate']:.6f} "
            f"{shown['mean_kl_estimate_stderr']:.6f}",
            "requests": f"{shown['requests']} {shown['uncached_input_tokens']} "
            f"{shown['cached_input_tokens']} {shown['output_tokens']}",
            "usd": f"{shown['usd']:.4f} {shown['batch_usd']:.4f}",
        }
        assert shown_figures == cli_figures
        for name in ("requests", "output_tokens", "thoughts_tokens", "usd", "batch_usd"):
            assert shown[name] == costs[name]
        assert shown["usage_recorded"] and shown["priced_as"] == "toy"


def test_title_names_the_inputs_and_the_models(priced_run: Path, tmp_path: Path) -> None:
    page = write_report(priced_run, tmp_path / "r.html").path.read_text()
    title = "klstream: story-0, story-1, story-2 — toy vs toy-d0.2, toy-d0.5, toy-d1"
    assert decode(page).header["title"] == title
    assert f"<title>{title}</title>" in page and f"<h1>{title}</h1>" in page


def test_kl_estimate_per_response_per_position_and_in_detail(
    priced_run: Path, tmp_path: Path
) -> None:
    decoded = decode(write_report(priced_run, tmp_path / "r.html").path.read_text())
    a = decoded.arrays
    for m, model2 in enumerate(THREE):
        stats = query(
            priced_run,
            "SELECT mean_kl_estimate FROM response_stats WHERE model2 = $m "
            "ORDER BY stem, response_index",
            {"m": model2},
        )
        np.testing.assert_allclose(
            a[f"response/{m}/mean_kl_estimate"], [r["mean_kl_estimate"] for r in stats]
        )
        kl = query(
            priced_run,
            "SELECT kl_estimate FROM kl WHERE model2 = $m ORDER BY stem, response_index, position",
            {"m": model2},
        )
        exact = np.array([r["kl_estimate"] for r in kl], dtype=np.float64)
        assert not np.isnan(exact).any()
        shown = KL_SCALE.decode(a[f"estimate/{m}"])
        inside = (exact >= 1e-8) & (exact <= 100)
        half_step = 10 ** (KL_SCALE.step / 2)
        assert np.all(shown[inside] / exact[inside] <= half_step * (1 + 1e-9))
        assert np.all(exact[inside] / shown[inside] <= half_step * (1 + 1e-9))
        offsets = a["response/offset"]
        in_detail_order = np.concatenate(
            [exact[offsets[row] : offsets[row + 1]] for row in decoded.header["detail_rows"]]
        )
        np.testing.assert_allclose(a[f"detail/{m}/kl_estimate"], in_detail_order, rtol=1e-6)
        assert decoded.header["thresholds"][m]["estimate"] > 0


@given(st.floats(min_value=1e-8, max_value=100.0))
def test_log_scale_keeps_values_within_half_a_step(value: float) -> None:
    scale = LogScale(-8.0, 2.0)
    decoded = float(scale.decode(scale.encode(np.array([value])))[0])
    assert abs(math.log10(decoded) - math.log10(value)) <= scale.step / 2 + 1e-12


@given(st.floats(min_value=-100.0, max_value=100.0))
def test_signed_log_scale_keeps_sign_and_magnitude(value: float) -> None:
    scale = SignedLogScale(-4.0, 2.0)
    decoded = float(scale.decode(scale.encode(np.array([value])))[0])
    if abs(value) < 10**scale.low:
        assert decoded == 0.0
    else:
        assert math.copysign(1, decoded) == math.copysign(1, value)
        assert abs(math.log10(abs(decoded)) - math.log10(abs(value))) <= scale.step / 2 + 1e-12


def test_scales_keep_null_and_clamp_out_of_range() -> None:
    codes = KL_SCALE.encode(np.array([np.nan, 0.0, 1e-12, 1e6]))
    assert list(codes) == [0, 1, 1, 255]
    assert list(LOGRATIO_SCALE.encode(np.array([np.nan, 0.0, 1e9, -1e9]))) == [0, 128, 255, 1]


def test_page_for_one_response_and_its_errors(scored_run: Run, tmp_path: Path) -> None:
    keys = keys_in_order(scored_run.run_dir)
    stem, index = keys[-1]
    result = cli(
        "report", scored_run.run_dir, "--response", f"{stem}:{index}", "-o", tmp_path / "one.html"
    )
    assert result.exit_code == 0, result.output
    assert "1 responses" in result.output and "1 with top-k detail" in result.output
    decoded = decode((tmp_path / "one.html").read_text(encoding="utf-8"))
    assert decoded.header["detail_rows"] == [0]
    assert decoded.header["meta"]["page_of"] == [f"{stem}:{index}"]
    assert list(decoded.arrays["response/index"]) == [index]
    missing = cli("report", scored_run.run_dir, "--response", "nope:3")
    assert missing.exit_code == 1 and "has no response nope:3" in missing.output
    bad = cli("report", scored_run.run_dir, "--detail", "no-index")
    assert bad.exit_code == 1 and "STEM:INDEX" in bad.output
    assert parse_response_key("a:b:12") == ("a:b", 12)
    with pytest.raises(KlstreamError, match="no KL results"):
        empty = tmp_path / "empty"
        shutil.copytree(scored_run.run_dir, empty, ignore=shutil.ignore_patterns("kl", "scores"))
        build_payload(empty)


def test_run_writes_the_report_beside_the_results_unless_told_not_to(
    toy_inputs: ToyInputs, tmp_path: Path
) -> None:
    outputs = {}
    with EmulatorServer() as server:
        for name, extra in (("with", []), ("without", ["--no-report"])):
            result = cli(
                "run",
                "--input-dir",
                toy_inputs.directory,
                "--output-dir",
                tmp_path / name,
                "--model2",
                CLEAN,
                "--max-files",
                1,
                "--base-url",
                server.base_url,
                *extra,
            )
            assert result.exit_code == 0, result.output
            outputs[name] = result.output
    page = tmp_path / "with" / "report.html"
    assert f"-> {page}" in outputs["with"] and "report:" not in outputs["without"]
    assert decode(page.read_text(encoding="utf-8")).header["models"] == [CLEAN]
    assert not (tmp_path / "without" / "report.html").exists()


# --- klstream top -----------------------------------------------------------------------------

INDEPENDENT_TOP = """
WITH k AS (
    SELECT *, CASE WHEN $score = 'kl' THEN kl_floor
                   WHEN $score = 'estimate' THEN kl_estimate
                   ELSE kl_floor / nullif(entropy1 + entropy2, 0) END AS s
    FROM read_parquet($kl_path)
),
p AS (
    SELECT stem, response_index, position, token,
        string_agg(token, '') OVER (PARTITION BY stem, response_index ORDER BY position
            ROWS BETWEEN $n PRECEDING AND 1 PRECEDING) AS before,
        string_agg(token, '') OVER (PARTITION BY stem, response_index ORDER BY position
            ROWS BETWEEN 1 FOLLOWING AND $n FOLLOWING) AS after
    FROM read_parquet($positions_path)
)
SELECT k.stem, k.response_index, k.position, k.token, k.kl_floor, k.kl_estimate, k.s,
       coalesce(p.before, '') AS before, coalesce(p.after, '') AS after
FROM k JOIN p USING (stem, response_index, position)
WHERE k.s IS NOT NULL AND k.s >= $lo AND k.s <= $hi
ORDER BY k.s DESC, k.stem, k.response_index, k.position
LIMIT $limit
"""


@pytest.mark.parametrize(
    ("score", "lo", "hi", "limit", "context"),
    [
        ("kl", 0.05, 0.4, 7, 3),
        ("normalized", 0.0, 0.2, 12, 0),
        ("kl", 0.0, 100.0, 500, 5),
        ("estimate", 0.02, 0.5, 9, 2),
    ],
)
def test_top_matches_an_independent_duckdb_query(
    scored_run: Run, score: str, lo: float, hi: float, limit: int, context: int
) -> None:
    run = RunDir(scored_run.run_dir)
    result = cli(
        "top",
        scored_run.run_dir,
        "--model2",
        CLEAN,
        "--score",
        score,
        "--min",
        lo,
        "--max",
        hi,
        "--limit",
        limit,
        "--context",
        context,
        "--format",
        "json",
    )
    assert result.exit_code == 0, result.output
    got = [json.loads(line) for line in result.output.splitlines()]
    want = (
        duckdb.connect()
        .sql(
            INDEPENDENT_TOP,
            params={
                "score": score,
                "lo": lo,
                "hi": hi,
                "limit": limit,
                "n": max(context, 1),
                "kl_path": str(run.kl_path(CLEAN)),
                "positions_path": str(run.positions),
            },
        )
        .fetchall()
    )
    assert got and len(got) == len(want)
    column = {"normalized": "normalized_kl", "estimate": "kl_estimate"}.get(score, "kl")
    for row, (stem, index, position, token, kl, estimate, s, before, after) in zip(
        got, want, strict=True
    ):
        assert (row["stem"], row["response_index"], row["position"]) == (stem, index, position)
        assert row["token"] == token and row["kl"] == pytest.approx(kl)
        assert row["kl_estimate"] == pytest.approx(estimate) and estimate is not None
        assert row[column] == pytest.approx(s)
        assert (row["context_before"], row["context_after"]) == (
            (before, after) if context else ("", "")
        )


def test_top_writes_parquet_and_a_table(scored_run: Run, tmp_path: Path) -> None:
    target = tmp_path / "top.parquet"
    result = cli(
        "top",
        scored_run.run_dir,
        "--model2",
        FLAKY,
        "--limit",
        4,
        "--format",
        "parquet",
        "-o",
        target,
    )
    assert result.exit_code == 0 and f"wrote 4 rows to {target}" in result.output
    rows = pq.read_table(target).to_pylist()
    kl = query(
        scored_run.run_dir,
        "SELECT kl_floor FROM kl WHERE model2 = $m AND kl_floor IS NOT NULL "
        "ORDER BY kl_floor DESC LIMIT 4",
        {"m": FLAKY},
    )
    assert [r["kl"] for r in rows] == [r["kl_floor"] for r in kl]
    table = cli("top", scored_run.run_dir, "--model2", FLAKY, "--limit", 4)
    assert table.exit_code == 0
    assert f"{rows[0]['stem']}:{rows[0]['response_index']}@{rows[0]['position']}" in table.output
    head, _, first, *_ = table.output.splitlines()
    assert head.split()[:4] == ["#", "kl", "kl/(H1+H2)", "kl_estimate"]
    assert first.split()[3] == f"{rows[0]['kl_estimate']:.6f}"
    several = cli("top", scored_run.run_dir)
    assert several.exit_code == 4 and "choose one with --model2" in several.output
    nothing = cli("top", scored_run.run_dir, "--model2", FLAKY, "--min", 1e9)
    assert "(no position in that range)" in nothing.output


# --- the page in a real browser ---------------------------------------------------------------


@pytest.fixture
def browser() -> Iterator[Any]:
    """Headless Chromium from Debian's packages, through selenium; skipped only without them."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip(
            "needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
            "/usr/bin/chromedriver): apt-get install -y chromium chromium-driver"
        )
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    profile = tempfile.mkdtemp(prefix="klstream-test-chromium-")
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1100",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL", "performance": "ALL"})
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)


def requests_by_document(driver: Any) -> list[tuple[str, str]]:
    """(document, URL) of every request in the browser's network log since the last call."""
    requests = []
    for entry in driver.get_log("performance"):
        message = json.loads(entry["message"])["message"]
        if message["method"] == "Network.requestWillBeSent":
            params = message["params"]
            requests.append((params.get("documentURL", ""), params["request"]["url"]))
    return requests


def test_report_in_headless_chromium(scored_run: Run, tmp_path: Path, browser: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    page = write_report(scored_run.run_dir, tmp_path / "report.html").path
    browser.get(page.as_uri())
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.documentElement.dataset.ready") == "true"
    )

    # No console errors, nothing fetched but the file itself.
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == []
    requests = requests_by_document(browser)
    assert not [url for _, url in requests if re.match(r"(https?|wss?|ftp):", url)], requests
    ours = [url for document, url in requests if document == page.as_uri()]
    assert page.as_uri() in ours
    assert all(url == page.as_uri() or url.startswith("data:") for url in ours), ours
    assert browser.execute_script("return performance.getEntriesByType('resource').length") == 0

    # The overview has a column per Model 2; the response table is ranked by mean KL.
    heads = [th.text for th in browser.find_elements(By.CSS_SELECTOR, "#summary-table thead th")]
    assert heads == ["Figure", CLEAN, FLAKY]
    by_mean = query(
        scored_run.run_dir,
        "SELECT stem, response_index FROM response_stats WHERE model2 = $m ORDER BY mean_kl DESC",
        {"m": CLEAN},
    )
    shown = [a.text for a in browser.find_elements(By.CSS_SELECTOR, "#response-table tbody a")]
    assert shown == [f"{r['stem']}:{r['response_index']}" for r in by_mean]
    mean_header = browser.find_element(By.CSS_SELECTOR, "#response-table th[data-sort=mean]")
    assert mean_header.get_attribute("aria-sort") == "descending"

    # Hovering the run's highest-KL token shows both models' top-k with the Parquet's numbers.
    (top,) = query(
        scored_run.run_dir,
        "SELECT stem, response_index, position, kl_floor FROM kl WHERE model2 = $m "
        "ORDER BY kl_floor DESC LIMIT 1",
        {"m": CLEAN},
    )
    keys = keys_in_order(scored_run.run_dir)
    row = keys.index((top["stem"], top["response_index"]))
    browser.find_element(By.CSS_SELECTOR, f'#response-table a[href="#response={row}"]').click()
    WebDriverWait(browser, 5).until(
        lambda d: (
            f"{top['stem']}:{top['response_index']}"
            in d.find_element(By.CSS_SELECTOR, "#heatmap-head h3").text
        )
    )
    token = browser.find_element(By.CSS_SELECTOR, f"#tokens .tok[data-pos='{top['position']}']")
    ActionChains(browser).move_to_element(token).perform()
    panel = browser.find_element(By.ID, "token-detail")
    WebDriverWait(browser, 5).until(
        lambda d: f"at position {top['position']}" in panel.find_element(By.TAG_NAME, "h3").text
    )
    key = {"s": top["stem"], "i": top["response_index"], "p": top["position"]}
    where = "stem = $s AND response_index = $i AND position = $p"
    (m1,) = query(scored_run.run_dir, f"SELECT * FROM positions WHERE {where}", key)
    lists = {"m1": (m1["top_tokens"], m1["top_logprobs"])}
    for m, model2 in enumerate((CLEAN, FLAKY)):
        answers = query(
            scored_run.run_dir,
            f"SELECT * FROM scores_resolved WHERE {where} AND model2 = $m AND status = 'ok'",
            {**key, "m": model2},
        )
        lists[f"m2-{m}"] = (
            (answers[0]["top_tokens"], answers[0]["top_logprobs"]) if answers else ([], [])
        )
    assert lists["m2-0"][0], "the clean model answered every position"
    for side, (tokens, logprobs) in lists.items():
        shown_tokens = [
            td.text.removesuffix(" ◀").strip("“”")
            for td in panel.find_elements(By.CSS_SELECTOR, f"td.tk[data-list='{side}']")
        ]
        shown_logprobs = [
            float(td.text)
            for td in panel.find_elements(By.CSS_SELECTOR, f"td.lp[data-list='{side}']")
        ]
        shown_percent = [
            float(td.text.removesuffix(" %"))
            for td in panel.find_elements(By.CSS_SELECTOR, f"td.p[data-list='{side}']")
        ]
        assert shown_tokens == [t.replace("\n", "↵") for t in tokens]
        assert shown_logprobs == pytest.approx(logprobs, abs=6e-5)
        assert shown_percent == pytest.approx([100 * math.exp(lp) for lp in logprobs], rel=0.01)
    kl_cell = panel.find_element(By.CSS_SELECTOR, "table.estimators tbody tr td.num")
    assert float(kl_cell.text) == pytest.approx(top["kl_floor"], rel=1e-3)

    # The threshold decides which tokens are highlighted; the keyboard moves between tokens.
    def highlighted() -> set[int]:
        return {
            int(span.get_attribute("data-pos"))
            for span in browser.find_elements(By.CSS_SELECTOR, "#tokens .tok.hot")
        }

    before = highlighted()
    slider = browser.find_element(By.ID, "threshold")
    slider.send_keys(Keys.HOME)
    everything = highlighted()
    slider.send_keys(Keys.END)
    assert highlighted() == set()
    assert before < everything
    kl = query(
        scored_run.run_dir,
        "SELECT position, kl_floor FROM kl WHERE model2 = $m AND stem = $s "
        "AND response_index = $i ORDER BY position",
        {"m": CLEAN, "s": top["stem"], "i": top["response_index"]},
    )
    assert everything == {r["position"] for r in kl if r["kl_floor"] is not None}
    browser.execute_script(
        "const s = document.getElementById('threshold'); s.value = '-1';"
        "s.dispatchEvent(new Event('input'));"
    )
    at_tenth = highlighted()
    assert {r["position"] for r in kl if r["kl_floor"] > 0.11} <= at_tenth
    assert at_tenth <= {r["position"] for r in kl if r["kl_floor"] > 0.09}

    token.click()
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()
    assert f"at position {top['position'] + 1}" in panel.find_element(By.TAG_NAME, "h3").text

    screenshot = tmp_path / "report.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000


def test_partly_scored_run_names_the_command_that_finishes_it(
    scored_run: Run, tmp_path: Path
) -> None:
    """The banner's command, run as printed (at the endpoint the environment names, as the
    run was scored), scores what failed and what was never asked."""
    run_dir = tmp_path / "run"
    shutil.copytree(scored_run.run_dir, run_dir)
    header = decode(write_report(run_dir, tmp_path / "before.html").path.read_text()).header
    m = header["models"].index(FLAKY)
    before = header["summaries"][m]
    assert before["failed"] > 0 and before["scored"] < before["positions"]
    command = shlex.split(before["resume"])
    assert command[:2] == ["klstream", "score"] and command[-1] == "--resume"
    with EmulatorServer() as server:
        process = start_process(*command[1:], GOOGLE_GEMINI_BASE_URL=server.base_url)
        try:
            output, errors = process.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    assert process.returncode == 0, output + errors
    after = decode(write_report(run_dir, tmp_path / "after.html").path.read_text()).header
    finished = after["summaries"][m]
    assert finished["scored"] == finished["positions"] == before["positions"]
    assert finished["failed"] == finished["unscored"] == 0


def open_page(browser: Any, page: Path, width: int) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.set_window_size(width, 1000)
    browser.get(page.as_uri())
    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.documentElement.dataset.ready") == "true"
    )
    assert browser.execute_script("return innerWidth") == width
    assert [e for e in browser.get_log("browser") if e["level"] == "SEVERE"] == []


def no_page_overflow(browser: Any) -> bool:
    overflow: bool = browser.execute_script(
        "return document.documentElement.scrollWidth <= innerWidth"
    )
    return overflow


def box(element: Any) -> dict[str, float]:
    rect: dict[str, float] = element.parent.execute_script(
        "return arguments[0].getBoundingClientRect().toJSON()", element
    )
    return rect


def leading_number(text: str) -> float:
    """The first number of a cell such as ``0.1071 ± 0.005161`` or ``1.90e-4 ± ...``."""
    return float(text.split(" ")[0].replace(",", "").lstrip("$"))


@pytest.mark.parametrize("width", [1024, 1600])
def test_report_layout_at_two_widths(
    priced_run: Path, tmp_path: Path, browser: Any, width: int
) -> None:
    """No horizontal overflow of the page; charts at least 560 × 260 px with 12 px text,
    labelled axes and a legend naming each Model 2; the overview's figures as the costs view
    holds them; every Model 2's top-k list whole inside the hover panel."""
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By

    page = write_report(priced_run, tmp_path / "report.html").path
    open_page(browser, page, width)
    assert no_page_overflow(browser)
    assert not browser.find_element(By.ID, "banner").is_displayed()

    for chart in ("histogram", "by-position"):
        frame = browser.find_element(By.CSS_SELECTOR, f"#{chart} svg")
        size = box(frame)
        assert size["width"] >= 560 and size["height"] >= 260, (chart, size)
        sizes = browser.execute_script(
            "return [...arguments[0].querySelectorAll('text')]"
            ".map(t => parseFloat(getComputedStyle(t).fontSize))",
            frame,
        )
        assert sizes and min(sizes) >= 12
        labels = [t.text for t in frame.find_elements(By.CSS_SELECTOR, "text.axis-label")]
        assert len(labels) == 2 and all("(" in label for label in labels), labels
        legend = browser.find_elements(By.CSS_SELECTOR, f"#{chart}-legend .legend-item")
        assert [item.text.strip() for item in legend] == list(THREE)

    # The response table fits its box (its prompts cut short), which fits the page.
    wrap = browser.find_element(By.CSS_SELECTOR, "#responses .table-wrap")
    assert box(wrap)["right"] <= width
    assert browser.execute_script(
        "return arguments[0].scrollWidth <= arguments[0].clientWidth", wrap
    )

    # The overview shows the figures the costs view and the summary hold, per Model 2.
    def cells(figure: str) -> list[str]:
        return [
            td.text
            for td in browser.find_elements(
                By.CSS_SELECTOR, f"#summary-table tr[data-figure={figure}] td"
            )
        ]

    for m, model2 in enumerate(THREE):
        (costs,) = query(priced_run, "SELECT * FROM costs WHERE model2 = $m", {"m": model2})
        (summary,) = query(priced_run, load_sql("summary"), {"model2": model2})
        assert cells("requests")[m].startswith(f"{costs['requests']:,} (")
        assert cells("output")[m] == f"{costs['output_tokens']:,}"
        assert cells("usd")[m] == f"${costs['usd']:.4f}"
        assert cells("batch-usd")[m] == f"${costs['batch_usd']:.4f}"
        mean, stderr = cells("estimate")[m].split(" ± ")
        assert float(mean) == pytest.approx(summary["mean_kl_estimate"], rel=1e-3)
        assert float(stderr) == pytest.approx(summary["mean_kl_estimate_stderr"], rel=1e-3)

    # Hover a token: Model 1's list and each Model 2's, whole, inside the panel.
    token = browser.find_elements(By.CSS_SELECTOR, "#tokens .tok")[2]
    ActionChains(browser).move_to_element(token).perform()
    panel = browser.find_element(By.ID, "token-detail")
    lists = panel.find_elements(By.CSS_SELECTOR, "table.topk")
    assert [t.get_attribute("data-list") for t in lists] == ["m1", "m2-0", "m2-1", "m2-2"]
    inside = box(panel)
    assert browser.execute_script("return arguments[0].scrollWidth", panel) <= (
        browser.execute_script("return arguments[0].clientWidth", panel)
    )
    for table in lists:
        edges = box(table)
        assert inside["left"] <= edges["left"] and edges["right"] <= inside["right"]
        assert len(table.find_elements(By.CSS_SELECTOR, "td.tk")) == 20
    estimate_row = panel.find_element(
        By.XPATH, ".//table[contains(@class,'estimators')]//tr[th[starts-with(., 'kl_estimate')]]"
    )
    assert len(estimate_row.find_elements(By.CSS_SELECTOR, "td")) == len(THREE)
    assert all(leading_number(td.text) > 0 for td in estimate_row.find_elements(By.TAG_NAME, "td"))
    screenshot = tmp_path / f"report-{width}.png"
    assert browser.save_screenshot(str(screenshot)) and screenshot.stat().st_size > 10_000


@pytest.mark.parametrize("width", [1024, 1600])
def test_banner_on_a_partly_scored_run(
    scored_run: Run, tmp_path: Path, browser: Any, width: int
) -> None:
    from selenium.webdriver.common.by import By

    page = write_report(scored_run.run_dir, tmp_path / "report.html")
    header = decode(page.path.read_text()).header
    flaky = header["summaries"][header["models"].index(FLAKY)]
    open_page(browser, page.path, width)
    banner = browser.find_element(By.ID, "banner")
    assert banner.is_displayed()
    lines = banner.find_elements(By.CSS_SELECTOR, ".banner-line")
    assert len(lines) == 1, "only the Model 2 with failures is partly scored"
    assert lines[0].text.startswith(
        f"{flaky['scored']:,} of {flaky['positions']:,} positions scored for {FLAKY}: "
        f"figures are for the scored part only ({flaky['failed']:,} failed, "
    )
    assert lines[0].find_element(By.CSS_SELECTOR, "code").text == flaky["resume"]
    assert no_page_overflow(browser)
