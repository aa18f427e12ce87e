"""explode → (fixture scores) → kl → export → query, on real Parquet files and real DuckDB."""

from __future__ import annotations

import json
import math
import random
import re
import statistics
from pathlib import Path
from typing import Any, NamedTuple

import duckdb
import numpy as np
import pyarrow.parquet as pq
import pytest
from cli import invoke
from inputs import Token, make_input, make_response, write_input
from scorefixtures import Key, write_fixture_scores

from klstream.errors import KlstreamError
from klstream.input.explode import explode
from klstream.metrics import reference
from klstream.metrics.kl import KlReport, compute_kl
from klstream.metrics.tailfit import TailObservations, fit_tail_variance
from klstream.output.export import export
from klstream.output.query import run_query
from klstream.storage import schemas
from klstream.storage.database import connect, views_script

MODEL2 = "gemini-fixture-2"
WORDS = ["The", " cat", " sat", " on", " the", " mat", ".", " A", " dog", " ran", "\n", " é"]


def random_tokens(rnd: random.Random, length: int, with_ids: bool = True) -> list[Token]:
    tokens: list[Token] = []
    for _ in range(length):
        ids = rnd.sample(range(len(WORDS)), k=rnd.randint(2, 6))
        logprobs = sorted((rnd.uniform(-9, -0.01) for _ in ids), reverse=True)
        top = [(WORDS[i], i if with_ids else None, lp) for i, lp in zip(ids, logprobs, strict=True)]
        chosen = rnd.randrange(len(top))
        tokens.append((top[chosen][0], top[chosen][1], top[chosen][2], top))
    return tokens


def tail_observations(exact: list[list[float]], censored: list[list[float]]) -> TailObservations:
    return TailObservations(
        count=np.array([len(values) for values in exact]),
        total=np.array([math.fsum(values) for values in exact]),
        total_sq=np.array([math.fsum(v * v for v in values) for values in exact]),
        censored_rows=np.array([i for i, limits in enumerate(censored) for _ in limits], np.intp),
        censored_at=np.array([limit for limits in censored for limit in limits]),
    )


@pytest.fixture
def inputs(tmp_path: Path) -> Path:
    rnd = random.Random(7)
    directory = tmp_path / "in"
    write_input(
        directory,
        "alpha",
        make_input(
            "Tell me about cats.",
            "model-one",
            [random_tokens(rnd, 9), random_tokens(rnd, 5), []],
        ),
    )
    mismatch = make_response(random_tokens(rnd, 4), text="not the tokens")
    write_input(
        directory,
        "beta",
        make_input(
            "And dogs?",
            "model-one",
            [random_tokens(rnd, 6, with_ids=False), mismatch],
        ),
    )
    return directory


class ScoredRun(NamedTuple):
    """A run with fixture scores for MODEL2 and its KL table computed."""

    run_dir: Path
    lists: dict[Key, tuple[list[str], list[int | None], list[float]]]
    errors: frozenset[Key]
    missing: frozenset[Key]
    report: KlReport


@pytest.fixture
def scored_run(tmp_path: Path, inputs: Path) -> ScoredRun:
    run_dir = tmp_path / "run"
    explode(inputs, run_dir)
    errors = frozenset({("alpha", 0, 3)})
    missing = frozenset({("alpha", 1, 0), ("beta", 0, 5)})
    retried = frozenset({("alpha", 0, 1), ("beta", 1, 2)})
    lists = write_fixture_scores(
        run_dir, MODEL2, errors=errors, missing=missing, fail_then_succeed=retried
    )
    report = compute_kl(run_dir, MODEL2)
    return ScoredRun(run_dir, lists, errors, missing, report)


