"""The HTML report QA reads: images drawn for humans, one card per case, written atomically.

Five parts, each importing only from the ones before it (``drawing`` from none):

- :mod:`audit.report.drawing`: pure pixel work, arrays in and pictures out (``feature_grid``,
  ``colorize``, ``overlay``, ``colorbar``, ``draw_regions``, ``hottest_point``, display sizes).
- :mod:`audit.report.assets`: one case's pictures, drawn and written into the run's asset folder by a
  background thread (``render_case_assets``, ``flush_assets``). pytest-xdist workers call it and write
  straight into the run's folder, so the controller never ships pixels between processes.
- :mod:`audit.report.folder`: the report folder's lifecycle (``check_writable``, one asset folder per
  run from ``new_run_dir``, the atomic commit of the page's files, ``discard_run``).
- :mod:`audit.report.page`: ``write_report``, once, on the controller: the view models and number
  formats of ``results.json`` and ``index.html`` (jinja2, autoescape on), which only reads the
  pictures' files (sizes for the layout, bytes for the self-contained page).
- :mod:`audit.report.compare`: ``write_compare``, the page of ``model-audit compare``, built from the
  parts above (its cards are the report's).

Everything the rest of model-audit (and its tests, benchmarks and examples) uses is importable from
here: ``from audit.report import write_report``. A test that patches an internal patches the part
where it is looked up (``audit.report.page._case_view``, ``audit.report.folder._write_temp``). No torch
here (see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

from audit.report.drawing import (COLORMAPS, SEEN, _blend, _draw_regions, colorbar, colorize, draw_regions,
                                  feature_grid, grid_columns, hottest_point, overlay,
                                  place_in_seen_box)
from audit.report.assets import _write_picture, flush_assets, render_case_assets, safe_stem
from audit.report.folder import (RUN_ID_PATTERN, check_writable, discard_run, discard_run_dir, new_run_dir,
                                 release_run_dir)
from audit.report.page import (SCHEMA_VERSION, _results_json, _template_cache, fmt_prob, fmt_threshold, fmt_value,
                               write_report)
from audit.report.compare import write_compare

__all__ = ["feature_grid", "grid_columns", "colorize", "overlay", "colorbar", "draw_regions",
           "hottest_point", "place_in_seen_box", "COLORMAPS", "SEEN", "safe_stem", "render_case_assets",
           "flush_assets", "check_writable", "new_run_dir", "release_run_dir", "discard_run", "discard_run_dir",
           "write_report", "write_compare", "fmt_prob", "fmt_threshold", "fmt_value", "SCHEMA_VERSION", "RUN_ID_PATTERN",
           # internals that the tests use through this package
           "_blend", "_draw_regions", "_write_picture", "_results_json", "_template_cache"]
