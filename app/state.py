"""Typed keys of what the aiohttp application holds."""

from aiohttp import web
from arq.connections import ArqRedis

from asyncjobs.settings import Settings
from jobs.cpulimit import CpuPool

SETTINGS = web.AppKey("settings", Settings)
REDIS = web.AppKey("redis", ArqRedis)
CPU = web.AppKey("cpu", CpuPool)  # validation whose cost a caller's input decides
