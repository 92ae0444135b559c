"""The MLflow UI shows a sweep: run tests/data/tiny_sweep.yaml into a sqlite store, serve it with `mlflow server` on
127.0.0.1, open the experiment at the address hylo_lab gives (tracking.experiment_url) in a fresh headless Chromium,
check that it opens on the runs table and not on MLflow 3.17's GenAI overview (its default for a plain experiment
address in a browser that never chose "Model training"), expand the parent run and find every point's child run by
name. The screenshot is kept in tests/artifacts/mlflow_ui.png, and copied to ablations/results/mlflow_ui.png when
HYLO_LAB_UI_SCREENSHOT=1."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (apt-get install chromium chromium-driver; .ci/run does)",
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(url: str, timeout: float, server: subprocess.Popen, log: Path):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not up after {timeout} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def mlflow_server(tmp_path):
    """(base URL, tracking URI): the store's tables are created here first so the server and the sweep never race
    to create them (find_runs does not create a missing database); the server comes up (~20 s the first time)
    while the sweep runs."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.MlflowClient(uri).search_experiments()
    port, log = free_port(), tmp_path / "server.log"
    with open(log, "w") as out:
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1", "--default-artifact-root", str(tmp_path / "server-artifacts")],
            stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        yield f"http://127.0.0.1:{port}", uri, server, log
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # the server and the workers it started, nothing else
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def chrome(window=(1400, 900)):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                f"--user-data-dir={tempfile.mkdtemp(prefix='chromium-')}", f"--window-size={window[0]},{window[1]}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)  # a given driver: no download


def test_sweep_runs_are_visible_in_the_mlflow_ui(tmp_path, mlflow_server):
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    from hylo_lab.sweep import run_sweep
    from hylo_lab.tracking import experiment_url, find_runs

    base, uri, server, log = mlflow_server
    summary = run_sweep(ROOT / "tests" / "data" / "tiny_sweep.yaml", jobs=1, tracking_uri=uri,
                        out_dir=tmp_path / "notebooks", points_dir=tmp_path / "points", echo=lambda *a: None)
    assert summary.status.tolist() == ["FINISHED", "FINISHED", "FAILED"]
    experiment_id = find_runs("tiny_sweep", tracking_uri=uri)[0]["experiment_id"]
    import mlflow

    kind = mlflow.MlflowClient(uri).get_experiment(experiment_id).tags.get("mlflow.experimentKind")
    assert kind == "custom_model_development", f"experiment kind {kind!r}: earlier MLflow 3 UIs open it on traces"
    wait_for(f"{base}/health", 90, server, log)

    keep = ROOT / "tests" / "artifacts" / "mlflow_ui.png"
    keep.parent.mkdir(exist_ok=True)
    expected = {"tiny", *summary.point}
    driver = chrome()
    try:
        driver.get(experiment_url(experiment_id, base))
        body = lambda d: d.find_element(By.TAG_NAME, "body").text.replace("\n", " ")  # noqa: E731
        # the runs table's footer counts parent and children once every run is loaded
        try:
            WebDriverWait(driver, 60).until(lambda d: f"{len(expected)} matching runs" in body(d))
        except TimeoutException:
            driver.save_screenshot(str(keep))
            pytest.fail(f"no runs table at {driver.current_url} (screenshot {keep}): {body(driver)[:600]}")
        genai = [w for w in ("/overview", "/traces", "workflowType=genai") if w in driver.current_url]
        genai += [w for w in ("Detect Issues", "Token Usage") if w in body(driver)]
        assert "/runs" in driver.current_url and not genai, f"{driver.current_url} shows the GenAI view: {genai}"
        for button in driver.find_elements(By.CSS_SELECTOR, "button[aria-label=Close]"):
            button.click()  # the assistant side panel, so the table gets the width
        name_cells = "[col-id='attributes.`Run Name`'] a"
        shown = lambda d: {e.text for e in d.find_elements(By.CSS_SELECTOR, name_cells)}  # noqa: E731
        for _ in range(3):  # child runs are folded under their parent; a re-render can fold them again
            if expected <= shown(driver):
                break
            # the expander sits in the parent's run-name cell
            for button in driver.find_elements(By.CSS_SELECTOR, "button[data-component-id*=runnamecellrenderer]"):
                button.click()
            try:
                WebDriverWait(driver, 10).until(lambda d: expected <= shown(d))
            except TimeoutException:
                pass
        driver.save_screenshot(str(keep))
        assert expected <= shown(driver), f"runs page shows {sorted(shown(driver))}, expected {sorted(expected)}"
    finally:
        driver.quit()
    assert keep.stat().st_size > 10_000
    if os.environ.get("HYLO_LAB_UI_SCREENSHOT") == "1":
        target = ROOT / "ablations" / "results" / "mlflow_ui.png"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(keep, target)
