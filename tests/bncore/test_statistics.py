"""The statistics registry (bncore.statistics) is the one list: records, the API's checks, the
dashboard's labels and the docs all come from it."""

from __future__ import annotations

from pathlib import Path

import pytest

from bncore import statistics
from bncore.record import tables as records
from dashboard.figures.compare import STAT_LABELS
from server.errors import BadRequest
from server.service.records import per_layer

DOCS = Path(__file__).resolve().parents[2] / "docs" / "statistics.md"


def test_docs_are_generated_from_the_registry():
    assert DOCS.read_text() == statistics.markdown(), (
        'docs/statistics.md is out of date; write it again with: python -c "import '
        "bncore.statistics as s; open('docs/statistics.md', 'w').write(s.markdown())\""
    )


def test_records_columns_are_the_registry_s():
    assert set(records.LAYER_COLUMNS) | set(records.OPTIONAL_LAYER_COLUMNS) == {
        s.name for s in statistics.STATISTICS.values() if s.table == "layers"
    }
    assert tuple(statistics.CHANNEL_STATISTICS) == records.CHANNEL_COLUMNS
    for name in (*records.STEP_COLUMNS, *records.EVAL_COLUMNS, *records.LAYER_COLUMNS):
        assert statistics.STATISTICS[name].meaning


def test_the_api_accepts_every_registered_statistic_and_names_them_when_refusing():
    for stat in statistics.STATISTICS.values():
        assert per_layer(stat.name) == (stat.table in ("layers", "layer_evals"))
    assert per_layer("p50_3") and per_layer("weight_norm")
    with pytest.raises(BadRequest) as refused:
        per_layer("pre_variance")
    assert "pre_var" in refused.value.message and "p15_j" in refused.value.message


def test_the_dashboard_labels_come_from_the_registry():
    assert STAT_LABELS["pre_var"] == statistics.STATISTICS["pre_var"].label
    assert all(statistics.STATISTICS[k].per_layer for k in STAT_LABELS)
