"""The store on a real SQLite file and a real PostgreSQL (each test runs on both): batches wait
in ``pending`` and are folded into series chunks; whatever the folding schedule, and across a
restart, reads give every record once, and never wait for the writer."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest

from bncore.record.tables import CHANNEL_COLUMNS
from server.store import Store
from server.store import series as store_module
from server.store.packing import pack as _pack
from server.store.packing import unpack as _unpack


def batch(step0: int, steps: int, layers=("block0", "block1"), extra: bool = False) -> dict:
    s = np.arange(step0, step0 + steps)
    rows = np.repeat(s, len(layers))
    out = {
        "steps": {"step": s, "loss": 1.0 / s},
        "layers": {
            "step": rows,
            "layer": np.asarray(list(layers) * steps),
            "pre_var": rows * 10.0 + np.tile(np.arange(len(layers)), steps),
        },
        "channels": {
            "step": s[:1],
            "layer": np.asarray(layers[:1]),
            **{c: np.full((1, 3), float(step0)) for c in CHANNEL_COLUMNS},
        },
    }
    if extra:  # a column that only some batches carry
        out["layers"]["gamma"] = np.full(len(rows), 2.0)
    return out


def refuse_seq(st: Store, message: str | None, only: int | None = None) -> None:
    """Make the database refuse to commit a run's new seq (``only`` that value) with
    ``message``, as a full disk or a busy database would; None lifts it."""
    import sqlalchemy as sa

    pg = st.engine.dialect.name == "postgresql"
    with st.engine.begin() as conn:
        if message is None:
            conn.execute(sa.text("DROP TRIGGER refuse ON runs" if pg else "DROP TRIGGER refuse"))
            return
        if pg:
            when = f"NEW.seq = {only}" if only is not None else "true"
            conn.execute(sa.text(
                "CREATE OR REPLACE FUNCTION refuse() RETURNS trigger AS $$ BEGIN "
                f"IF {when} THEN RAISE EXCEPTION '{message}'; END IF; RETURN NEW; END "
                "$$ LANGUAGE plpgsql"
            ))  # fmt: skip
            conn.execute(sa.text(
                "CREATE TRIGGER refuse BEFORE UPDATE OF seq ON runs FOR EACH ROW "
                "EXECUTE FUNCTION refuse()"
            ))  # fmt: skip
        else:
            when = f"WHEN NEW.seq = {only} " if only is not None else ""
            conn.execute(sa.text(
                f"CREATE TRIGGER refuse BEFORE UPDATE OF seq ON runs {when}"
                f"BEGIN SELECT RAISE(ABORT, '{message}'); END"
            ))  # fmt: skip


def fill(store: Store, run_id: str, batches: int = 30) -> None:
    store.runs.create(id=run_id, name=run_id, status="running", source="client")
    for i in range(batches):
        seq, stored = store.series.append(run_id, batch(1 + 5 * i, 5, extra=i % 2 == 1), i + 1)
        assert stored and seq == i + 1
    # a retried send is acknowledged and not stored twice
    assert store.series.append(run_id, batch(1, 5), 1) == (batches, False)


def test_pack_round_trips_numbers_nan_text_and_2d_columns():
    b = batch(7, 3)
    b["steps"]["loss"][1] = np.nan
    back = _unpack(_pack(b))
    assert back.keys() == b.keys()
    for table, cols in b.items():
        assert back[table].keys() == cols.keys()
        for col, arr in cols.items():
            np.testing.assert_array_equal(back[table][col], arr)
            assert back[table][col].dtype.kind == arr.dtype.kind


@pytest.mark.parametrize("fold_every", [1, 7, 10_000])
def test_reads_see_every_record_once_whatever_the_folding(db_url, monkeypatch, fold_every):
    monkeypatch.setattr(store_module, "FOLD_BATCHES", fold_every)
    monkeypatch.setattr(store_module, "FOLD_SECONDS", 1e9)
    st = Store(db_url)
    fill(st, "r1")
    assert st.runs.get("r1")["steps_done"] == 150
    steps, vals = st.reads.one("r1", "block1", "pre_var")
    np.testing.assert_array_equal(steps, np.arange(1, 151))
    np.testing.assert_allclose(vals, steps * 10.0 + 1)
    steps, gamma = st.reads.one("r1", "block0", "gamma")  # only where a batch carried it
    np.testing.assert_array_equal(steps, [s for s in range(1, 151) if (s - 1) // 5 % 2 == 1])
    assert (gamma == 2.0).all()
    loss = st.reads.many("r1", [("", "loss")])[("", "loss")]
    np.testing.assert_allclose(loss[1], 1.0 / np.arange(1, 151), rtol=1e-6)
    assert st.reads.last("r1", [("block0", "pre_var")])[("block0", "pre_var")] == 1500.0
    assert st.reads.channel_steps("r1") == list(range(1, 151, 5))
    assert st.reads.channels("r1")[0]["step"] == 146
    assert ("block0", "gamma") in st.reads.names("r1")
    coarse = st.reads.coarse("r1", [("block1", "pre_var")])[("block1", "pre_var")]
    assert len(coarse[0]) == 3 and np.all(np.diff(coarse[0]) > 0)  # bins 0-63, 64-127, 128-


def test_pending_batches_survive_a_restart_and_reads_see_them_unfolded(db_url, monkeypatch):
    monkeypatch.setattr(store_module, "FOLD_BATCHES", 10_000)
    monkeypatch.setattr(store_module, "FOLD_SECONDS", 1e9)
    url = db_url
    st = Store(url)
    fill(st, "r1", batches=4)
    st.close()  # the server stops before anything folded them
    again = Store(url)
    assert "r1" in again.series._pending
    steps, _ = again.reads.one("r1", "block0", "pre_var")
    np.testing.assert_array_equal(steps, np.arange(1, 21))
    assert "r1" in again.series._pending  # reads never write
    again.finish_run("r1", "completed")
    assert "r1" not in again.series._pending
    steps, _ = again.reads.one("r1", "block0", "pre_var")
    np.testing.assert_array_equal(steps, np.arange(1, 21))


def test_reads_do_not_wait_for_the_writer(db_url):
    st = Store(db_url)
    fill(st, "r1", batches=3)
    held, release = threading.Event(), threading.Event()

    def writer_busy() -> None:
        with st.series._write:
            held.set()
            release.wait(10)

    t = threading.Thread(target=writer_busy)
    t.start()
    held.wait(5)
    try:
        started = time.monotonic()
        steps, _ = st.reads.one("r1", "block0", "pre_var")
        st.reads.channels("r1")
        assert time.monotonic() - started < 5  # the writer holds its lock for 10 s
        np.testing.assert_array_equal(steps, np.arange(1, 16))
    finally:
        release.set()
        t.join()


def test_batches_fold_after_a_second_and_when_the_run_ends(db_url, monkeypatch):
    monkeypatch.setattr(store_module, "FOLD_SECONDS", 0.2)
    st = Store(db_url)
    fill(st, "r1", batches=2)
    assert "r1" in st.series._pending
    time.sleep(0.25)
    st.series.append("r1", batch(11, 5), None)
    assert "r1" not in st.series._pending  # folded by the append that came after the second
    st.series.append("r1", batch(16, 5), None)
    st.finish_run("r1", "completed")
    assert "r1" not in st.series._pending
    st.delete_run("r1")
    assert st.runs.get("r1") is None


def test_the_migrations_build_exactly_the_schema(db_url):
    """The tables are defined once (server.store.schema); the migrations must arrive at them."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from server.store.schema import metadata

    st = Store(db_url)
    with st.engine.connect() as conn:
        diff = compare_metadata(MigrationContext.configure(conn), metadata)
    assert diff == [], f"the migrations and server/store/schema.py differ: {diff}"


