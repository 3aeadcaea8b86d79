"""The engine: how this project's arq worker claims, runs and finishes jobs.

- queue.py: the Lua scripts (enqueue, claim, finish, renew) over arq's key layout
- runner.py: one worker's claims, job runs and batched finishes
- worker.py: the Worker subclass that uses them, with leases, wake-ups and Redis restarts
- monitor.py: job counts, durations and the running set, flushed to Redis for /metrics and /ui
"""
