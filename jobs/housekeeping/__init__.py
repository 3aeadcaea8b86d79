"""Housekeeping jobs: the daily cleanup, the report (daily or on demand) and exports."""

from jobs.housekeeping.cleanup import daily_cleanup
from jobs.housekeeping.export import export
from jobs.housekeeping.report import daily_report, report

__all__ = ["daily_cleanup", "daily_report", "export", "report"]