def test_a_write_that_fails_at_commit_leaves_the_caches_as_the_database(db_url, monkeypatch):
    """A batch whose transaction fails (a full disk, a busy database: here a trigger) is not
    stored, and the open-chunk cache must not keep it: the next fold writes from the cache."""
    import sqlalchemy as sa

    monkeypatch.setattr(store_module, "FOLD_BATCHES", 1)  # every batch folds in its transaction
    st = Store(db_url)
    st.runs.create(id="r1", name="r1", status="running", source="client")
    refuse_seq(st, "database or disk is full", only=3)
    for i in range(2):
        assert st.series.append("r1", batch(1 + 5 * i, 5), i + 1) == (i + 1, True)
    with pytest.raises(sa.exc.DatabaseError, match="disk is full"):
        st.series.append("r1", batch(11, 5), 3)  # refused: steps 11-15 are not stored
    refuse_seq(st, None)
    st.series.append("r1", batch(16, 5), 4)
    st.finish_run("r1", "completed")
    want = [*range(1, 11), *range(16, 21)]
    steps, vals = st.reads.one("r1", "block0", "pre_var")
    np.testing.assert_array_equal(steps, want)  # each acknowledged step once, the refused none
    np.testing.assert_allclose(vals, np.asarray(want) * 10.0)
    assert st.reads.many("r1", [("", "loss")])[("", "loss")][0].tolist() == want
    assert st.runs.get("r1")["seq"] == 3 and st.runs.get("r1")["steps_done"] == 20
    afresh = Store(db_url)  # a server started again reads the same
    assert afresh.reads.one("r1", "block0", "pre_var")[0].tolist() == want


