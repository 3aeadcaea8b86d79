"""Typed keys of what the aiohttp application holds."""

from aiohttp import web
from arq.connections import ArqRedis

from asyncjobs.settings import Settings

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", ArqRedis)
