"""The BN doctor: which batch-norm pitfall a run has, in which layer, since when, with the
evidence and the fix. Pure functions of a run's records and meta (bncore.record.tables), so the
same diagnoses come from a server's ingest, a script, or a run's Parquet files.

    from bncore.diagnose import diagnose
    for d in diagnose(result.records, meta).diagnoses:
        print(d.severity, d.rule, d.layers, d.message, d.fix)

Each rule (bncore.diagnose.rules, documented in docs/diagnoses.md) declares what it needs and
keeps its own state across batches of records.
"""

from bncore.diagnose.doctor import Doctor, diagnose, diagnose_files
from bncore.diagnose.facts import RunFacts, facts_of
from bncore.diagnose.findings import SEVERITIES, Diagnosis, Finding, Severity
from bncore.diagnose.rules import RULES

__all__ = [
    "RULES",
    "SEVERITIES",
    "Diagnosis",
    "Doctor",
    "Finding",
    "RunFacts",
    "Severity",
    "diagnose",
    "diagnose_files",
    "facts_of",
]
