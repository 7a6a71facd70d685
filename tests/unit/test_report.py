"""The eval report's tables and advice (quality/report.py), from a report dict: which row is the
reference, which passed or failed, what to serve instead of a failed model."""

from __future__ import annotations

from qlora_ray.quality.report import gate_cell, recommendations, render_markdown, render_text


def row(name: str, accuracy: float) -> dict:
    return {"name": name, "description": f"the {name} row", "size_bytes": 118_200_000, "resident_bytes": 110 * 2**20,
            "tokens_per_second": 20.5, "perplexity": 1.0371234, "accuracy": accuracy,
            "correct": round(accuracy * 50), "total": 50}


def report(verdicts: dict, defaults: dict, merge_bases: int = 2) -> dict:
    names = ["unmerged", "bf16.original", "nf4.original", "nf4.nf4-dequantized", "gptq-int4.original"]
    return {"job": "demo", "batch_size": 25,
            "quality_gate": {"enabled": True, "min_accuracy_ratio": 0.98, "max_perplexity_rise": 0.05,
                             "reference": "unmerged"},
            "tenants": {"sql": {"eval_rows": 50, "scorer": "sql", "device": "cpu", "reference": "unmerged",
                                "merge_bases": merge_bases, "defaults": defaults, "verdicts": verdicts,
                                "missing": ["ptq.gptq-int4: GPTQModel is not installed"],
                                "rows": [row(name, 0.9) for name in names]}}}


PASS = {"passed": True, "reasons": []}
FAIL = {"passed": False, "reasons": ["accuracy 42% is 54% of the reference's 78% (at least 98% needed)"]}


def test_gate_cells_mark_the_reference_the_verdicts_and_the_default_merge_base():
    tenant = report({"bf16.original": PASS, "nf4.original": FAIL, "nf4.nf4-dequantized": PASS},
                    {"bf16": "bf16.original", "nf4": "nf4.nf4-dequantized"})["tenants"]["sql"]
    assert gate_cell(tenant, "unmerged") == "reference"
    assert gate_cell(tenant, "nf4.original") == "FAIL"
    assert gate_cell(tenant, "nf4.nf4-dequantized") == "pass, default"
    assert gate_cell(tenant, "gptq-int4.original") == "-"  # not judged
    single = report({"bf16.original": PASS}, {"bf16": "bf16.original"}, merge_bases=1)["tenants"]["sql"]
    assert gate_cell(single, "bf16.original") == "pass"  # one merge base: nothing to choose between


def test_a_failed_model_is_advised_against_with_the_passing_merge_base_or_the_adapter():
    lines = recommendations(report({"nf4.original": FAIL, "nf4.nf4-dequantized": PASS, "gptq-int4.original": FAIL},
                                   {"nf4": "nf4.nf4-dequantized", "gptq-int4": "gptq-int4.original"}))
    assert lines[0].startswith("FAILED sql/nf4.original: accuracy 42%")
    assert "Serve sql/nf4 (= nf4.nf4-dequantized) instead" in lines[0]
    assert "Serve sql/unmerged instead" in lines[1]  # the scheme's default failed too


def test_the_markdown_and_terminal_reports_hold_every_row_and_the_failures():
    rendered = report({"nf4.original": FAIL}, {"nf4": "nf4.original"})
    markdown, text = render_markdown(rendered), render_text(rendered)
    assert "| gptq-int4.original | 118.2 | 110.0 | 20.5 | 1.0371 | 90% (45/50) | - |" in markdown
    assert "- not evaluated: ptq.gptq-int4: GPTQModel is not installed" in markdown
    assert "## Gate failures" in markdown and "FAILED sql/nf4.original" in markdown
    assert "keeps at least 98% of the accuracy" in markdown
    assert "sql (50 eval rows, scorer sql, on cpu)" in text and "FAILED sql/nf4.original" in text
    assert "None." in render_markdown(report({"nf4.original": PASS}, {"nf4": "nf4.original"}))


def test_a_gptq_rows_description_says_how_it_was_quantized():
    from qlora_ray.quality.tenant import gptq_method

    assert gptq_method({"mode": "per-tenant"}) == "; GPTQModel on the merged model, per tenant"
    assert gptq_method({}) == "; GPTQModel on the merged model, per tenant"  # made before bulk GPTQ existed
    assert "every tenant's rows pooled" in gptq_method({"mode": "bulk", "hessian": "pooled"})
    assert "its own calibration rows" in gptq_method({"mode": "bulk", "hessian": "per-tenant"})
