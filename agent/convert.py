"""The agent's edge: agent API messages to the agent's own values (agent/model.py) and back.

Also the on-disk record of a prepare, kept in the messages' JSON form so that a record written by an
earlier agent still reads.
"""
from __future__ import annotations

from typing import Any

from google.protobuf import json_format

from reddwarf.common import states
from reddwarf.common.states import ServiceState
from reddwarf.v1 import agent_pb2, common_pb2, database_pb2

from . import model
from .logs import LogList, LogRead, ReadSpec

# What a command can answer with, and the CommandResult field each lands in.
Outcome = (model.DatabasePage | model.UserPage | model.User | model.RootCredentials | model.RootStatus
           | model.BackupResult | list[model.TableChecksum] | model.GuestHealth | model.TlsCsr
           | model.ConfigurationApplied | LogList | LogRead | None)


# ---------------------------------------------------------------- messages → values

def limits_from_pb(pb: common_pb2.Limits) -> model.Limits:
    return model.Limits(memory_mb=pb.memory_mb, max_open_files=pb.max_open_files)


def database_from_pb(pb: common_pb2.Database) -> model.Database:
    return model.Database(name=pb.database, character_set=pb.character_set, collation=pb.collation)


def user_from_pb(pb: common_pb2.User) -> model.User:
    return model.User(name=pb.user, host=pb.host, password=pb.password, databases=tuple(pb.databases))


def user_update_from_pb(pb: agent_pb2.UpdateUser) -> model.UserUpdate:
    return model.UserUpdate(user=pb.user, host=pb.host, password=pb.password, new_user=pb.new_user,
                            new_host=pb.new_host)


def service_from_pb(pb: agent_pb2.ServiceSpec) -> model.ServiceSpec:
    return model.ServiceSpec(service=pb.service, version=pb.version, packages=tuple(pb.packages), port=pb.port)


def prepare_from_pb(pb: agent_pb2.Prepare) -> model.Prepare:
    return model.Prepare(services=tuple(service_from_pb(s) for s in pb.services),
                         limits=limits_from_pb(pb.limits), datadir=pb.datadir,
                         databases=tuple(database_from_pb(d) for d in pb.databases),
                         users=tuple(user_from_pb(u) for u in pb.users), bind_address=pb.bind_address,
                         allowed_cidrs=tuple(pb.allowed_cidrs), require_secure_transport=pb.require_secure_transport,
                         tls_cert_pem=pb.tls_cert_pem, tls_ca_pem=pb.tls_ca_pem,
                         configuration=dict(pb.configuration))


def chunk_from_pb(pb: agent_pb2.BackupChunk) -> model.BackupChunk:
    return model.BackupChunk(data=pb.data, backup_id=pb.backup_id, sha256=pb.sha256)


def stored_from_pb(pb: agent_pb2.UploadBackupResponse) -> model.StoredBackup:
    return model.StoredBackup(size_bytes=pb.size_bytes, sha256=pb.sha256)


def read_spec_from_pb(pb: agent_pb2.ReadLog) -> ReadSpec:
    return ReadSpec(log=pb.log, tail_lines=pb.tail_lines, file_id=pb.file_id, offset=pb.offset,
                    generation=pb.generation, max_bytes=pb.max_bytes)


# ---------------------------------------------------------------- values → messages

def user_to_pb(u: model.User) -> common_pb2.User:
    return common_pb2.User(user=u.name, host=u.host, password=u.password, databases=list(u.databases))


def database_to_pb(d: model.Database) -> common_pb2.Database:
    return common_pb2.Database(database=d.name, character_set=d.character_set, collation=d.collation)


def limits_to_pb(lim: model.Limits) -> common_pb2.Limits:
    return common_pb2.Limits(memory_mb=lim.memory_mb, max_open_files=lim.max_open_files)


def service_to_pb(s: model.ServiceSpec) -> agent_pb2.ServiceSpec:
    return agent_pb2.ServiceSpec(service=s.service, version=s.version, packages=list(s.packages), port=s.port)


def prepare_to_pb(p: model.Prepare) -> agent_pb2.Prepare:
    return agent_pb2.Prepare(services=[service_to_pb(s) for s in p.services], limits=limits_to_pb(p.limits),
                             datadir=p.datadir, databases=[database_to_pb(d) for d in p.databases],
                             users=[user_to_pb(u) for u in p.users], bind_address=p.bind_address,
                             allowed_cidrs=list(p.allowed_cidrs), require_secure_transport=p.require_secure_transport,
                             tls_cert_pem=p.tls_cert_pem, tls_ca_pem=p.tls_ca_pem,
                             configuration=dict(p.configuration))


def service_state_to_pb(state: ServiceState) -> common_pb2.ServiceState.ValueType:
    return states.to_pb(state)


