"""Where a local store keeps what a run logs."""

from hylo_lab.tracking import Tracker


def test_artifacts_live_beside_the_sqlite_store_whatever_the_working_directory(tmp_path, monkeypatch):
    # a notebook runs in notebooks/: MLflow's default ./mlruns would put its artifacts there, apart from the store
    store, elsewhere = tmp_path / "project", tmp_path / "project" / "notebooks"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)
    note = tmp_path / "note.txt"
    note.write_text("hello")
    tracker = Tracker("artifacts_test", tracking_uri=f"sqlite:///{store / 'mlflow.db'}")
    assert tracker.active
    tracker.log_artifact(note, "tables")
    tracker.end()
    logged = list((store / "mlruns").rglob("note.txt"))
    assert len(logged) == 1 and logged[0].read_text() == "hello"
    assert not (elsewhere / "mlruns").exists()
