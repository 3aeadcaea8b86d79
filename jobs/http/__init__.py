"""HTTP jobs: `POST /jobs/http` calls a URL, signed, retried, within per-target limits (job.py);
the request's model (spec.py), the limits (limits.py) and the guarded session (session.py)."""
