"""Pictures and pages: sample grids and the HTML report."""

from diffquant.report.grid import save_grid, to_grid
from diffquant.report.html import write_report

__all__ = ["save_grid", "to_grid", "write_report"]
