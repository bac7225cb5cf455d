"""results.json (the contract other tools read) and the terminal table."""

from keiryo.report.results import RESULTS_SCHEMA_VERSION, build_results, read_results, write_results
from keiryo.report.table import results_table

__all__ = ["RESULTS_SCHEMA_VERSION", "build_results", "read_results", "results_table", "write_results"]
