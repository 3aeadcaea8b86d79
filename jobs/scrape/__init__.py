"""Scraping jobs: one page (scrape), a source's pages (scrape_source) and the cron job that
starts due sources (schedule_sources)."""

from jobs.scrape.page import scrape
from jobs.scrape.scheduler import schedule_sources, scrape_source

__all__ = ["schedule_sources", "scrape", "scrape_source"]