def test_a_failed_write_does_not_count_as_pending(db_url, monkeypatch):
    import sqlalchemy as sa

    monkeypatch.setattr(store_module, "FOLD_BATCHES", 10_000)
    monkeypatch.setattr(store_module, "FOLD_SECONDS", 1e9)
    st = Store(db_url)
    st.runs.create(id="r1", name="r1", status="running", source="client")
    refuse_seq(st, "database is locked")
    with pytest.raises(sa.exc.DatabaseError):
        st.series.append("r1", batch(1, 5), 1)
    assert "r1" not in st.series._pending  # nothing is waiting to be folded


def test_a_layer_keeps_its_channel_count(db_url, monkeypatch):
    """Per-channel rows of 3 channels, then of 4, for one layer: the second batch is refused
    before anything is written, whether the first is pending, folded, or from before a
    restart; the run stays readable, finishable and deletable."""
    from server.errors import Invalid

    url = db_url

    def channels_batch(step: int, c: int, layer: str = "block0") -> dict:
        cols = {k: np.full((1, c), 1.0) for k in CHANNEL_COLUMNS}
        return {"channels": {"step": np.asarray([step]), "layer": np.asarray([layer]), **cols}}

    st = Store(url)
    st.runs.create(id="r1", name="r1", status="running", source="client")
    assert st.series.append("r1", channels_batch(1, 3), 1) == (1, True)
    with pytest.raises(Invalid, match="has 3 channels in this run, this batch gives it 4"):
        st.series.append("r1", channels_batch(2, 4), 2)  # the first still pending
    st.series.fold("r1")
    with pytest.raises(Invalid, match="has 3 channels"):
        st.series.append("r1", channels_batch(2, 4), 2)  # the first folded
    assert st.series.append("r1", channels_batch(2, 5, "block1"), 2) == (2, True)  # another
    st.close()
    again = Store(url)
    with pytest.raises(Invalid, match="layer 'block1' has 5 channels"):
        again.series.append("r1", channels_batch(3, 3, "block1"), 3)  # pending, read afresh
    ok, bad = channels_batch(3, 3)["channels"], channels_batch(3, 3, "block1")["channels"]
    mixed = {"channels": {k: np.concatenate([ok[k], bad[k]]) for k in ok}}
    with pytest.raises(Invalid, match="block1"):
        again.series.append("r1", mixed, 3)  # a batch in part wrong is refused whole
    assert again.runs.get("r1")["seq"] == 2
    assert [(r["layer"], len(r["pre_var"])) for r in again.reads.channels("r1")] == [
        ("block0", 3),
        ("block1", 5),
    ]
    assert again.reads.channel_steps("r1") == [1, 2]
    again.finish_run("r1", "completed")
    assert [len(r["pre_var"]) for r in again.reads.channels("r1", 1)] == [3]
    again.delete_run("r1")
    assert again.runs.get("r1") is None


def test_steps_and_sequence_numbers_are_64_bit(db_url):
    """The largest values the API accepts (server.store.schema.MAX_INT) are kept exactly: on
    PostgreSQL an INTEGER column would refuse anything past 2**31."""
    from server.store.schema import MAX_INT

    st = Store(db_url)
    st.runs.create(id="r1", name="r1", status="running", source="client")
    top = MAX_INT - 10
    assert st.series.append("r1", batch(top, 5), MAX_INT) == (1, True)
    assert st.series.append("r1", batch(top, 5), MAX_INT) == (1, False)  # seen: not again
    st.finish_run("r1", "completed")
    run = st.runs.get("r1")
    assert (run["steps_done"], run["client_seq"]) == (top + 4, MAX_INT)
    assert st.reads.one("r1", "block0", "pre_var")[0].tolist() == list(range(top, top + 5))
    assert st.reads.channel_steps("r1") == [top]


