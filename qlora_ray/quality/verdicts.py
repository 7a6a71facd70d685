"""The quality gate's verdicts, an artifact of their own (runs/<job>/eval/verdicts/verdicts.json):
where serve, `plan` and `status` learn which fused models failed the gate and which merge base each
scheme's `<tenant>/<scheme>` name serves.

The eval stage replaces the artifact whole after each run (Store.replace: readers see the previous
verdicts or the new ones, never none) and never writes into the fused artifacts it judged: stages
talk through the store in one direction. Each verdict names the fused artifact it judged by its
manifest's digest, so a model fused again since then counts as not judged yet, rather than judged
by its predecessor's scores.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from qlora_ray.errors import StoreError
from qlora_ray.local_disk import scratch_dir
from qlora_ray.manifest import manifest_digest
from qlora_ray.store import Store, verdicts_key

VERDICTS_FILE = "verdicts.json"


def verdicts_from_report(report: dict) -> dict[str, dict]:
    """Model id `<tenant>/<variant>` -> its verdict: passed and why not, its accuracy and perplexity
    beside the reference's, the gate applied, whether it is its scheme's default, and `fused`, the
    store key and manifest digest of the artifact judged."""
    verdicts = {}
    for tenant_id, tenant_report in report["tenants"].items():
        by_name = {row["name"]: row for row in tenant_report["rows"]}
        reference = by_name[tenant_report["reference"]]
        for name, verdict in tenant_report["verdicts"].items():
            row = by_name[name]
            verdicts[f"{tenant_id}/{name}"] = {
                **verdict, "accuracy": row["accuracy"], "perplexity": row["perplexity"],
                "reference": {"name": tenant_report["reference"], "accuracy": reference["accuracy"],
                              "perplexity": reference["perplexity"]},
                "gate": report["quality_gate"],
                "default_for_scheme": tenant_report["defaults"].get(name.split(".", 1)[0]) == name,
                "fused": row["sources"]["model"],
            }
    return dict(sorted(verdicts.items()))


def publish_verdicts(store: Store, job: str, report: dict) -> dict:
    """Replace the job's verdicts with those of this report. Returns the artifact's manifest."""
    with scratch_dir("verdicts") as tmp:
        (tmp / VERDICTS_FILE).write_text(json.dumps(verdicts_from_report(report), indent=2, sort_keys=True))
        return store.replace(verdicts_key(job), tmp, kind="eval-verdicts", inputs={
            "tenants": {t: r["results"] for t, r in report["tenants"].items()}, "quality_gate": report["quality_gate"]})


@dataclass(frozen=True)
class Verdicts:
    """The verdicts as read, by model id (empty before the eval stage first ran)."""

    by_model: dict[str, dict] = field(default_factory=dict)

    def of(self, tenant: str, variant: str, fused_manifest: dict) -> dict | None:
        """The verdict on this fused artifact, or None if the eval stage has not judged this build of it."""
        verdict = self.by_model.get(f"{tenant}/{variant}")
        if verdict is None or verdict["fused"]["manifest_sha256"] != manifest_digest(fused_manifest):
            return None
        return verdict


def read_verdicts(store: Store, job: str) -> Verdicts:
    """The job's verdicts; StoreError naming the artifact if its file is not what the eval stage writes."""
    key = verdicts_key(job)
    if not store.is_complete(key):
        return Verdicts()
    by_model = store.read_json(key, VERDICTS_FILE)
    well_formed = isinstance(by_model, dict) and all(
        isinstance(v, dict) and isinstance(v.get("passed"), bool) and isinstance(v.get("reasons"), list)
        and isinstance(v.get("fused"), dict) and isinstance(v["fused"].get("manifest_sha256"), str)
        for v in by_model.values())
    if not well_formed:
        raise StoreError(f"{store.url(key)}/{VERDICTS_FILE}: not the eval stage's verdicts (each needs passed, "
                         "reasons and the fused artifact's digest); run `qlora-ray eval JOB` to write them again")
    return Verdicts(by_model)
