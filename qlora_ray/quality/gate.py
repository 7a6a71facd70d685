"""The quality gate: which fused artifacts keep what the fine-tune taught, and which merge base wins.

Pure functions over measured rows ({"accuracy", "perplexity"} per configuration name), so the
policy can change in the job file without evaluating anything again.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from qlora_ray.spec import FusedVariant, QualityGate


@dataclass(frozen=True)
class Verdict:
    passed: bool
    accuracy_ratio: float | None  # fused accuracy / the reference's (None when the reference scores 0)
    perplexity_rise: float  # fused perplexity / the reference's - 1
    reasons: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def judge(row: dict, reference: dict, gate: QualityGate) -> Verdict:
    """A fused artifact's verdict against the reference row (the adapter unmerged: quality_gate.reference)."""
    reasons = []
    ratio = row["accuracy"] / reference["accuracy"] if reference["accuracy"] > 0 else None
    if ratio is not None and ratio < gate.min_accuracy_ratio:
        reasons.append(f"accuracy {row['accuracy']:.1%} is {ratio:.1%} of the adapter's {reference['accuracy']:.1%} "
                       f"(at least {gate.min_accuracy_ratio:.0%} required)")
    rise = row["perplexity"] / reference["perplexity"] - 1
    if not rise <= gate.max_perplexity_rise:  # a NaN perplexity fails too
        reasons.append(f"perplexity {row['perplexity']:.4g} is {rise:+.1%} against the adapter's "
                       f"{reference['perplexity']:.4g} (at most {gate.max_perplexity_rise:+.0%} allowed)")
    return Verdict(passed=not reasons or not gate.enabled, accuracy_ratio=ratio, perplexity_rise=rise, reasons=reasons)


def default_variants(variants: list[FusedVariant], rows: dict[str, dict], verdicts: dict[str, Verdict]) -> dict[str, str]:
    """For each scheme, the variant a tenant's `<tenant>/<scheme>` model name serves: the only one,
    or, when several merge bases were fused, the best that passed the gate (highest accuracy, then
    lowest perplexity); if none passed, the best of them (serve refuses it unless told otherwise)."""
    chosen = {}
    for scheme in dict.fromkeys(v.scheme for v in variants):
        candidates = [v.name for v in variants if v.scheme == scheme and v.name in rows]
        if not candidates:
            continue
        passing = [name for name in candidates if verdicts[name].passed] or candidates
        chosen[scheme] = min(passing, key=lambda name: (-rows[name]["accuracy"], rows[name]["perplexity"]))
    return chosen