def test_kl_table_matches_reference_per_position(scored_run: ScoredRun) -> None:
    run_dir, lists, errors, missing, report = scored_run
    assert report.tail_fit is not None
    sigma2 = report.tail_fit.sigma2
    exact_values: list[list[float]] = []
    censored_values: list[list[float]] = []
    kl = pq.read_table(run_dir / "kl" / f"{MODEL2}.parquet")
    assert kl.schema == schemas.KL
    positions = {
        (p["stem"], p["response_index"], p["position"]): p
        for p in pq.read_table(run_dir / "positions.parquet").to_pylist()
    }
    rows = kl.to_pylist()
    assert [(r["stem"], r["response_index"], r["position"]) for r in rows] == sorted(positions)
    assert report.positions == len(positions)
    assert (report.failed, report.unscored) == (len(errors), len(missing))
    assert report.scored == len(positions) - len(errors) - len(missing)
    for row in rows:
        key = (row["stem"], row["response_index"], row["position"])
        if key in errors or key in missing:
            assert row["status"] == ("error" if key in errors else "unscored")
            assert row["kl_floor"] is None and row["kl_lower"] is None and row["logratio"] is None
            assert row["kl_estimate"] is None
            assert row["entropy1"] is not None
            continue
        pos = positions[key]
        by_id = pos["top_token_ids"][0] is not None
        p_keys = pos["top_token_ids"] if by_id else pos["top_tokens"]
        q_tokens, q_ids, q_lps = lists[key]
        q_keys = q_ids if by_id else q_tokens
        p_entries = list(zip(p_keys, pos["top_logprobs"], strict=True))
        q_entries = list(zip(q_keys, q_lps, strict=True))
        assert row["status"] == "scored"
        assert row["kl_floor"] == pytest.approx(reference.kl_floor(p_entries, q_entries), abs=1e-12)
        assert row["kl_lower"] == pytest.approx(reference.kl_lower(p_entries, q_entries), abs=1e-9)
        assert row["kl_estimate"] == pytest.approx(
            reference.kl_estimate(p_entries, q_entries, sigma2), abs=1e-12
        )
        assert row["tail_sigma2"] == sigma2
        chosen = pos["token_id"] if by_id else pos["token"]
        exact, censored = reference.tail_observations(p_entries, q_entries, chosen, pos["logprob"])
        exact_values.append(exact)
        censored_values.append(censored)
        m2_lp, inside = reference.chosen_logprob_in(q_entries, chosen)
        assert row["model2_logprob"] == pytest.approx(m2_lp)
        assert row["m1_token_in_m2_topk"] is inside
        assert row["logratio"] == pytest.approx(pos["logprob"] - m2_lp)
    # σ̂² is the fit over every scored position's values, as plain Python finds them.
    want = fit_tail_variance(tail_observations(exact_values, censored_values))
    assert want is not None
    assert sigma2 == pytest.approx(want.sigma2, rel=1e-9)
    assert (report.tail_fit.positions, report.tail_fit.censored) == (want.positions, want.censored)


SPEC_TOP = ["prompt", "model1", "model2", "num_responses", "responses"]
SPEC_RESPONSE = ["text", "num_tokens", "kl_per_token", "token_details", "statistics"]
SPEC_DETAIL = [
    "position",
    "token",
    "kl_divergence",
    "model1_chosen_logprob",
    "model2_chosen_logprob",
]
SPEC_STATS = ["mean_kl", "median_kl", "std_kl", "min_kl", "max_kl", "total_kl"]


def starts_with_spec_keys(obj: dict[str, Any], spec_keys: list[str]) -> bool:
    return list(obj)[: len(spec_keys)] == spec_keys


