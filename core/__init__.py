"""What the web side (app/) and the worker side (jobs/) share, below both: settings, Redis
connections and the name of every Redis key. Nothing here imports app/ or jobs/."""

__version__ = "0.1.0"
