"""The report: figures, summary tables and the study's question (does geometry change predict caption
instability?), from the upstream stages' files. Plain tables in, files out; no model, no DVC."""

from conngeo.report.stats import spearman, spearman_ci

__all__ = ["spearman", "spearman_ci"]