def test_export_writes_the_spec_format(scored_run: ScoredRun, tmp_path: Path) -> None:
    run_dir, _, errors, missing, _ = scored_run
    out = tmp_path / "out"
    report = export(run_dir, out, MODEL2)
    written = sorted(p.name for p in out.iterdir())
    assert written == ["alpha_kl.json", "beta_kl.json", "summary.json"]
    assert report.model2 == MODEL2
    kl_rows = pq.read_table(run_dir / "kl" / f"{MODEL2}.parquet").to_pylist()
    for path in report.files:
        doc = json.loads(path.read_text(encoding="utf-8"))
        stem = path.name.removesuffix("_kl.json")
        assert starts_with_spec_keys(doc, SPEC_TOP)
        assert doc["model1"] == "model-one" and doc["model2"] == MODEL2
        assert doc["num_responses"] == len(doc["responses"])
        for index, response in enumerate(doc["responses"]):
            assert starts_with_spec_keys(response, SPEC_RESPONSE)
            assert isinstance(response["text"], str)
            expected = [r for r in kl_rows if (r["stem"], r["response_index"]) == (stem, index)]
            assert response["num_tokens"] == len(expected)
            assert response["kl_per_token"] == [r["kl_floor"] for r in expected]
            assert len(response["token_details"]) == response["num_tokens"]
            for detail, row in zip(response["token_details"], expected, strict=True):
                assert starts_with_spec_keys(detail, SPEC_DETAIL)
                assert detail["position"] == row["position"]
                assert detail["token"] == row["token"]
                assert detail["kl_divergence"] == row["kl_floor"]
                assert detail["model1_chosen_logprob"] == row["model1_logprob"]
                assert detail["model2_chosen_logprob"] == row["model2_logprob"]
                assert detail["kl_lower"] == row["kl_lower"]
                assert detail["kl_estimate"] == row["kl_estimate"]
            stats = response["statistics"]
            assert starts_with_spec_keys(stats, SPEC_STATS)
            values = [r["kl_floor"] for r in expected if r["kl_floor"] is not None]
            unscored = [r["position"] for r in expected if r["kl_floor"] is None]
            assert [u["position"] for u in response["unscored_positions"]] == unscored
            assert stats["num_unscored"] == len(unscored)
            if not values:
                assert all(stats[key] is None for key in SPEC_STATS)
                continue
            assert stats["mean_kl"] == pytest.approx(statistics.fmean(values))
            assert stats["median_kl"] == pytest.approx(float(np.median(values)))
            assert stats["std_kl"] == pytest.approx(float(np.std(values)))
            assert stats["min_kl"] == pytest.approx(min(values))
            assert stats["max_kl"] == pytest.approx(max(values))
            assert stats["total_kl"] == pytest.approx(math.fsum(values))
            for name in ("kl_lower", "kl_estimate"):
                estimates = [r[name] for r in expected if r[name] is not None]
                assert stats[f"mean_{name}"] == pytest.approx(statistics.fmean(estimates))
                assert stats[f"total_{name}"] == pytest.approx(math.fsum(estimates))
    alpha = json.loads((out / "alpha_kl.json").read_text(encoding="utf-8"))
    assert alpha["responses"][0]["unscored_positions"] == [
        {"position": 3, "status": "error", "error": "503 UNAVAILABLE: overloaded"}
    ]
    assert alpha["responses"][2]["num_tokens"] == 0
    beta = json.loads((out / "beta_kl.json").read_text(encoding="utf-8"))
    assert beta["responses"][1]["tokens_match_text"] is False

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    total = len(kl_rows)
    assert summary["positions"] == total
    assert summary["failed"] == len(errors) and summary["unscored"] == len(missing)
    scored_values = [r["kl_floor"] for r in kl_rows if r["kl_floor"] is not None]
    assert summary["scored"] == len(scored_values)
    assert summary["mean_kl"] == pytest.approx(statistics.fmean(scored_values))
    assert summary["mean_kl_stderr"] == pytest.approx(
        statistics.stdev(scored_values) / math.sqrt(len(scored_values))
    )
    assert summary["max_kl"] == pytest.approx(max(scored_values))
    assert summary["p50_kl"] == pytest.approx(float(np.median(scored_values)))
    assert summary["p99_kl"] == pytest.approx(float(np.percentile(scored_values, 99)))
    for name in ("kl_lower", "kl_estimate"):
        estimates = [r[name] for r in kl_rows if r[name] is not None]
        assert summary[f"mean_{name}"] == pytest.approx(statistics.fmean(estimates))
        assert summary[f"mean_{name}_stderr"] == pytest.approx(
            statistics.stdev(estimates) / math.sqrt(len(estimates))
        )
    assert summary["tail_sigma2"] == kl_rows[0]["tail_sigma2"]
    top1 = [r["top1_agree"] for r in kl_rows if r["top1_agree"] is not None]
    assert summary["top1_agreement"] == pytest.approx(sum(top1) / len(top1))


def test_export_cli_prints_summary_table(scored_run: ScoredRun, tmp_path: Path) -> None:
    run_dir = scored_run[0]
    result = invoke("export", run_dir, "-o", tmp_path / "o")
    assert result.exit_code == 0, result.output
    for label in (
        "Mean    KLD:",
        "Maximum KLD:",
        "99.9%",
        "Median",
        "Minimum KLD:",
        "Same top token:",
        "M1 token outside M2 top-k:",
        "Mean KL estimate:",
        "Mean KL lower bound:",
        "Tail variance σ̂²:",
        "failed 1, unscored 2",
    ):
        assert label in result.output


