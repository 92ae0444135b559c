"""Papermill sweeps: a YAML file names a notebook, fixed parameters and a grid; every grid point executes the
notebook once as a child MLflow run under one parent run per sweep.

    name: yarn                                # the sweep's identity: a re-run finds its parent run by this
    notebook: notebooks/00_quickstart.ipynb   # relative to the YAML's folder, else to the project root
    experiment: ablations                     # MLflow experiment of the parent and its children
    description: ...                          # optional free text (and paper_finding: ...)
    fixed: {quick: false, yarn_eval: fixed}   # every point gets these
    grid: {stages.kd-long.yarn.factor: [2.0, 4.0]}    # the full product of these lists
    include: [{stages.kd-long.seq_len: 1024}]         # optional extra points, not crossed with the grid
    seeds: [0, 1]                             # optional: one more grid axis, `seed`
    metrics: [eval/niah/256, eval/niah/512]   # shown by the summary and compare (fnmatch globs allowed)
    plots: [{x: length, y: "eval/niah/{length}", hue: stages.kd-long.yarn.factor, kind: line}]   # see compare

Every fixed, grid and include parameter must be declared in the notebook's `parameters` cell, with a value
of the declared type, or be a dotted key: a field of the notebook's recipe, passed to it joined into its
`overrides` parameter ("stages.kd-long.seq_len=1024; ...", read by distill.stages.parse_overrides) and checked
there by the recipe checker. The sweep sets `run_id`, `parent_run_id`, `experiment` and `tracking_uri` itself (the
notebook must declare them) so the notebook's own Tracker logs into the child run the sweep created; a
notebook declaring `out_dir` gets a folder per point unless the sweep sets it. A point is identified by its
`point_key` ("yarn_factor=2.0;seed=0") and a hash of its parameters: a re-run skips points whose run
FINISHED with the same parameters, and runs the rest (failed, killed, new or changed) in new child runs.

Seeds: `seeds` crosses every point with `seed` (the notebook's student seed: init, data order, evaluation
samples; what the seed does not change, such as the quickstart's `world_seed` world and teachers, is shared);
`hylo-lab sweep FILE --seeds 0,1,2` replaces the file's list. A point x seed is one child run tagged `seed`.
Each point's result is also exported to `results/<name>/points/<point>.json` beside the YAML
(executors.export_result: parameters, metrics, where it ran): a re-run skips points whose exported file
FINISHED with the same parameters too, so a sweep resumes on another machine from the committed exports, and
compare rebuilds runs.csv from them without MLflow. The parent run logs the aggregates over seeds
(compare.aggregate: mean, 95% CI, n per point and metric) as tables/aggregates.csv.
"""

from .runs import child_runs, display_path, expand_metrics, export_as_run, find_parent, natural_key, runs_frame
from .running import progress_line, run_point, run_sweep, slug
from .spec import (INJECTED, METRIC_PATTERN, OVERRIDES, Param, Sweep, SweepError, is_override, load_sweep,
                   notebook_parameters, params_hash, parse_only, parse_seeds, point_key)

__all__ = ["INJECTED", "METRIC_PATTERN", "OVERRIDES", "Param", "Sweep", "SweepError", "child_runs", "display_path",
           "expand_metrics", "export_as_run", "find_parent", "is_override", "load_sweep", "natural_key",
           "notebook_parameters", "params_hash", "parse_only", "parse_seeds", "point_key", "progress_line",
           "run_point", "run_sweep", "runs_frame", "slug"]