def health_to_pb(h: model.GuestHealth) -> common_pb2.GuestHealth:
    pb = common_pb2.GuestHealth(
        service_state=service_state_to_pb(h.service_state),
        accepting_connections=h.accepting_connections, uptime_seconds=h.uptime_seconds,
        connections=h.connections, threads_connected=h.threads_connected, queries=h.queries,
        slow_queries=h.slow_queries, buffer_pool_bytes_total=h.buffer_pool_bytes_total,
        buffer_pool_bytes_data=h.buffer_pool_bytes_data, datadir_bytes_used=h.datadir_bytes_used,
        datadir_bytes_total=h.datadir_bytes_total, restarts=h.restarts, last_error=h.last_error)
    if h.replication_running is not None:
        pb.replication_running = h.replication_running
    if h.replication_lag_seconds is not None:
        pb.replication_lag_seconds = h.replication_lag_seconds
    for name, state in h.services.items():
        pb.services[name] = service_state_to_pb(state)
    pb.observed.FromDatetime(h.observed)
    return pb


def chunk_to_pb(c: model.BackupChunk) -> agent_pb2.BackupChunk:
    return agent_pb2.BackupChunk(backup_id=c.backup_id, data=c.data, sha256=c.sha256)


def checksum_to_pb(c: model.TableChecksum) -> database_pb2.TableChecksum:
    return database_pb2.TableChecksum(table=c.table, checksum=c.checksum)


def backup_result_to_pb(r: model.BackupResult) -> agent_pb2.BackupResult:
    return agent_pb2.BackupResult(size_bytes=r.size_bytes, sha256=r.sha256,
                                  checksums=[checksum_to_pb(c) for c in r.checksums], to_lsn=r.to_lsn,
                                  datastore_version=r.datastore_version)


def result_to_pb(outcome: Outcome) -> agent_pb2.CommandResult:
    """A command's outcome in the CommandResult field that carries it (none for a plain success)."""
    res = agent_pb2.CommandResult()
    if isinstance(outcome, model.DatabasePage):
        res.databases.CopyFrom(agent_pb2.DatabaseList(databases=[database_to_pb(d) for d in outcome.databases],
                                                      next_page_token=outcome.next_page_token))
    elif isinstance(outcome, model.UserPage):
        res.users.CopyFrom(agent_pb2.UserList(users=[user_to_pb(u) for u in outcome.users],
                                              next_page_token=outcome.next_page_token))
    elif isinstance(outcome, model.User):
        res.user.CopyFrom(user_to_pb(outcome))
    elif isinstance(outcome, model.RootCredentials):
        res.root_credentials.CopyFrom(database_pb2.RootCredentials(user=outcome.user, password=outcome.password))
    elif isinstance(outcome, model.RootStatus):
        res.root_status.CopyFrom(database_pb2.RootStatus(enabled=outcome.enabled))
    elif isinstance(outcome, model.BackupResult):
        res.backup.CopyFrom(backup_result_to_pb(outcome))
    elif isinstance(outcome, list):
        res.checksums.checksums.extend(checksum_to_pb(c) for c in outcome)
    elif isinstance(outcome, model.GuestHealth):
        res.health.CopyFrom(health_to_pb(outcome))
    elif isinstance(outcome, LogList):
        res.log_list.CopyFrom(agent_pb2.LogList(logs=[
            agent_pb2.LogInfo(log=i.log, type=i.type, enabled=i.enabled, size_bytes=i.size_bytes,
                              max_bytes=i.max_bytes, long_query_time=i.long_query_time) for i in outcome.logs]))
    elif isinstance(outcome, LogRead):
        res.log_data.CopyFrom(agent_pb2.LogData(data=outcome.data, file_id=outcome.file_id,
                                                next_offset=outcome.next_offset, eof=outcome.eof,
                                                generations=outcome.generations))
    elif isinstance(outcome, model.TlsCsr):
        res.mysql_tls_csr.CopyFrom(agent_pb2.MysqlTlsCsr(csr_pem=outcome.csr_pem,
                                                         current_cert_pem=outcome.current_cert_pem))
    elif isinstance(outcome, model.ConfigurationApplied):
        res.configuration_applied.CopyFrom(agent_pb2.ConfigurationApplied(
            restart_required=outcome.restart_required, applied=list(outcome.applied)))
    return res


# ---------------------------------------------------------------- the prepare record on disk

def prepare_to_json(p: model.Prepare) -> dict[str, Any]:
    return json_format.MessageToDict(prepare_to_pb(p))


def prepare_from_json(data: dict[str, Any]) -> model.Prepare:
    return prepare_from_pb(json_format.ParseDict(data, agent_pb2.Prepare()))


def limits_to_json(lim: model.Limits) -> dict[str, Any]:
    return json_format.MessageToDict(limits_to_pb(lim))
