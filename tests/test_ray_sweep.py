"""Sweeps on a real Ray cluster on 127.0.0.1 (a head and a separate worker node, one CPU each) tracked in an MLflow
server on 127.0.0.1: children, metrics and the exported result files; the worker node killed mid-point leaves
that point's child FAILED (no child stays RUNNING) and a re-run completes the sweep, skipping finished points.
Everything started here is stopped in a finally (`ray stop`, the worker and server process groups)."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from hylo_lab.executors import RayExecutor
from hylo_lab.sweep import run_sweep

pytest.importorskip("ray")
pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
NOTEBOOK = Path(__file__).parent / "data" / "ray_sweep.ipynb"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def kill_tree(proc):
    import psutil

    try:
        procs = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        procs = []
    for p in procs:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)


def wait_for(check, timeout, what):
    end = time.time() + timeout
    while time.time() < end:
        if check():
            return
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@pytest.fixture
def cluster(tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", RAY_USAGE_STATS_ENABLED="0",
               # a killed node is declared dead within ~15 s, a starved live one (CI's 2 busy cores) is not
               RAY_health_check_period_ms="3000", RAY_health_check_timeout_ms="3000",
               RAY_health_check_failure_threshold="5", RAY_health_check_initial_delay_ms="1000")
    ray_port, mlflow_port = free_port(), free_port()
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's unix sockets live under it
    common = ["--num-cpus", "1", "--object-store-memory", str(80 * 2**20), "--node-ip-address", "127.0.0.1"]
    started = []
    try:
        subprocess.run([BIN / "ray", "start", "--head", "--port", str(ray_port), "--temp-dir", temp,
                        "--include-dashboard", "false", *common], env=env, check=True, capture_output=True, timeout=120)
        worker_log = tmp_path / "ray_worker.log"

        def start_worker():
            with open(worker_log, "a") as log:
                proc = subprocess.Popen([BIN / "ray", "start", "--address", f"127.0.0.1:{ray_port}", "--block",
                                         *common], env=env, start_new_session=True, stdout=log, stderr=log)
            started.append(proc)
            return proc

        worker = start_worker()
        server = subprocess.Popen([BIN / "mlflow", "server", "--backend-store-uri", f"sqlite:///{tmp_path / 'm.db'}",
                                   "--artifacts-destination", str(tmp_path / "artifacts"), "--host", "127.0.0.1",
                                   "--port", str(mlflow_port), "--workers", "1"],
                                  env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        started.append(server)
        uri = f"http://127.0.0.1:{mlflow_port}"

        def server_up():
            try:
                return urllib.request.urlopen(f"{uri}/health", timeout=2).status == 200
            except OSError:
                return False

        def two_nodes():
            try:
                out = subprocess.run([BIN / "ray", "status", "--address", f"127.0.0.1:{ray_port}"], env=env,
                                     capture_output=True, text=True, timeout=60).stdout
            except subprocess.TimeoutExpired:
                return False
            return "2.0 CPU" in out

        wait_for(server_up, 120, "the MLflow server")
        for attempt in range(3):  # slow on a loaded 2-core machine; a worker that died or never joined is replaced
            try:
                wait_for(lambda: two_nodes() or worker.poll() is not None, 200, "the Ray worker node to join")
                if worker.poll() is None:
                    break
            except AssertionError:
                if attempt == 2:
                    log = worker_log.read_text()[-3000:]
                    raise AssertionError(f"the Ray worker node never joined; its log:\n{log}") from None
            kill_tree(worker)
            worker = start_worker()
        else:
            raise AssertionError(f"the Ray worker node exited three times; its log:\n{worker_log.read_text()[-3000:]}")
        yield dict(address=f"127.0.0.1:{ray_port}", uri=uri, worker=worker, env=env)
    finally:
        subprocess.run([BIN / "ray", "stop", "--force"], env=env, capture_output=True, timeout=120)
        for proc in started:
            kill_tree(proc)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_sweep_with_a_worker_killed_mid_point_stays_consistent_and_a_rerun_completes_it(cluster, tmp_path):
    import mlflow

    gate = tmp_path / "gate"  # points wait for it: two stay running until the worker is killed
    spec = dict(name="ray_tiny", notebook=str(NOTEBOOK), experiment="ray_sweep",
                fixed={"scale": 0.5, "gate": str(gate)}, grid={"x": [1, 2, 3]}, metrics=["score", "eval/niah/*"])
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    out, uri = tmp_path / "out", cluster["uri"]
    client = mlflow.MlflowClient(uri)

    def children():
        exp = client.get_experiment_by_name("ray_sweep")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return [r for r in runs if "point_key" in r.data.tags]

    lines, box = [], {}

    def sweep():
        try:
            box["first"] = run_sweep(path, tracking_uri=uri, out_dir=out, echo=lines.append,
                                     executor=RayExecutor(cluster["address"]))
        except BaseException as exc:  # noqa: BLE001 - reported by the assertion below
            box["error"] = exc

    thread = threading.Thread(target=sweep, daemon=True)
    thread.start()
    # one CPU per node: two points run at once, one of them on the worker node; kill that node mid-point
    # a point's process starts in seconds on an idle machine and took 265 s beside two busy cores: wait up to 600
    wait_for(lambda: sum(r.info.status == "RUNNING" for r in children()) >= 2, 600, "two points running")
    kill_tree(cluster["worker"])
    gate.touch()  # the head node's point goes on, then the third point runs there
    thread.join(timeout=600)
    assert not thread.is_alive() and "error" not in box, box.get("error")
    first = box["first"]
    assert sorted(first.status) == ["FAILED", "FINISHED", "FINISHED"], first
    lost = first.point[first.status == "FAILED"].item()
    assert any(line.startswith("[3/3]") for line in lines) and any("worker lost" in line for line in lines)
    runs = children()
    assert not [r for r in runs if r.info.status == "RUNNING"]  # consistent: nothing left RUNNING
    failed = [r for r in runs if r.info.status == "FAILED"]
    assert len(failed) == 1 and failed[0].data.tags["point_key"] == lost
    assert "worker lost" in failed[0].data.tags["error"]
    exported = json.loads((tmp_path / "results" / "ray_tiny" / "points" / f"{lost}.json").read_text())
    assert exported["status"] == "FAILED" and exported["run_id"] == failed[0].info.run_id

    second = run_sweep(path, tracking_uri=uri, out_dir=out, echo=lambda *a: None,
                       executor=RayExecutor(cluster["address"]))  # only the head node is left
    assert second.set_index("point").status.to_dict() == {
        p: ("FINISHED" if p == lost else "SKIPPED") for p in ["x=1", "x=2", "x=3"]}
    assert second.score.tolist() == [0.5, 1.0, 1.5]
    runs = children()
    assert len(runs) == 4 and sum(r.info.status == "FINISHED" for r in runs) == 3
    parents = [r for r in client.search_runs([client.get_experiment_by_name("ray_sweep").experiment_id])
               if r.data.tags.get("sweep_role") == "parent"]
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    for x in (1, 2, 3):
        result = json.loads((tmp_path / "results" / "ray_tiny" / "points" / f"x={x}.json").read_text())
        run = client.get_run(result["run_id"])
        assert result["status"] == "FINISHED" and run.info.status == "FINISHED"
        assert result["metrics"]["score"] == run.data.metrics["score"] == 0.5 * x
        assert result["metrics"]["eval/niah/128"] == pytest.approx(0.1 * x)
        assert result["params"]["scale"] == "0.5" and result["tags"]["x"] == str(x)
