"""The worker side: job functions, by family, and the engine that runs them.

- mail/: send_email, send_newsletter (SMTP pool, headers, send rate)
- scrape/: scrape, scrape_source, schedule_sources (fetch, SSRF guard, robots.txt,
  politeness, encodings, documents, sources)
- housekeeping/: daily_cleanup, daily_report, report, export
- engine/: how a worker claims, runs and finishes jobs (Lua scripts, leases, wake-ups, monitor)
- worker.py wires them into arq's worker options; retry, deadletter, errors, values and
  cpulimit are shared by every family.

Nothing here imports app/ (the web side); what both sides share is in asyncjobs/.
"""
