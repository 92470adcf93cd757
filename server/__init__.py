"""Red Dwarf's control server (`reddwarf-server`). Where things live:

  main.py                 init and serve; wire() says which servicers and background loops run
  app.py                  the core objects every module is handed (settings, state DB, CA, TLS identity)
  provisioning.py         builds the provisioning services and passes them on as constructor arguments
  settings.py, db.py, models.py, migrations/   configuration, the state DB and its schema
  auth.py, pagination.py  who is calling (certificate, token); page tokens
  catalog.py, admin.py    the Catalog and Admin services
  instances.py            the Instances service
  instance_validation.py  checks on a CreateInstanceRequest; update masks
  instance_views.py       an instance's derived status, its message, owned_instance
  instance_tasks.py       the durable tasks behind Instances (create, delete, stop, start, restart, resize,
                          resize_volume)
  tags.py                 tags on instances and backups: validation, update paths, list filters in SQL
  quotas.py               what a tenant or host has allocated; quota checks
  sealing.py              the initial users' passwords, sealed until prepare
  enrollment.py           guest enrollment tokens and certificate signing
  guest.py                the Databases, Users and Root services (run by the guest agent)
  configurations.py       the Configurations service: configuration groups, parameter rules, attach/detach
  guest_health.py         health and silence reported by the agent registry, written to the instance
  agents.py               the agent registry, the AgentGateway and Enrollment services
  tasks.py                the durable task engine
  hosts.py                hostd clients, capacity refresh, placement (compute hosts, SAN nodes)
  san.py                  iscsi volumes: a LUN on a SAN node, its CHAP account, export to one host, attach
  backups.py, backup_store.py   the Backups service and tasks; where backup bytes are stored
  events.py               the instance event bus behind WatchInstance
  metrics.py              the Prometheus registry and the collector of the per-instance series
  metrics_snapshot.py     what those series know of the state DB, re-read every metrics_refresh_seconds
  usage_poll.py           the hosts' beancounters, polled for them (hostd's ListUsage)
  metrics_http.py         the /metrics listener (loopback, or TLS for monitor certificates)
  api_metrics.py          the interceptor counting API calls by method and status
  audit.py                the event history's recording: API changes (an interceptor), status changes
                          (a session hook), retention pruning
  event_history.py        the Events service (ListEvents)
  guest_logs.py           the Logs service: the guest's error/slow/general logs, read by its agent
  maintenance.py          maintenance windows, pending actions (restart, agent_upgrade, upgrade, patch) and the
                          scheduler that starts them in their window; register_action for other kinds
  agent_upgrade.py        the upgrade_agent task: the server's agent build sent to a guest, its new hello
"""
