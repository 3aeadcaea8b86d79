"""asyncjobs: an asyncio-native background-job service (aiohttp API + arq worker over Redis)."""

__version__ = "0.1.0"
