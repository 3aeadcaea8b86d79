"""One typed settings object, read from environment variables (and an optional `.env` file)."""

from __future__ import annotations

from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network, ip_network
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from asyncjobs.addresses import check_address, domain_of
from asyncjobs.version import __version__

Network = IPv4Network | IPv6Network


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", frozen=True)

    # Redis / arq
    redis_url: str = "redis://127.0.0.1:6379/0"
    # High availability: with REDIS_SENTINELS (host:port, comma-separated) every client asks
    # the sentinels for REDIS_SENTINEL_MASTER's primary, and again after a failover; REDIS_URL
    # then gives only the database number and password.
    redis_sentinels: Annotated[list[tuple[str, int]], NoDecode] = []
    redis_sentinel_master: str = "mymaster"
    # Durable acknowledgement: with REDIS_WAIT_REPLICAS=n an enqueue answers 202 (and a worker
    # counts a sent marker or a dead letter as written) only once n replicas have it (WAIT,
    # at most REDIS_WAIT_TIMEOUT_MS); otherwise 503. 0: no wait (asynchronous replication).
    redis_wait_replicas: int = Field(0, ge=0, le=16)
    redis_wait_timeout_ms: int = Field(1000, ge=1)
    redis_timeout: float = Field(2.0, gt=0, description="connect and socket timeout, seconds")
    queue_name: str = "arq:queue"

    # Web API
    # Bearer keys, comma-separated: full access, and read-only (GET only). From the environment.
    api_keys: Annotated[list[SecretStr], NoDecode] = []
    # Modules with users' own `@job` functions, comma-separated (myproject.tasks), imported
    # by the worker and the API at start (the current directory is searched last).
    job_modules: Annotated[list[str], NoDecode] = []
    api_read_keys: Annotated[list[SecretStr], NoDecode] = []
    # Enqueue requests one key may make per window, counted in Redis across web processes.
    # Slow clients: a request body must arrive within HTTP_BODY_TIMEOUT seconds (else 408), and
    # an idle keep-alive connection is closed after HTTP_KEEPALIVE_TIMEOUT. Headers that trickle
    # in are a reverse proxy's to time out (docs/operations.md, "Running in production").
    http_body_timeout: float = Field(10, gt=0)
    http_keepalive_timeout: float = Field(15, gt=0)
    rate_limit_requests: int = Field(120, ge=1)
    rate_limit_window: float = Field(60, gt=0, description="seconds")
    # Failed dashboard sign-ins per client address, per window (seconds).
    login_max_failures: int = Field(10, ge=1)
    login_failure_window: float = Field(300, gt=0)
    web_host: str = "127.0.0.1"
    web_port: int = Field(8000, ge=0, le=65535)
    max_body_bytes: int = Field(1024 * 1024, gt=0)
    max_urls_per_request: int = Field(100, gt=0)
    # Jobs in one POST /batches: each is charged as its own request, so the default stays
    # under RATE_LIMIT_REQUESTS' (a larger batch could never fit: a 422 saying so).
    batch_max_jobs: int = Field(100, gt=0)
    max_selectors: int = Field(20, gt=0)
    # How far ahead a job may be scheduled with `run_at` / `delay_seconds` (seconds).
    max_delay_seconds: float = Field(30 * 24 * 3600, gt=0)
    # A job's `unique_key` holds for its window (`unique_window_seconds`, default an hour, capped
    # by UNIQUE_WINDOW_MAX) or until the job ends, whichever comes first (seconds).
    unique_window_max: float = Field(30 * 24 * 3600, gt=0)
    # Completion webhooks (`callback_url`): signed with HMAC-SHA256 of this secret; a request
    # with a callback_url is refused while it is unset. Each POST times out after
    # WEBHOOK_TIMEOUT seconds and is tried up to WEBHOOK_MAX_TRIES times with backoff.
    webhook_secret: SecretStr | None = None
    webhook_timeout: float = Field(10, gt=0)
    webhook_max_tries: int = Field(8, ge=1)
    # HTTP jobs (`POST /jobs/http`, jobs/http/): each request is signed as webhooks are, with
    # HTTP_JOBS_SECRET, or WEBHOOK_SECRET when that is unset (one secret for both unless the
    # receivers must not share it); with neither, POST /jobs/http is refused.
    http_jobs_secret: SecretStr | None = None
    # A request's timeout when it gives none, and the most it may ask for (seconds).
    http_jobs_timeout: float = Field(30, gt=0)
    http_jobs_max_timeout: float = Field(120, gt=0)
    # Tries of a transient failure (408, 429, 5xx, timeouts, network errors), backoff as
    # RETRY_BASE_DELAY..RETRY_MAX_DELAY, a Retry-After (up to RETRY_MAX_DELAY) as a floor.
    http_jobs_max_tries: int = Field(10, ge=1)
    # The response body kept in a job's result (more is cut, and the result says so).
    http_jobs_result_max_bytes: int = Field(64 * 1024, ge=0)
    http_jobs_max_connections: int = Field(100, gt=0, description="the HTTP jobs' pool")
    # Limits per target (a host:port, or the `limit_group` a request names), shared by every
    # worker through Redis; a job over them waits for its turn, it does not fail. Each is the
    # default for a target and the most a request may ask for (it may ask for less); 0: none.
    http_jobs_concurrency: int = Field(0, ge=0, description="requests at once per target")
    http_jobs_rate_per_second: float = Field(0, ge=0, description="request starts per second")
    # What HTTP jobs may call, apart from the scraper's SCRAPE_ALLOWED_*: internal services are
    # their usual targets. Ports ("*": any), networks that may be reached although non-public,
    # and host names whose addresses are not checked at all (exact, or "*.svc.internal").
    http_jobs_allowed_ports: Annotated[list[int] | None, NoDecode] = [80, 443]
    http_jobs_allowed_cidrs: Annotated[list[Network], NoDecode] = []
    http_jobs_allowed_hosts: Annotated[list[str], NoDecode] = []

    # Worker
    worker_max_jobs: int = Field(200, gt=0, description="jobs one worker runs at once")
    # `python -m app worker` (and `python -m app dev`) start this many worker processes; 0:
    # one per CPU. `arq worker_settings.WorkerSettings` is always one process.
    worker_processes: int = Field(0, ge=0, le=256)
    job_timeout: float = Field(300, gt=0)
    keep_result: float = Field(24 * 3600, gt=0, description="seconds arq keeps a job's result")
    worker_health_interval: float = Field(10, gt=0)
    # A running job's claim lasts this long unless its worker renews it (every second): a
    # SIGKILLed worker's jobs run again after at most this, a live one's are never taken.
    job_lease_seconds: float = Field(15, ge=3)
    # SIGTERM: stop taking jobs, let running ones finish for this long, then leave them to re-run.
    shutdown_grace: float = Field(25, ge=0)
    # How long the worker keeps retrying Redis commands while Redis restarts, seconds.
    worker_redis_retry_seconds: float = Field(30, ge=0)

    # Retries of transient failures: exponential backoff with jitter, per job family.
    scrape_max_tries: int = Field(3, ge=1)
    retry_base_delay: float = Field(2.0, gt=0)
    retry_max_delay: float = Field(600, gt=0)
    # Email retries as an MTA does them: a transient failure (connect error, timeout, 4xx) is
    # tried again from 1 minute to every hour for 2 days after the message was enqueued
    # (Postfix: 5 min to 67 min, for 5 days); a 5xx goes to the dead-letter store at once.
    email_retry_base_delay: float = Field(60, gt=0, description="seconds")
    email_retry_max_delay: float = Field(3600, gt=0, description="seconds")
    email_retry_lifetime: float = Field(2 * 24 * 3600, gt=0, description="seconds")
    email_max_tries: int = Field(500, ge=1, description="a ceiling; the lifetime ends it first")
    sent_marker_ttl: float = Field(7 * 24 * 3600, gt=0, description="dedup window for emails")
    idempotency_ttl: float = Field(24 * 3600, gt=0)

    # Email
    smtp_host: str | None = None
    smtp_port: int = Field(25, ge=1, le=65535)
    smtp_username: str | None = None
    smtp_password: SecretStr | None = None
    smtp_use_tls: bool = False  # implicit TLS (port 465)
    smtp_start_tls: bool | None = None  # None: use STARTTLS when the server offers it
    # Verify the server's certificate (implicit TLS or STARTTLS) against the system's CAs, or
    # against SMTP_TLS_CA_FILE (a private CA). false is logged as a warning when a worker starts.
    smtp_tls_verify: bool = True
    smtp_tls_ca_file: Path | None = None
    smtp_timeout: float = Field(30, gt=0)
    smtp_max_connections: int = Field(10, gt=0)
    # Messages per second across every worker (shared through Redis); 0: no limit. Messages
    # over the rate wait for their turn (in the queue when it is over 10 s away), never fail.
    smtp_max_per_second: float = Field(0, ge=0)
    # Work whose cost a caller's input decides (CSS selectors, newsletter templates) runs in
    # CPU_WORKERS pool processes and is stopped after CPU_LIMIT_SECONDS (the job fails for good).
    cpu_limit_seconds: float = Field(5, gt=0)
    cpu_workers: int = Field(2, ge=1, le=32)
    # Address space of each pool process (MiB; 0: none): whatever slips past the templates'
    # sandbox or a selector's bounds fails with the reason instead of exhausting the host.
    cpu_memory_limit_mb: int = Field(2048, ge=0)
    # The default sender; checked at start against the rules below, as every address is.
    mail_from: str = "asyncjobs@localhost.localdomain"
    # Dotless domains (you@localhost, ops@mailhost): off by default, on in `python -m app dev`.
    mail_allow_local_domains: bool = False
    mail_max_recipients: int = Field(50, gt=0)
    # The domains callers may send `from` (the service is not an open relay): by default
    # MAIL_FROM's only; "*" allows any (a trusted network, or a relay that checks it itself).
    mail_allowed_sender_domains: Annotated[list[str], NoDecode] = []
    newsletter_max_recipients: int = Field(10_000, gt=0)
    # Messages one API key may have sent per hour (emails' recipients, newsletters', and every
    # run of its schedules), a bucket that refills continuously: it must hold the largest
    # newsletter, so that one is admitted at once when the bucket is full.
    mail_messages_per_hour: int = Field(20_000, gt=0)
    # An email's attachments (bytes before base64): each, and all of one message together.
    # Inline ones also fit in the request body (MAX_BODY_BYTES); URLs are fetched by the worker.
    mail_max_attachment_bytes: int = Field(10 * 1024 * 1024, gt=0)
    mail_max_total_attachment_bytes: int = Field(10 * 1024 * 1024, gt=0)
    mail_sink_dir: Path | None = Field(None, description="dev mail sink folder; enables /dev/mail")

    # Scraping
    scrape_timeout: float = Field(20, gt=0, description="total seconds for one page")
    scrape_connect_timeout: float = Field(5, gt=0)
    scrape_max_bytes: int = Field(5 * 1024 * 1024, gt=0)
    scrape_max_redirects: int = Field(5, ge=0)
    scrape_user_agent: str = f"asyncjobs/{__version__} (+https://github.com/asyncjobs/asyncjobs)"
    scrape_max_connections: int = Field(100, gt=0)
    scrape_text_max_chars: int = Field(100_000, gt=0, description="text kept per saved document")
    scrape_keep_versions: int = Field(5, ge=1, description="distinct versions kept per URL")
    # Politeness, shared by every worker through Redis.
    scrape_per_host_concurrency: int = Field(2, ge=0, description="0: no limit")
    scrape_min_host_delay: float = Field(
        1.0, ge=0, description="seconds between requests to a host"
    )
    robots_ttl: float = Field(3600, gt=0, description="seconds a host's robots.txt is cached")
    # Sources: scheduled scraping; follow_links crawls at most this many pages per source run.
    source_max_pages: int = Field(50, ge=1)
    scheduler_tick_seconds: int = Field(
        60, ge=1, le=60, description="how often due sources are checked"
    )
    cleanup_hour: int = Field(3, ge=0, le=23, description="UTC hour of the daily cleanup")
    report_hour: int = Field(4, ge=0, le=23, description="UTC hour of the daily report")

    # Image jobs: a URL's image may be this large (an upload: MAX_BODY_BYTES); an image with
    # more pixels than this is refused before it is decoded. Versions go to IMAGES_DIR and are
    # removed by the cleanup after EXPORT_TTL, like exports.
    image_max_bytes: int = Field(10 * 1024 * 1024, gt=0)
    image_max_pixels: int = Field(40_000_000, gt=0)
    images_dir: Path = Path("var/images")
    # An upload waits in Redis for its job and is removed when the job ends (complete, failed
    # for good, aborted while it runs). One no try reaches expires UPLOAD_TTL seconds after it
    # was due (after the job's delay), or after its last try began; at least JOB_TIMEOUT +
    # RETRY_MAX_DELAY, so that a retry still finds it.
    upload_ttl: float = Field(3600, gt=0, description="seconds")
    # Bytes one API key's uploads may hold in Redis at once: over it a 429 whose Retry-After is
    # when enough of them have expired at the latest (ending jobs free room sooner); an upload
    # larger than this alone is a 422. Without API_KEYS there is no key, and no quota.
    upload_max_bytes_per_key: int = Field(50 * 1024 * 1024, gt=0)

    # Housekeeping (daily cron jobs)
    exports_dir: Path = Path("var/exports")
    export_ttl: float = Field(7 * 24 * 3600, gt=0, description="seconds an export file is kept")
    version_retention: float = Field(90 * 24 * 3600, gt=0, description="seconds versions are kept")
    dead_letter_retention: float = Field(30 * 24 * 3600, gt=0)
    maintenance_max_tries: int = Field(3, ge=1)

    # Ports the scraper may connect to; "*" in the environment means any port.
    scrape_allowed_ports: Annotated[list[int] | None, NoDecode] = [80, 443]
    # Addresses the scraper may reach although they are private/loopback/link-local.
    scrape_allowed_cidrs: Annotated[list[Network], NoDecode] = []

    @field_validator("redis_sentinels", mode="before")
    @classmethod
    def _host_ports(cls, value: object) -> object:
        """`host:port,host:port` from the environment."""
        if not isinstance(value, str):
            return value
        pairs = []
        for item in filter(None, (part.strip() for part in value.split(","))):
            host, sep, port = item.rpartition(":")
            if not sep or not host or not port.isdigit():
                raise ValueError(f"{item!r} is not host:port")
            pairs.append((host, int(port)))
        return pairs

    @field_validator("scrape_allowed_cidrs", "http_jobs_allowed_cidrs", mode="before")
    @classmethod
    def _split_cidrs(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [ip_network(part.strip()) for part in value.split(",") if part.strip()]
        return value

    @field_validator("api_keys", "api_read_keys", "job_modules", mode="before")
    @classmethod
    def _split_keys(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("scrape_allowed_ports", "http_jobs_allowed_ports", mode="before")
    @classmethod
    def _split_ports(cls, value: Any) -> Any:
        if isinstance(value, str):
            if value.strip() == "*":
                return None
            return [int(part) for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _mail_from_is_an_address_we_accept(self) -> Settings:
        try:  # the settings are frozen: checked, not rewritten
            check_address(self.mail_from, self.mail_allow_local_domains)
        except ValueError as exc:
            raise ValueError(f"MAIL_FROM={self.mail_from!r}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _limits_agree(self) -> Settings:
        if self.newsletter_max_recipients > self.mail_messages_per_hour:
            raise ValueError(
                f"NEWSLETTER_MAX_RECIPIENTS={self.newsletter_max_recipients} is more than "
                f"MAIL_MESSAGES_PER_HOUR={self.mail_messages_per_hour}: the largest newsletter "
                "allowed could never be sent; lower the one or raise the other"
            )
        return self

    @field_validator("http_jobs_allowed_hosts", mode="before")
    @classmethod
    def _split_hosts(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = value.split(",")
        return [part.strip().lower().rstrip(".") for part in value if part.strip()]

    @field_validator("mail_allowed_sender_domains", mode="before")
    @classmethod
    def _split_domains(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip().lower() for part in value.split(",") if part.strip()]
        return value

    @property
    def sender_domains(self) -> list[str] | None:
        """The domains a caller may use in `from`; None: any."""
        if "*" in self.mail_allowed_sender_domains:
            return None
        return self.mail_allowed_sender_domains or [domain_of(self.mail_from)]

    @property
    def http_jobs_signing_secret(self) -> SecretStr | None:
        """What HTTP jobs are signed with: HTTP_JOBS_SECRET, else WEBHOOK_SECRET."""
        return self.http_jobs_secret or self.webhook_secret

    @property
    def version(self) -> str:
        return __version__


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
