"""`hylo-lab demo`: execute notebooks/00_quickstart.ipynb with papermill into a staged folder, then its HTML."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from ..errors import UserError
from .settings import DEFAULT_OUT, QUICK_PARAMETERS, DemoSettings, with_linear


def notebook_path() -> Path:
    """notebooks/00_quickstart.ipynb of this checkout."""
    path = Path(__file__).resolve().parents[2] / "notebooks" / "00_quickstart.ipynb"
    if not path.is_file():
        raise FileNotFoundError(f"the quickstart notebook is missing: {path}")
    return path


def run_demo(*, quick: bool = False, linear: str = "gdn", out_dir=None, tracking_uri: str = "",
             experiment: str = "quickstart", extra: dict | None = None, echo=print) -> dict:
    """Execute notebooks/00_quickstart.ipynb with papermill into `out_dir` (default runs/demo, or runs/demo-quick),
    its output streamed to the terminal; then write its HTML next to it. Returns summary.json's content plus
    `notebook`, `html`, `figures` and `out_dir`. Bad settings or an unwritable `out_dir` raise UserError before
    anything runs; a second demo on the same folder is refused while one runs; the previous results are replaced
    only when the new run succeeded."""
    import logging

    import nbformat
    import papermill
    from nbconvert import HTMLExporter

    from ..outputs import check_writable, locked, staged

    out = Path(out_dir or (DEFAULT_OUT + ("-quick" if quick else ""))).resolve()
    params = dict(quick=quick, out_dir=str(out), experiment=experiment, tracking_uri=tracking_uri, **(extra or {}))
    if linear != "gdn":
        layout = with_linear(DemoSettings(**params).student_layout, linear)
        params["overrides"] = "; ".join(x for x in (params.get("overrides", ""), f"student.layout={layout}") if x)
    DemoSettings(**params)  # bad values fail here, before a kernel starts
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; give a folder")
    check_writable(out, "--out")
    notebook = notebook_path()
    # The notebook's defaults are the quick run: the full demo passes the full values of what --quick changes.
    full = {k: DemoSettings.__dataclass_fields__[k].default for k in QUICK_PARAMETERS}
    params = dict(QUICK_PARAMETERS if quick else full) | params
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("papermill").setLevel(logging.INFO)
    t0 = time.perf_counter()
    # The notebook writes into a sibling folder that replaces `out` only when everything ran: until then (and after
    # a failure or a kill) the previous results stay as they were.
    with locked(out, "hylo-lab demo"), staged(out, whole=True) as tmp:
        params["out_dir"] = staging = str(tmp)
        executed = tmp / "00_quickstart.ipynb"
        echo(f"hylo-lab demo{' --quick' if quick else ''}: executing {notebook.name} -> {out / executed.name} "
             f"(written to {tmp.name} until it succeeds)")
        previous = os.environ.get("HYLO_LAB_PROGRESS")
        os.environ["HYLO_LAB_PROGRESS"] = "lines"  # the kernel's bars: a few lines each, not one per refresh
        try:
            papermill.execute_notebook(str(notebook), str(executed), parameters=params, kernel_name="python3",
                                       log_output=True, progress_bar=False, cwd=str(Path.cwd()))
        finally:
            if previous is None:
                os.environ.pop("HYLO_LAB_PROGRESS", None)
            else:
                os.environ["HYLO_LAB_PROGRESS"] = previous
        nb = report_first(nbformat.read(str(executed), as_version=4))
        nbformat.write(nb, str(executed))
        html, _ = HTMLExporter().from_notebook_node(nb)
        (tmp / "00_quickstart.html").write_text(html, encoding="utf-8")
        summary = json.loads((tmp / "summary.json").read_text())
    executed, html_path = out / "00_quickstart.ipynb", out / "00_quickstart.html"
    if summary.get("run_id"):
        from ..tracking import Tracker

        tracker = Tracker(summary["experiment"], tracking_uri=summary["tracking_uri"], run_id=summary["run_id"])
        tracker.log_artifact(executed, "notebook")
        tracker.log_artifact(html_path, "notebook")
        tracker.set_tags({k: v.replace(staging, str(out)) for k, v in tracker.get_tags().items() if staging in v})
    summary.update(notebook=str(executed), html=str(html_path), out_dir=str(out),
                   figures=sorted(str(p) for p in (out / "figures").glob("*.png")),
                   wall_seconds=time.perf_counter() - t0)
    return summary


def report_first(nb):
    """The executed notebook as a report: the cells tagged `report` (results, conclusion, figures) right after the
    opening markdown cell, then a "Details" heading and every other cell in the order it ran."""
    import nbformat

    lead = [c for c in nb.cells if "report" in c.metadata.get("tags", [])]
    rest = [c for c in nb.cells if c not in lead]
    head = rest[:1] if rest and rest[0].cell_type == "markdown" else []
    details = nbformat.v4.new_markdown_cell("## Details\nEvery step as it ran: settings, the toy world, "
                                            "distillation, evaluation.")
    nb.cells = head + lead + [details] + rest[len(head):]
    return nb
