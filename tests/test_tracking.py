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


def test_a_reader_waits_for_the_process_creating_a_new_store(tmp_path):
    """find_runs on a sqlite store another process is creating (it holds store_creation) waits instead of running
    MLflow's migration a second time: the collision made a sweep's find_parent fail, so the sweep ran untracked
    and 05_compare_runs found no sweep in test_notebooks."""
    import threading

    import mlflow

    from hylo_lab.tracking import find_runs, store_creation

    path = tmp_path / "mlflow.db"
    uri, got = f"sqlite:///{path}", {}
    reader = threading.Thread(target=lambda: got.update(runs=find_runs(None, "", tracking_uri=uri)))
    with store_creation(uri):  # this test is the creator; the file exists before its tables do
        path.touch()
        reader.start()
        reader.join(timeout=3)
        assert reader.is_alive() and path.stat().st_size == 0, "the reader touched a store being created"
        mlflow.MlflowClient(uri).search_experiments()
    reader.join(timeout=60)
    assert got == {"runs": []}