def test_export_refuses_unknown_model2_and_writes_nothing(
    scored_run: ScoredRun, tmp_path: Path
) -> None:
    run_dir = scored_run[0]
    out = tmp_path / "o"
    with pytest.raises(KlstreamError, match="no KL results for model2 'other'"):
        export(run_dir, out, "other")
    assert not out.exists() or not any(out.iterdir())


def test_export_needs_model2_when_several(scored_run: ScoredRun, tmp_path: Path) -> None:
    run_dir = scored_run[0]
    write_fixture_scores(run_dir, "second-model", seed=3)
    compute_kl(run_dir, "second-model")
    with pytest.raises(KlstreamError, match="several models"):
        export(run_dir, tmp_path / "o")
    assert export(run_dir, tmp_path / "o", "second-model").model2 == "second-model"


def test_kl_without_scores_says_what_to_run(tmp_path: Path, inputs: Path) -> None:
    run_dir = tmp_path / "run"
    explode(inputs, run_dir)
    result = invoke("kl", run_dir, "--model2", MODEL2)
    assert result.exit_code == 4
    assert "no Model 2 results" in result.output and "klstream score" in result.output


def test_query_formats(scored_run: ScoredRun, tmp_path: Path) -> None:
    run_dir = scored_run[0]
    sql = "SELECT stem, count(*) AS n FROM kl GROUP BY stem ORDER BY stem"
    table = run_query(run_dir, sql)
    assert "alpha" in table and "beta" in table and "│" in table
    assert run_query(run_dir, sql, "csv") == "stem,n\nalpha,14\nbeta,10"
    assert [json.loads(line) for line in run_query(run_dir, sql, "json").splitlines()] == [
        {"stem": "alpha", "n": 14},
        {"stem": "beta", "n": 10},
    ]
    target = tmp_path / "q.parquet"
    result = invoke("query", run_dir, sql, "--format", "parquet", "-o", target)
    assert result.exit_code == 0, result.output
    assert pq.read_table(target).to_pylist() == [
        {"stem": "alpha", "n": 14},
        {"stem": "beta", "n": 10},
    ]
    bad = invoke("query", run_dir, "SELECT nope FROM kl")
    assert bad.exit_code == 1 and "query failed" in bad.output


def test_views_script_works_in_a_plain_duckdb(scored_run: ScoredRun) -> None:
    """The script `klstream views` prints gives a bare duckdb the same views klstream uses, as
    one script (fixture scores come without a run.json, and the run has no skipped.parquet)."""
    run_dir = scored_run[0]
    sql = "SELECT stem, response_index, mean_kl, total_kl FROM response_stats ORDER BY ALL"
    with duckdb.connect() as con, connect(run_dir) as ours:
        con.execute(views_script(run_dir))
        assert con.execute(sql).fetchall() == ours.execute(sql).fetchall()


@pytest.mark.parametrize("command", ["report", "query"])
def test_an_output_that_cannot_be_written_exits_7_naming_it(
    scored_run: ScoredRun, tmp_path: Path, command: str
) -> None:
    """`report -o` and `query -o` exit 7 (an output cannot be written) and name the file asked
    for, never the hidden temporary beside it. Tests run as root, which writes into read-only
    directories, so the failures are ones root meets too: a regular file where a directory
    should be (as the parent, and higher up), and a name so long that the temporary's cannot
    be created."""
    run_dir = scored_run[0]
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("", encoding="utf-8")
    targets = {
        blocker / "out.txt": f"{blocker} is a file, not a directory",
        blocker / "sub" / "out.txt": f"{blocker / 'sub'}: Not a directory",
        tmp_path / ("x" * 250 + ".txt"): "File name too long",
    }
    for target, cause in targets.items():
        args = ["-o", target] if command == "report" else ["SELECT 1 AS one", "-o", target]
        result = invoke(command, run_dir, *args)
        assert result.exit_code == 7, result.output
        assert result.output == f"Error: cannot write {target}: {cause}\n"
        assert not target.exists()


README = Path(__file__).parent.parent / "README.md"
README_MODEL2 = "'toy-d0.5'"
"""The Model 2 the README's queries name: the one its "Try it locally" block scores."""


