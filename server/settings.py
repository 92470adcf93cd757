"""The control server's settings: one typed object, loaded once (YAML file, then REDDWARF_* environment,
then command-line overrides) and passed down. Nothing deeper in the server reads the environment."""
from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from reddwarf.common import config
from reddwarf.common.errors import InvalidArgument


@dataclass(frozen=True)
class Quota:
    instances: int = 10
    memory_mb: int = 16384
    volume_gb: int = 200
    backups: int = 50
    backup_bytes: int = 1 << 40            # what the tenant's stored backups may hold in total (1 TiB)


@dataclass(frozen=True)
class Settings:
    state_dir: str = "/var/lib/reddwarf/server"
    # default: sqlite under state_dir. Several servers share one MariaDB/Galera (mysql+pymysql://u:p@h1:3306,
    # h2:3306/db: nodes tried in order) or PostgreSQL (postgresql+psycopg://u@h/db) database.
    db_url: str = ""
    name: str = "control"                  # this server's id in its certificate and in task leases
    api_listen: str = "127.0.0.1:8779"     # public + admin API (mTLS)
    agent_listen: str = "127.0.0.1:8780"   # guest agents' streams (mTLS, instance certificates)
    enroll_listen: str = "127.0.0.1:8781"  # one-time-token enrollment (server-only TLS)
    agent_public_address: str = ""         # what guests dial; default agent_listen
    enroll_public_address: str = ""        # default enroll_listen
    pki_dir: str = ""                      # default <state_dir>/pki
    backup_dir: str = ""                   # default <state_dir>/backups
    backup_kek_file: str = ""              # key-encryption key of the backup data keys; default <state_dir>/backup-kek.key
    # Where backup bytes live (server/backup_store.py): "local" (backup_dir, one server) or "s3" (a bucket
    # of an S3-compatible store, shared by every server). S3 credentials come from s3_credentials_file (a
    # 0600 YAML/JSON mapping with access_key_id and secret_access_key) or from s3_access_key_id and
    # s3_secret_access_key (REDDWARF_S3_* environment or the settings file); never from a flag, never logged.
    backup_store: str = "local"
    s3_endpoint: str = ""                  # http(s)://host:port
    s3_bucket: str = ""
    s3_region: str = "us-east-1"
    s3_prefix: str = "backups/"
    s3_credentials_file: str = ""
    s3_access_key_id: str = field(default="", repr=False)
    s3_secret_access_key: str = field(default="", repr=False)
    s3_verify_tls: bool = True             # https endpoints: verify the certificate ...
    s3_ca_file: str = ""                   # ... against this CA bundle (default: the system's)
    s3_part_mb: int = 8                    # multipart part size; S3 needs at least 5
    s3_stale_upload_hours: float = 24.0    # incomplete uploads older than this are aborted at start
    s3_retry_seconds: float = 30.0         # an upload rides out a store restart this long, then fails
    backup_upload_factor: float = 2.0      # one backup upload may be at most factor × the instance's volume ...
    backup_upload_margin_mb: int = 512     # ... plus this margin (MiB)
    heartbeat_seconds: int = 5
    heartbeat_expiry_seconds: int = 20
    # A new container runs without its flavor's CPU cap and IO caps (memory, processes, open files and CPU
    # shares hold from the start) until its activate step applies them, before the instance is ACTIVE: the
    # guest's agent start, mysqld's first start and the accounts are our code, not the tenant's, and under a
    # small flavor's caps they took twice as long. False: the flavor's limits from the first moment.
    build_boost: bool = True
    # Several servers on one state DB (server/cluster.py): "auto" turns the stream registry, the command
    # relay and the cross-server WatchInstance on for every state DB but SQLite; "on" / "off" force it.
    # Each server needs its own `name`. Guests get agent_public_address, which may list every server's
    # agent endpoint ("s1:8780,s2:8780"): they dial any and move to another when theirs goes away.
    cluster: str = "auto"
    cluster_poll_seconds: float = 0.25
    cluster_member_expiry_seconds: float = 10.0
    # A guest's heartbeats reach the state DB at most once per heartbeat_seconds (the excess is coalesced);
    # one larger than heartbeat_max_bytes ends its stream, and so does a flood: more than
    # heartbeat_flood_burst heartbeats beyond twice the configured rate.
    heartbeat_max_bytes: int = 64 * 1024
    heartbeat_flood_burst: int = 20
    # Any one message an agent sends (gRPC max_receive_message_length on the agent port); must hold a
    # backup upload chunk (1 MiB of data).
    agent_max_message_bytes: int = 2 << 20
    task_lease_seconds: int = 30
    task_workers: int = 8
    # At most this many of one tenant's tasks run at once (across servers sharing the DB), so one tenant
    # cannot hold every worker. VerifyBackup tasks run in a pool of their own, never on task_workers.
    task_workers_per_tenant: int = 4
    verify_workers: int = 2
    verify_workers_per_tenant: int = 1
    capacity_refresh_seconds: int = 30
    # How often iscsi volumes whose compute host lost its session (a reboot) are attached again with their
    # CHAP account (server/san.py; 0 = never).
    san_reattach_seconds: int = 30
    # The host watch (server/host_watch.py) asks every compute host's hostd for its capacity each
    # host_check_seconds; one silent for host_lost_seconds is lost: fenced (certificate revoked, initiator out
    # of every LUN ACL) and, when host_evacuate_automatically, its instances evacuated. 0 = no watch.
    host_check_seconds: float = 5.0
    host_lost_seconds: float = 60.0
    host_evacuate_automatically: bool = True
    # How often the maintenance scheduler (server/maintenance.py) looks for actions due in their window.
    # 0 = no scheduler on this server (another server, or a test with its own clock, runs it).
    maintenance_check_seconds: float = 30.0
    # The guest agent build an agent upgrade ships (server/agent_upgrade.py): a reddwarf wheel; default the
    # wheelhouse's reddwarf wheel (built from the checkout, as for host enrollment).
    agent_wheel: str = ""
    memory_overcommit: float = 1.0
    storage_overcommit: float = 1.0
    max_volume_gb: int = 1024
    default_quota: Quota = field(default_factory=Quota)
    # API rate limit per tenant (server/ratelimit.py): a token bucket of api_rate_limit calls refilled over
    # api_rate_period_seconds (Trove's 200 a minute); api_rate_burst > 0 makes the bucket that large
    # instead. 0 turns the limit off. Admin principals get admin_rate_limit per period (0: not limited).
    api_rate_limit: int = 200
    api_rate_period_seconds: float = 60.0
    api_rate_burst: int = 0
    admin_rate_limit: int = 0
    # How long authentication may reuse what it read from the state DB (server/auth.py): a revocation
    # takes effect at once on the server that made it and within this many seconds on the others; 0: no cache.
    auth_cache_seconds: float = 1.0
    # The same bound for flavors read by GetFlavor (server/readcache.py); 0: no cache.
    catalog_cache_seconds: float = 1.0
    # The same bound for instance views read by GetInstance and WatchInstance (server/instance_views.py:
    # InstanceViews); 0: no cache.
    instance_cache_seconds: float = 1.0
    # Prometheus metrics (server/metrics.py): "host:port" of the /metrics listener, "" for none. Plain HTTP
    # only on a loopback address; bound anywhere else it is TLS with the server's certificate, and a
    # scraper must present a deployment certificate of role monitor (or admin). metrics_tls = "on" makes
    # it TLS on loopback too.
    metrics_listen: str = "127.0.0.1:9779"
    metrics_tls: str = "auto"
    # How often the state behind the per-instance series is re-read from the state DB (instances, backups,
    # tasks; a deleted instance's series are gone after at most this), and how often each host's
    # beancounters are polled. Scrapes read what these loops keep; they never query.
    metrics_refresh_seconds: float = 15.0
    metrics_usage_seconds: float = 30.0
    log_level: str = "INFO"
    # Tokens expire by default: a token created without a TTL gets this one (0 = never; not recommended).
    token_ttl_seconds: int = 30 * 86400
    admin_token_ttl_seconds: int = 30 * 86400   # the admin token `init` writes to <state_dir>/admin.token
    server_cert_days: int = 90                  # the server's own certificate, renewed with a third left
    host_cert_days: int = 90                    # host certificates the server renews (same rule)
    # Host enrollment over SSH (server/host_enrollment.py). The wheelhouse holds the reddwarf wheel and its
    # dependencies' wheels that every enrolled host installs offline (default <state_dir>/wheelhouse); an
    # operator may fill it; if it has no reddwarf wheel it is built from enroll_source_dir (default: the
    # checkout this server runs from) and cached.
    enroll_wheelhouse: str = ""
    enroll_source_dir: str = ""
    # Where hostd goes on an enrolled host ("{host}" is replaced by the host's id): venv, wheels, TLS files,
    # hostd.json, and its pid and log files when it runs supervised.
    enroll_install_dir: str = "/opt/reddwarf"
    enroll_hostd_port: int = 7443
    # The interpreter hostd's venv is made with on the host (looked up in the SSH session's PATH).
    enroll_python: str = "python3"
    # A JSON file of hostd settings for every enrolled host (drivers, paths); string values may use "{host}"
    # and "{install_dir}". The server adds host_id, listen_address and the TLS paths.
    enroll_hostd_config: str = ""
    enroll_connect_timeout_seconds: float = 15.0
    # How long a started hostd has to answer over mTLS before the enrollment is rolled back.
    enroll_ready_timeout_seconds: float = 120.0
    # The event history (server/audit.py): recorded unless events_enabled is false (benchmarks' baseline),
    # kept event_retention_days (0: forever), pruned every event_prune_seconds.
    events_enabled: bool = True
    event_retention_days: float = 90.0
    event_prune_seconds: float = 3600.0
    # Test-only crash hook: "<task kind>:<step>" makes the server SIGKILL itself right after that step.
    test_exit_after_step: str = ""

    def __post_init__(self) -> None:
        sd = self.state_dir
        defaults = {"db_url": f"sqlite:///{sd}/state.db", "pki_dir": f"{sd}/pki",
                    "enroll_wheelhouse": f"{sd}/wheelhouse",
                    "backup_dir": f"{sd}/backups", "backup_kek_file": f"{sd}/backup-kek.key",
                    "agent_public_address": self.agent_listen,
                    "enroll_public_address": self.enroll_listen}
        for key, value in defaults.items():
            if not getattr(self, key):
                object.__setattr__(self, key, value)
        for key in ("api_rate_limit", "api_rate_burst", "admin_rate_limit"):
            if getattr(self, key) < 0:
                raise InvalidArgument(f"{key} must be 0 or more", field=key)
        if self.cluster not in ("auto", "on", "off"):
            raise InvalidArgument("cluster must be auto, on or off", field="cluster")
        if self.cluster_poll_seconds <= 0 or self.cluster_member_expiry_seconds <= self.cluster_poll_seconds:
            raise InvalidArgument("cluster_poll_seconds must be above 0 and below cluster_member_expiry_seconds",
                                  field="cluster_poll_seconds")
        for key in ("auth_cache_seconds", "catalog_cache_seconds", "instance_cache_seconds"):
            if getattr(self, key) < 0:
                raise InvalidArgument(f"{key} must be 0 or more", field=key)
        if self.event_retention_days < 0:
            raise InvalidArgument("event_retention_days must be 0 (keep forever) or more", field="event_retention_days")
        if not self.event_prune_seconds > 0:
            raise InvalidArgument("event_prune_seconds must be more than 0", field="event_prune_seconds")
        if not self.api_rate_period_seconds > 0:
            raise InvalidArgument("api_rate_period_seconds must be more than 0", field="api_rate_period_seconds")
        if self.agent_max_message_bytes < (1 << 20) + 64 * 1024:
            raise InvalidArgument("agent_max_message_bytes must hold a backup chunk: at least 1114112",
                                  field="agent_max_message_bytes")
        for key in ("task_workers", "task_workers_per_tenant", "verify_workers", "verify_workers_per_tenant"):
            if getattr(self, key) < 1:
                raise InvalidArgument(f"{key} must be at least 1", field=key)
        if not os.path.isabs(self.enroll_install_dir.replace("{host}", "h")):
            raise InvalidArgument("enroll_install_dir must be an absolute path", field="enroll_install_dir")
        if not 0 < self.enroll_hostd_port < 65536:
            raise InvalidArgument("enroll_hostd_port must be a port number", field="enroll_hostd_port")
        self._check_backup_store()
        if self.metrics_tls not in ("auto", "on"):
            raise InvalidArgument("metrics_tls must be auto or on", field="metrics_tls")
        for key in ("metrics_refresh_seconds", "metrics_usage_seconds"):
            if not getattr(self, key) >= 1:
                raise InvalidArgument(f"{key} must be at least 1", field=key)
        for key in ("api_listen", "agent_listen", "enroll_listen", "metrics_listen"):
            if key == "metrics_listen" and not self.metrics_listen:
                continue
            host, sep, port = getattr(self, key).rpartition(":")
            if not sep or not host or not port.isdigit():
                raise InvalidArgument(f"{key} must be host:port, got {getattr(self, key)!r}", field=key)

    def _check_backup_store(self) -> None:
        if self.backup_store not in ("local", "s3"):
            raise InvalidArgument("backup_store must be local or s3", field="backup_store")
        if self.backup_store != "s3":
            return
        if not self.s3_endpoint.startswith(("http://", "https://")):
            raise InvalidArgument("s3_endpoint must be an http:// or https:// URL when backup_store is s3",
                                  field="s3_endpoint")
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", self.s3_bucket):
            raise InvalidArgument("s3_bucket must be an S3 bucket name (3..63 lowercase letters, digits, '.', "
                                  "'-')", field="s3_bucket")
        if self.s3_prefix.startswith("/") or (self.s3_prefix and not self.s3_prefix.endswith("/")):
            raise InvalidArgument("s3_prefix must be empty or a relative path ending in '/'", field="s3_prefix")
        keys = bool(self.s3_access_key_id) + bool(self.s3_secret_access_key)
        if self.s3_credentials_file and keys:
            raise InvalidArgument("give the S3 credentials once: s3_credentials_file or s3_access_key_id and "
                                  "s3_secret_access_key, not both", field="s3_credentials_file")
        if not self.s3_credentials_file and keys != 2:
            raise InvalidArgument("backup_store s3 needs credentials: s3_credentials_file, or both "
                                  "s3_access_key_id and s3_secret_access_key", field="s3_credentials_file")
        if not 5 <= self.s3_part_mb <= 5120:
            raise InvalidArgument("s3_part_mb must be 5..5120 (S3's part sizes)", field="s3_part_mb")
        if self.s3_ca_file and not self.s3_endpoint.startswith("https://"):
            raise InvalidArgument("s3_ca_file needs an https:// s3_endpoint", field="s3_ca_file")
        if self.s3_retry_seconds < 0:
            raise InvalidArgument("s3_retry_seconds must be 0 or more", field="s3_retry_seconds")
        if self.s3_stale_upload_hours < 0:
            raise InvalidArgument("s3_stale_upload_hours must be 0 or more", field="s3_stale_upload_hours")

    @property
    def server_tls_dir(self) -> Path:
        return Path(self.state_dir) / "tls"

    @classmethod
    def load(cls, config_path: str | None = None, env: Mapping[str, str] | None = None,
             overrides: Mapping[str, Any] | None = None) -> Settings:
        """defaults < the YAML file (config_path or REDDWARF_CONFIG) < REDDWARF_<NAME> < overrides (flags)."""
        env = os.environ if env is None else env
        return config.load(cls, path=config_path or env.get("REDDWARF_CONFIG"), fmt="yaml", env=env,
                           env_prefix="REDDWARF_", overrides=overrides)

    @property
    def clustered(self) -> bool:
        """Whether this server coordinates with others over the state DB (see `cluster`)."""
        return self.cluster == "on" or (self.cluster == "auto" and not self.db_url.startswith("sqlite"))
