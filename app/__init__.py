"""asyncjobs: an asyncio-native background-job service (aiohttp API + arq worker over Redis).

The web side: it validates requests and enqueues jobs (routes/), shows them (dashboard/) and
serves metrics; the worker side is jobs/, and what both share is asyncjobs/ (the public package)."""
