"""The eval report: per tenant and configuration, size on disk, resident memory, speed, perplexity,
accuracy and the gate's verdict; as JSON, a Markdown table, a terminal table and a PNG chart."""

from __future__ import annotations

from pathlib import Path

from qlora_ray.report_files import write_report_files
from qlora_ray.tables import text_table

REFERENCE_TEXT = {"unmerged": "the adapter unmerged on the 16-bit base",
                  "as-trained": "the adapter unmerged on the 4-bit base it was trained on"}
HEADERS = ["configuration", "size MB", "resident MB", "tok/s", "perplexity", "accuracy", "gate"]


def gate_cell(tenant_report: dict, name: str) -> str:
    """"reference" for the gate's reference row; "pass" or "FAIL" for fused rows, with "default"
    on the merge base `<tenant>/<scheme>` serves when there were several; "-" for the others."""
    if name == tenant_report["reference"]:
        return "reference"
    verdict = tenant_report["verdicts"].get(name)
    if verdict is None:
        return "-"
    cell = "pass" if verdict["passed"] else "FAIL"
    if tenant_report["merge_bases"] > 1 and name in tenant_report["defaults"].values():
        cell += ", default"
    return cell


def table_rows(tenant_report: dict) -> list[list[object]]:
    return [[row["name"], round(row["size_bytes"] / 1e6, 1), round(row["resident_bytes"] / 2**20, 1),
             row["tokens_per_second"], round(row["perplexity"], 4), f"{row['accuracy']:.0%} ({row['correct']}/{row['total']})",
             gate_cell(tenant_report, row["name"])] for row in tenant_report["rows"]]


def render_text(report: dict) -> str:
    """The terminal version: one table per tenant, then what failed and what to serve instead."""
    parts = []
    for tenant, tenant_report in report["tenants"].items():
        parts.append(f"{tenant} ({tenant_report['eval_rows']} eval rows, scorer {tenant_report['scorer']}, "
                     f"on {tenant_report['device']})\n" + text_table(HEADERS, table_rows(tenant_report)))
        parts += [f"  not evaluated: {line}" for line in tenant_report["missing"]]
    parts += [f"{line}" for line in recommendations(report)]
    return "\n\n".join(parts)


def recommendations(report: dict) -> list[str]:
    """A line per failed fused model: why, and what to serve instead (the scheme's other merge base
    if that one passed, else the adapter unmerged)."""
    lines = []
    for tenant, tenant_report in report["tenants"].items():
        for name, verdict in tenant_report["verdicts"].items():
            if verdict["passed"]:
                continue
            scheme = name.split(".", 1)[0]
            default = tenant_report["defaults"].get(scheme)
            instead = (f"{tenant}/{scheme} (= {default})" if default and tenant_report["verdicts"][default]["passed"]
                       else f"{tenant}/unmerged")
            lines.append(f"FAILED {tenant}/{name}: {'; '.join(verdict['reasons'])}. Serve {instead} instead "
                         f"(serve refuses {tenant}/{name} unless serve.allow_failed_quality is true).")
    return lines


def render_markdown(report: dict) -> str:
    gate = report["quality_gate"]
    lines = [f"# Quality: job `{report['job']}`", "",
             f"Each tenant's held-out eval rows, scored by its exact-match scorer (greedy answers), and the perplexity "
             f"of the reference answers (teacher-forced, answer tokens only). Gate "
             f"({'on' if gate['enabled'] else 'off'}): a fused model keeps at least {gate['min_accuracy_ratio']:.0%} of "
             f"the accuracy of the tenant's `reference` row ({REFERENCE_TEXT[gate['reference']]}) and its "
             f"perplexity rises at most "
             f"{gate['max_perplexity_rise']:.0%}. Size: the files a deployment loads (a 4-bit-at-load row counts the "
             f"16-bit base it quantizes); resident: the loaded weights and buffers (16-bit weights are loaded as fp32 "
             f"on the CPU, its fast path); tok/s: new tokens over the time of prompts and greedy generation, in "
             f"batches of {report['batch_size']} (tenants are evaluated side by side, so on a shared machine it "
             f"is indicative only).", ""]
    for tenant, tenant_report in report["tenants"].items():
        lines += [f"## {tenant}", "", f"{tenant_report['eval_rows']} eval rows, scorer `{tenant_report['scorer']}`, "
                  f"on {tenant_report['device']}.", "",
                  "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in table_rows(tenant_report)]
        lines += [""] + [f"- not evaluated: {line}" for line in tenant_report["missing"]]
        lines += [f"- `{row['name']}`: {row['description']}" for row in tenant_report["rows"]] + [""]
    failures = recommendations(report)
    lines += ["## Gate failures", ""] + ([f"- {line}" for line in failures] or ["None."]) + [""]
    return "\n".join(lines)


def write_report(report: dict, folder: Path) -> list[Path]:
    """report.json, report.md and report.png into folder; returns the files written."""
    return write_report_files(folder, "report", report, render_markdown(report), plot)


def plot(report: dict, path: Path) -> None:
    """Accuracy and perplexity per configuration, one group of bars per tenant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tenants = list(report["tenants"])
    names = list(dict.fromkeys(row["name"] for t in tenants for row in report["tenants"][t]["rows"]))
    width = 0.8 / max(len(names), 1)
    figure, axes = plt.subplots(2, 1, figsize=(max(8, 2.2 * len(tenants) + 4), 8))
    for axis, key, title in zip(axes, ("accuracy", "perplexity"), ("exact-match accuracy", "answer perplexity")):
        for index, name in enumerate(names):
            values = []
            for tenant in tenants:
                row = next((r for r in report["tenants"][tenant]["rows"] if r["name"] == name), None)
                values.append(row[key] if row else 0)
            axis.bar([t + index * width for t in range(len(tenants))], values, width, label=name)
        axis.set_xticks([t + 0.4 - width / 2 for t in range(len(tenants))], tenants)
        axis.set_title(title)
        axis.grid(axis="y", alpha=0.3)
    axes[1].set_yscale("log")
    axes[0].legend(fontsize=7, ncol=3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