@pytest.mark.parametrize("durability, level", [("normal", 1), ("full", 2)])
def test_durability_sets_how_sqlite_syncs(tmp_path, durability, level):
    """--durability full: every commit synced to disk (PRAGMA synchronous=FULL), so an
    acknowledged batch survives a power loss too; normal survives a killed process."""
    import sqlalchemy as sa

    st = Store(f"sqlite:///{tmp_path / 'runs.db'}", durability)
    with st.engine.connect() as conn:
        assert conn.execute(sa.text("PRAGMA synchronous")).scalar() == level
        assert conn.execute(sa.text("PRAGMA journal_mode")).scalar() == "wal"


def test_a_read_between_folds_of_one_chunk_sees_every_point(db_url, monkeypatch):
    """Decoded chunks are kept for the next read; a chunk that grew since must be read anew."""
    monkeypatch.setattr(store_module, "FOLD_BATCHES", 1)  # each batch folds into the chunk
    st = Store(db_url)
    st.runs.create(id="r1", name="r1", status="running", source="client")
    for i in range(12):
        st.series.append("r1", batch(1 + 5 * i, 5), i + 1)
        steps, vals = st.reads.one("r1", "block0", "pre_var")
        np.testing.assert_array_equal(steps, np.arange(1, 6 + 5 * i))
        np.testing.assert_allclose(vals, steps * 10.0)
    again = st.reads.many("r1", [("block0", "pre_var"), ("", "loss")], step_min=20, step_max=40)
    assert again[("block0", "pre_var")][0].tolist() == list(range(20, 41))


def test_the_diagnoses_migration_takes_a_database_of_before_and_keeps_its_runs(db_url):
    """Migration 0006 adds ``diagnoses`` to a database made by 0005 (with runs in it), and
    goes back down; the table then holds one row per run and rule, upserted, counted for the
    runs list, and gone with its run."""
    import sqlalchemy as sa
    from alembic import command
    from alembic.config import Config

    import server.store
    from server.store.schema import runs

    engine = sa.create_engine(db_url)
    cfg = Config()
    cfg.set_main_option(
        "script_location", str(Path(server.store.__file__).parent.with_name("migrations"))
    )

    def migrate(to: str, down: bool = False) -> None:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            (command.downgrade if down else command.upgrade)(cfg, to)

    migrate("0005")
    assert "diagnoses" not in sa.inspect(engine).get_table_names()
    with engine.begin() as conn:
        row = {"id": "old", "status": "completed", "source": "client", "created_at": 1.0,
               "steps_done": 0, "seq": 0, "client_seq": 0}  # fmt: skip
        conn.execute(runs.insert().values(**row))
    engine.dispose()
    st = Store(db_url)  # migrates to the newest
    assert st.runs.get("old")["status"] == "completed"
    found = {"rule": "small-batch", "severity": "warning", "layers": ["b0"], "first_step": 3,
             "last_step": None, "evidence": {"batch": 2, "x": "nan"}, "message": "m",
             "fix": "f", "references": ["a#1"], "silenced": False}  # fmt: skip
    st.diagnoses.upsert("old", [found])
    st.diagnoses.upsert("old", [{**found, "layers": ["b0", "b1"]}])  # the same rule: replaced
    assert st.diagnoses.of_run("old") == [{**found, "layers": ["b0", "b1"]}]
    assert st.diagnoses.counts(["old"]) == {"old": {"warning": 1}}
    st.diagnoses.silence("old", "dead-channels", True)  # silenced before it found anything
    assert st.diagnoses.silenced("old") == {"dead-channels"}
    assert [d["rule"] for d in st.diagnoses.of_run("old")] == ["small-batch"]
    st.delete_run("old")
    assert st.diagnoses.of_run("old") == [] and st.diagnoses.silenced("old") == set()
    st.close()
    migrate("0005", down=True)
    assert "diagnoses" not in sa.inspect(engine).get_table_names()
    engine.dispose()