def readme_queries() -> list[str]:
    """The SQL blocks of the README's "Ad-hoc queries" section, as written."""
    section = README.read_text(encoding="utf-8").split("## Ad-hoc queries", 1)[1]
    return re.findall(r"```sql\n(.*?)```", section.split("\n## ", 1)[0], re.DOTALL)


def test_the_readme_has_its_queries() -> None:
    assert len(readme_queries()) == 3


@pytest.mark.parametrize("number", range(3))
def test_readme_queries_run_and_keep_each_model2_apart(scored_run: ScoredRun, number: int) -> None:
    """Each query filters or groups by model2, so a run with a second Model 2 cannot mix them."""
    sql = readme_queries()[number]
    with connect(scored_run[0]) as con:
        rows = con.execute(sql.replace(README_MODEL2, f"'{MODEL2}'")).fetchall()
    assert rows
    assert re.search(r"model2 = 'toy-d0\.5'|GROUP BY k\.model2|ORDER BY k\.model2", sql), sql


def test_kl_pass_with_no_successful_result_in_a_batch(tmp_path: Path, inputs: Path) -> None:
    """Every position failed: the KL table is all nulls, not a crash on an empty selection."""
    run_dir = tmp_path / "run"
    explode(inputs, run_dir)
    positions = pq.read_table(run_dir / "positions.parquet").to_pylist()
    every_key = frozenset((p["stem"], p["response_index"], p["position"]) for p in positions)
    write_fixture_scores(run_dir, MODEL2, errors=every_key)
    report = compute_kl(run_dir, MODEL2, batch_rows=7)
    assert (report.scored, report.failed) == (0, len(positions))
    assert report.tail_fit is None
    rows = pq.read_table(run_dir / "kl" / f"{MODEL2}.parquet").to_pylist()
    assert all(r["kl_floor"] is None and r["status"] == "error" for r in rows)
    assert all(r["kl_estimate"] is None and r["tail_sigma2"] is None for r in rows)
    assert all(r["entropy1"] is not None for r in rows)


def test_small_response_ranges_give_the_same_kl_table_and_files(
    scored_run: ScoredRun, tmp_path: Path
) -> None:
    """Ranges bound DuckDB's memory; cutting the run into many must not change any output."""
    run_dir = scored_run[0]
    whole = pq.read_table(run_dir / "kl" / f"{MODEL2}.parquet")
    export(run_dir, tmp_path / "whole", MODEL2)
    for positions_per_range in (1, 3, 7):
        compute_kl(run_dir, MODEL2, batch_rows=4, range_positions=positions_per_range)
        ranged_kl = pq.read_table(run_dir / "kl" / f"{MODEL2}.parquet")
        for name in whole.column_names:  # BLAS row sums may differ in the last bit by batch size
            for want, got in zip(
                whole.column(name).to_pylist(), ranged_kl.column(name).to_pylist(), strict=True
            ):
                if isinstance(want, float):
                    assert math.isclose(got, want, rel_tol=1e-12, abs_tol=1e-15), name
                else:
                    assert got == want, name
        ranged = tmp_path / f"ranged-{positions_per_range}"
        compute_kl(run_dir, MODEL2)
        export(run_dir, ranged, MODEL2, range_positions=positions_per_range)
        for name in ("alpha_kl.json", "beta_kl.json", "summary.json"):
            assert (ranged / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_a_kl_table_from_before_kl_estimate_still_opens_and_is_recomputed(
    scored_run: ScoredRun, tmp_path: Path
) -> None:
    """Views over a KL table without the new columns must not fail: `klstream kl` is how a run
    is brought up to date after an upgrade, and it opens those views itself."""
    run_dir = scored_run[0]
    path = run_dir / "kl" / f"{MODEL2}.parquet"
    pq.write_table(pq.read_table(path).drop_columns(["kl_estimate", "tail_sigma2"]), path)
    summary = export(run_dir, tmp_path / "old", MODEL2).summary
    assert summary["mean_kl_estimate"] is None and summary["mean_kl"] is not None
    compute_kl(run_dir, MODEL2)
    assert export(run_dir, tmp_path / "new", MODEL2).summary["mean_kl_estimate"] is not None
