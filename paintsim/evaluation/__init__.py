"""Do the neighbours mean anything? Four sections, each one module, and the report.

``similarity`` (intra vs inter, checked against the HDF5 matrix), ``retrieval`` (same artist or
another label), ``copies`` (perturbed copies found), ``pixels`` (SSIM/RMSE baselines); ``run``
ties them together and ``report`` prints and draws the result.
"""
from .report import Evaluation, read_report, save_figures, summary_table, write_report
from .run import EvalConfig, evaluate

__all__ = ["EvalConfig", "Evaluation", "evaluate", "read_report", "save_figures", "summary_table",
           "write_report"]
