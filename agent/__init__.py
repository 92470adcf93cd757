"""Red Dwarf agent: the guest, PID 1 of an instance's container.

Where things live:
- main.py: configuration, enrollment, wiring; stream.py: the connection to the server (the transport);
  results.py: the record of finished commands; commands.py: the command table (Command's oneof name →
  handler); convert.py: protobufs ↔ the agent's own values (model.py), the only place that sees both.
- datastore.py: the driver interface; mysql.py: the MySQL/MariaDB driver, composing mycnf.py (my.cnf),
  mysqld.py (the datadir: the template's seed hostd put on the volume taken over, or install-db; start/stop
  under supervisor.py) and mysql_admin.py (databases, users, grants, root); fake.py: a driver with no mysqld,
  for tests of the stream.
- backup.py: backups and restores (mariadb-backup | zstd | SHA-256); xbstream.py: what a stream may unpack
  to (file allowlist, backup-my.cnf rebuilt); verify.py: the scratch restore the server runs in the
  throw-away sandbox of sandbox.py (unprivileged uid, own namespaces, no network, secrets hidden);
  services.py: packages and memcached (the second service, beside mysqld, sized to the flavor);
  configuration.py: a configuration group's overrides (validated,
  SET GLOBAL all or none, the my.cnf include, a restart pending for static values).
- logs.py: the datastore's logs on the volume (fixed names → the agent's own files), read in pieces,
  switched on and off, rotated within their bound.
- upgrade.py: an agent upgrade in place (the build unpacked, then exec: same PID, mysqld adopted by
  supervisor.py from the previous image).
- The volume is mounted where Prepare.datadir says; mysqld's datadir is its data/ directory
  (mysqld.py: datadir_on_volume), the agent's work directory beside it.
"""
