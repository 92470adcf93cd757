# generated from clients/aio.py by tools/unasync.py; never edit
"""The SDK: typed calls over the generated stubs, SDK exceptions instead of grpc.RpcError.

    from reddwarf.client import Client
    # endpoint and credentials: ~/.config/reddwarf/config.yaml or REDDWARF_* (see config.py)
    with Client.from_env() as rd:
        inst = rd.create_instance("shop", "small", 2, databases=["shop"])
        rd.wait_for(inst.id, "ACTIVE", timeout=600)

Results are the proto messages (reddwarf.v1.database_pb2 / admin_pb2). List methods follow every page.

Written once, as the asyncio client in clients/aio.py (the REST gateway is built on it); tools/unasync.py
generates the synchronous client in clients/sdk.py from it (`make lint` checks the two match). What does no
I/O (names, requests, paging, wait_for's verdicts) lives in resources.py.
"""
from __future__ import annotations

import copy
import datetime as dt
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import replace
from typing import Any, Self, TypeVar

import grpc
from google.protobuf import field_mask_pb2

from reddwarf.v1 import admin_pb2 as apb
from reddwarf.v1 import admin_pb2_grpc as apb_grpc
from reddwarf.v1 import common_pb2 as cpb
from reddwarf.v1 import configuration_pb2 as cfg
from reddwarf.v1 import configuration_pb2_grpc as cfg_grpc
from reddwarf.v1 import database_pb2 as pb
from reddwarf.v1 import database_pb2_grpc as pb_grpc
from reddwarf.v1 import observe_pb2 as opb
from reddwarf.v1 import observe_pb2_grpc as opb_grpc

from . import resources as r
from .config import ClientConfig, load_config
from .endpoints import channel_target
from .errors import InstanceGone, NotFound, Unimplemented, WaitTimeout, from_rpc_error

Req = TypeVar("Req")
Resp = TypeVar("Resp")
PageReq = TypeVar("PageReq", bound=r.PageRequest)
PageResp = TypeVar("PageResp", bound=r.PageResponse)
Item = TypeVar("Item")


class Client:
    """One channel to the control server (a grpc.Channel), shared by the copies `with_token` makes."""

    def __init__(self, config: ClientConfig, *, channel: grpc.Channel | None = None) -> None:
        self.config = config
        self._owns_channel = channel is None
        # endpoint may list several servers (endpoints.py): one channel balances over them and retries
        # the calls that are safe to repeat when one goes away.
        self._channel = channel or grpc.secure_channel(
            channel_target(config.endpoint), r.channel_credentials(config), options=r.channel_options(config))
        self._metadata = r.call_metadata(config.token)
        self.catalog = pb_grpc.CatalogStub(self._channel)
        self.instances = pb_grpc.InstancesStub(self._channel)
        self.databases = pb_grpc.DatabasesStub(self._channel)
        self.users = pb_grpc.UsersStub(self._channel)
        self.root = pb_grpc.RootStub(self._channel)
        self.backups = pb_grpc.BackupsStub(self._channel)
        self.admin = apb_grpc.AdminStub(self._channel)
        self.configurations = cfg_grpc.ConfigurationsStub(self._channel)
        self.logs = opb_grpc.LogsStub(self._channel)
        self.events = opb_grpc.EventsStub(self._channel)

    @classmethod
    def from_env(cls, **explicit: Any) -> Self:
        """Config file < REDDWARF_* environment < explicit keyword arguments (see config.load_config)."""
        return cls(load_config(**explicit))

    def with_token(self, token: str | None) -> Self:
        """The same channel and stubs, calling as another tenant (cheap: the gateway makes one per request;
        building the stubs anew was a fifth of its time per request, docs/BENCHMARKS.md)."""
        other = copy.copy(self)
        other.config = replace(self.config, token=token)
        other._owns_channel = False
        other._metadata = r.call_metadata(token)
        return other

    def with_request_id(self, request_id: str) -> Self:
        """The same channel and caller, its calls carrying `x-request-id` (the event history records it)."""
        tagged = copy.copy(self)
        tagged._owns_channel = False
        tagged._metadata = (*self._metadata, ("x-request-id", request_id))
        return tagged

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ plumbing

    def _call(self, method: grpc.UnaryUnaryMultiCallable[Req, Resp], request: Req,
              timeout: float | None = None) -> Resp:
        try:
            return method(request, metadata=self._metadata,
                          timeout=self.config.timeout if timeout is None else timeout)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc) from None

    def _pages(self, method: grpc.UnaryUnaryMultiCallable[PageReq, PageResp], request: PageReq,
               items: Callable[[PageResp], Iterable[Item]], page_size: int = 0) -> Iterator[Item]:
        request.page_size = page_size
        while True:
            response = self._call(method, request)
            yield from items(response)
            if not r.turn_page(request, response):
                return

    def _all(self, pages: Iterator[Item]) -> list[Item]:
        return list(pages)

    # ------------------------------------------------------------------ catalog

    def get_caller(self) -> pb.Caller:
        return self._call(self.catalog.GetCaller, pb.GetCallerRequest())

    def get_limits(self) -> pb.TenantLimits:
        """The caller's quotas and use, and the state of its API rate limit."""
        return self._call(self.catalog.GetLimits, pb.GetLimitsRequest())

    def list_flavors(self, page_size: int = 0) -> list[pb.Flavor]:
        return self._all(self._pages(self.catalog.ListFlavors, pb.ListFlavorsRequest(),
                                     lambda p: p.flavors, page_size))

    def get_flavor(self, flavor: str) -> pb.Flavor:
        return self._call(self.catalog.GetFlavor, pb.GetFlavorRequest(name=r.resource("flavors", flavor)))

    def list_datastores(self, page_size: int = 0) -> list[pb.Datastore]:
        return self._all(self._pages(self.catalog.ListDatastores, pb.ListDatastoresRequest(),
                                     lambda p: p.datastores, page_size))

    def get_datastore(self, datastore: str) -> pb.Datastore:
        return self._call(self.catalog.GetDatastore,
                          pb.GetDatastoreRequest(name=r.resource("datastores", datastore)))

    # ------------------------------------------------------------------ instances

    def create_instance(self, name: str, flavor: str, size_gb: int, *,
                        databases: Iterable[str | r.DatabaseSpec | cpb.Database] = (),
                        users: Iterable[r.UserSpec | cpb.User] = (), datastore: str = "",
                        datastore_version: str = "", restore_from: str | None = None,
                        request_id: str = "", allowed_cidrs: Iterable[str] = (),
                        require_secure_transport: bool = False, tags: Mapping[str, str] | None = None,
                        deletion_protection: bool = False, configuration: str = "",
                        services: Iterable[str] = (),
                        maintenance_window: pb.MaintenanceWindow | None = None) -> pb.Instance:
        """`services`: extra services beside the datastore in the same container ("memcached");
        `maintenance_window`: when pending maintenance runs (default Sunday 03:00 UTC, 60 minutes).
        request_id: the create's idempotency key (a UUID; one is made when none is given), so a retry after
        UNAVAILABLE, by the channel or by the caller with the same id, never makes a second instance."""
        req = r.create_instance_request(
            name, flavor, size_gb, databases=databases, users=users, datastore=datastore,
            datastore_version=datastore_version, restore_from=restore_from, request_id=request_id,
            allowed_cidrs=allowed_cidrs, require_secure_transport=require_secure_transport, tags=tags,
            deletion_protection=deletion_protection, configuration=configuration, services=services)
        if maintenance_window is not None:
            req.instance.maintenance_window.CopyFrom(maintenance_window)
        return self._call(self.instances.CreateInstance, req)

    def get_instance(self, instance: str) -> pb.Instance:
        return self._call(self.instances.GetInstance, pb.GetInstanceRequest(name=r.instance_name(instance)))

    def get_instance_ca(self, instance: str) -> pb.InstanceCa:
        """The CA certificate (PEM) to verify the instance's MySQL server certificate with, and the name
        that certificate carries."""
        return self._call(self.instances.GetInstanceCa, pb.GetInstanceCaRequest(name=r.instance_name(instance)))

    def list_instances(self, status: str | int | None = None, page_size: int = 0,
                       tags: Iterable[str] | Mapping[str, str | None] = ()) -> Iterator[pb.Instance]:
        """tags: only instances with all of them ("key=value", or "key" for any value)."""
        wanted = r.instance_status(status) if status is not None else pb.INSTANCE_STATUS_UNSPECIFIED
        request = pb.ListInstancesRequest(status=wanted, tags=r.tag_filters(tags))
        return self._pages(self.instances.ListInstances, request, lambda p: p.instances, page_size)

    def delete_instance(self, instance: str, *, final_backup: str | None = None,
                        final_backup_tags: Mapping[str, str] | None = None) -> pb.Instance:
        """final_backup: take a full backup of that name first and delete only once it is COMPLETED (a
        failed one leaves the instance, its fault saying why). Refused while deletion_protection is on."""
        return self._call(self.instances.DeleteInstance, pb.DeleteInstanceRequest(
            name=r.instance_name(instance), final_backup_name=final_backup or "",
            final_backup_tags=dict(final_backup_tags or {})))

    def update_instance(self, instance: str, *, name: str | None = None,
                        deletion_protection: bool | None = None, tags: Mapping[str, str] | None = None,
                        set_tags: Mapping[str, str] | None = None,
                        remove_tags: Iterable[str] = ()) -> pb.Instance:
        """Changes only what is given: the name, deletion protection, and tags (`tags` replaces them all;
        `set_tags` / `remove_tags` change only those keys)."""
        return self._call(self.instances.UpdateInstance, r.update_instance_request(
            instance, name=name, deletion_protection=deletion_protection, tags=tags, set_tags=set_tags,
            remove_tags=remove_tags))

    def set_maintenance_window(self, instance: str, weekday: int, start_time: str,
                               duration_minutes: int = 0) -> pb.Instance:
        """The instance's weekly window in UTC: weekday 1 (Monday) .. 7 (Sunday), start "HH:MM",
        duration in minutes (0: 60)."""
        window = pb.MaintenanceWindow(weekday=weekday, start_time=start_time, duration_minutes=duration_minutes)
        return self._call(self.instances.UpdateInstance, pb.UpdateInstanceRequest(
            instance=pb.Instance(name=r.instance_name(instance), maintenance_window=window),
            update_mask=field_mask_pb2.FieldMask(paths=["maintenance_window"])))

    def apply_pending_maintenance(self, instance: str, kinds: Iterable[str] = ()) -> pb.Instance:
        """Runs the instance's pending maintenance (of `kinds`, or all) now instead of in its window."""
        return self._call(self.instances.ApplyPendingMaintenance, pb.ApplyPendingMaintenanceRequest(
            name=r.instance_name(instance), kinds=list(kinds)))

    def schedule_agent_upgrade(self, instance: str, apply_now: bool = False) -> pb.Instance:
        """Admins: upgrade the instance's guest agent to the server's build in its window (or now)."""
        return self._call(self.instances.ScheduleAgentUpgrade, pb.ScheduleAgentUpgradeRequest(
            name=r.instance_name(instance), apply_now=apply_now))

    def stop_instance(self, instance: str) -> pb.Instance:
        """Stops mysqld and the container (the data stays on the volume): STOPPING, then SHUTDOWN."""
        return self._call(self.instances.StopInstance, pb.StopInstanceRequest(name=r.instance_name(instance)))

    def start_instance(self, instance: str) -> pb.Instance:
        """Starts a stopped instance: STARTING, then ACTIVE with its data."""
        return self._call(self.instances.StartInstance,
                          pb.StartInstanceRequest(name=r.instance_name(instance)))

    def restart_instance(self, instance: str) -> pb.Instance:
        return self._call(self.instances.RestartInstance,
                          pb.RestartInstanceRequest(name=r.instance_name(instance)))

    restart = restart_instance

    def resize_flavor(self, instance: str, flavor: str) -> pb.Instance:
        return self._call(self.instances.ResizeInstance,
                          pb.ResizeInstanceRequest(name=r.instance_name(instance), flavor=flavor))

    def upgrade_instance(self, instance: str, datastore_version: str,
                         in_maintenance_window: bool = False) -> pb.Instance:
        """Moves the instance to a newer version of its datastore (backup first, rolled back on failure);
        `last_upgrade` on the instance reports the outcome and the downtime. With `in_maintenance_window`
        it is checked now and runs in the instance's next window (pending maintenance until then)."""
        return self._call(self.instances.UpgradeInstance, pb.UpgradeInstanceRequest(
            name=r.instance_name(instance), datastore_version=datastore_version,
            in_maintenance_window=in_maintenance_window))

    def resize_volume(self, instance: str, size_gb: int) -> pb.Instance:
        return self._call(self.instances.ResizeVolume,
                          pb.ResizeVolumeRequest(name=r.instance_name(instance), size_gb=size_gb))

    def watch_instance(self, instance: str, timeout: float | None = None
                       ) -> Iterator[pb.InstanceEvent]:
        """Events until the instance is deleted (or timeout seconds pass: then WaitTimeout)."""
        stream = self.instances.WatchInstance(pb.WatchInstanceRequest(name=r.instance_name(instance)),
                                              metadata=self._metadata, timeout=timeout)
        try:
            yield from stream
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise WaitTimeout(f"no end of watch on {instance} within {timeout}s") from None
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()

    def wait_for(self, instance: str, status: str | int = "ACTIVE", timeout: float = 600.0,
                 poll_interval: float = 2.0,
                 on_event: Callable[[pb.Instance], None] | None = None) -> pb.Instance:
        """Waits until the instance has `status`, following WatchInstance (polling GetInstance when the
        server does not implement it). Raises InstanceFailed on ERROR/FAILED, WaitTimeout on timeout."""
        wanted = r.instance_status(status)
        deadline = time.monotonic() + timeout

        def seen(inst: pb.Instance) -> bool:
            if on_event is not None:
                on_event(inst)
            return r.reached(inst, wanted, instance)

        try:
            for event in self.watch_instance(instance, timeout=timeout):
                if seen(event.instance):
                    return event.instance
            raise InstanceGone(f"instance {instance} was deleted while waiting")
        except Unimplemented:
            pass
        while True:
            inst = self.get_instance(instance)
            if seen(inst):
                return inst
            if time.monotonic() + poll_interval > deadline:
                raise r.wait_timeout(inst, wanted, instance, timeout)
            time.sleep(poll_interval)

    def find_instance(self, instance: str) -> pb.Instance:
        """The instance with this id (or resource name), else the one whose display name this is.
        NotFound when none matches; InvalidArgument listing the ids when several have that name."""
        if r.may_be_id("instances", instance):
            try:
                return self.get_instance(instance)
            except NotFound:
                if instance.startswith("instances/"):
                    raise
        matches = [i for i in self.list_instances() if i.display_name == instance]
        return r.one_match("instance", instance, matches)

    def instance_id(self, instance: str) -> str:
        """The id of the instance with this id or display name (see find_instance)."""
        return (self.find_instance(instance)).id

    # ------------------------------------------------------------------ databases

    def create_database(self, instance: str, database: str | r.DatabaseSpec | cpb.Database) -> cpb.Database:
        return self._call(self.databases.CreateDatabase, r.create_database_request(instance, database))

    def list_databases(self, instance: str) -> list[cpb.Database]:
        return self._all(self._pages(self.databases.ListDatabases,
                                     pb.ListDatabasesRequest(parent=r.instance_name(instance)),
                                     lambda p: p.databases))

    def delete_database(self, instance: str, database: str) -> None:
        self._call(self.databases.DeleteDatabase,
                   pb.DeleteDatabaseRequest(name=r.database_name(instance, database)))

    # ------------------------------------------------------------------ users

    def create_user(self, instance: str, user: str, password: str, host: str = "%",
                    databases: Iterable[str] = ()) -> cpb.User:
        return self._call(self.users.CreateUser, r.create_user_request(
            instance, r.UserSpec(user, password, host, tuple(databases))))

    def get_user(self, instance: str, user: str, host: str = "%") -> cpb.User:
        return self._call(self.users.GetUser, pb.GetUserRequest(name=r.user_name(instance, user, host)))

    def list_users(self, instance: str) -> list[cpb.User]:
        return self._all(self._pages(self.users.ListUsers,
                                     pb.ListUsersRequest(parent=r.instance_name(instance)),
                                     lambda p: p.users))

    def delete_user(self, instance: str, user: str, host: str = "%") -> None:
        self._call(self.users.DeleteUser, pb.DeleteUserRequest(name=r.user_name(instance, user, host)))

    def update_user(self, instance: str, user: str, host: str = "%", *, password: str | None = None,
                    new_user: str | None = None, new_host: str | None = None) -> cpb.User:
        return self._call(self.users.UpdateUser, r.update_user_request(
            instance, user, host, password=password, new_user=new_user, new_host=new_host))

    def change_password(self, instance: str, user: str, password: str, host: str = "%") -> cpb.User:
        return self.update_user(instance, user, host, password=password)

    def grant_access(self, instance: str, user: str, databases: Iterable[str],
                     host: str = "%") -> cpb.User:
        return self._call(self.users.GrantAccess, pb.GrantAccessRequest(
            name=r.user_name(instance, user, host), databases=list(databases)))

    def revoke_access(self, instance: str, user: str, database: str, host: str = "%") -> cpb.User:
        return self._call(self.users.RevokeAccess, pb.RevokeAccessRequest(
            name=r.user_name(instance, user, host), database=database))

    def list_access(self, instance: str, user: str, host: str = "%") -> list[str]:
        access = self._call(self.users.ListAccess,
                            pb.ListAccessRequest(name=r.user_name(instance, user, host)))
        return list(access.databases)

    # ------------------------------------------------------------------ root

    def enable_root(self, instance: str) -> pb.RootCredentials:
        return self._call(self.root.EnableRoot, pb.EnableRootRequest(name=r.instance_name(instance)))

    def disable_root(self, instance: str) -> None:
        self._call(self.root.DisableRoot, pb.DisableRootRequest(name=r.instance_name(instance)))

    def root_enabled(self, instance: str) -> bool:
        root = self._call(self.root.GetRootStatus, pb.GetRootStatusRequest(name=r.instance_name(instance)))
        return root.enabled

    # ------------------------------------------------------------------ backups

    def create_backup(self, instance: str, name: str, description: str = "",
                      parent: str | None = None, tags: Mapping[str, str] | None = None,
                      request_id: str = "") -> pb.Backup:
        """request_id: the create's idempotency key (a UUID; one is made when none is given)."""
        return self._call(self.backups.CreateBackup,
                          r.create_backup_request(instance, name, description, parent, tags, request_id))

    def get_backup(self, backup: str) -> pb.Backup:
        return self._call(self.backups.GetBackup, pb.GetBackupRequest(name=r.resource("backups", backup)))

    def list_backups(self, instance: str | None = None, page_size: int = 0,
                     tags: Iterable[str] | Mapping[str, str | None] = ()) -> Iterator[pb.Backup]:
        request = pb.ListBackupsRequest(instance=r.instance_name(instance) if instance else "",
                                        tags=r.tag_filters(tags))
        return self._pages(self.backups.ListBackups, request, lambda p: p.backups, page_size)

    def update_backup(self, backup: str, *, name: str | None = None, description: str | None = None,
                      tags: Mapping[str, str] | None = None, set_tags: Mapping[str, str] | None = None,
                      remove_tags: Iterable[str] = ()) -> pb.Backup:
        """Changes only what is given (tags as update_instance)."""
        return self._call(self.backups.UpdateBackup, r.update_backup_request(
            backup, name=name, description=description, tags=tags, set_tags=set_tags, remove_tags=remove_tags))

    def delete_backup(self, backup: str, cascade: bool = False) -> None:
        self._call(self.backups.DeleteBackup,
                   pb.DeleteBackupRequest(name=r.resource("backups", backup), cascade=cascade))

    def verify_backup(self, backup: str) -> pb.Backup:
        return self._call(self.backups.VerifyBackup,
                          pb.VerifyBackupRequest(name=r.resource("backups", backup)))

    def find_backup(self, backup: str) -> pb.Backup:
        """The backup with this id (or resource name), else the one whose display name this is.
        NotFound when none matches; InvalidArgument listing the ids when several have that name."""
        if r.may_be_id("backups", backup):
            try:
                return self.get_backup(backup)
            except NotFound:
                if backup.startswith("backups/"):
                    raise
        matches = [b for b in self.list_backups() if b.display_name == backup]
        return r.one_match("backup", backup, matches)

    def backup_id(self, backup: str) -> str:
        """The id of the backup with this id or display name (see find_backup)."""
        return (self.find_backup(backup)).id

    def set_backup_schedule(self, instance: str, interval_seconds: int, keep: int,
                            full_every: int = 0) -> pb.BackupSchedule:
        return self._call(self.backups.SetBackupSchedule, pb.SetBackupScheduleRequest(
            instance=r.instance_name(instance), schedule=pb.BackupSchedule(
                interval_seconds=interval_seconds, keep=keep, full_every=full_every)))

    def get_backup_schedule(self, instance: str) -> pb.BackupSchedule:
        return self._call(self.backups.GetBackupSchedule,
                          pb.GetBackupScheduleRequest(instance=r.instance_name(instance)))

    # ------------------------------------------------------------------ configuration groups

    def create_configuration(self, name: str, values: Mapping[str, object], description: str = "",
                             datastore: str = "", datastore_version: str = "") -> cfg.Configuration:
        """A configuration group: values by parameter name (ints, floats, bools or text; see list_parameters)."""
        return self._call(self.configurations.CreateConfiguration, cfg.CreateConfigurationRequest(
            configuration=cfg.Configuration(display_name=name, description=description, datastore=datastore,
                                            datastore_version=datastore_version,
                                            values=r.parameter_values(values))))

    def get_configuration(self, configuration: str) -> cfg.Configuration:
        return self._call(self.configurations.GetConfiguration, cfg.GetConfigurationRequest(
            name=r.resource("configurations", configuration)))

    def list_configurations(self, page_size: int = 0) -> list[cfg.Configuration]:
        return self._all(self._pages(self.configurations.ListConfigurations, cfg.ListConfigurationsRequest(),
                                     lambda p: p.configurations, page_size))

    def update_configuration(self, configuration: str, values: Mapping[str, object] | None = None, *,
                             merge: bool = False, unset: Iterable[str] = (), name: str | None = None,
                             description: str | None = None) -> cfg.Configuration:
        """merge=False (Trove's PUT): `values` replace all of the group's; merge=True (PATCH): set on top, and
        `unset` removes parameters. Attached instances get the result at once."""
        request = cfg.UpdateConfigurationRequest(name=r.resource("configurations", configuration),
                                                 values=r.parameter_values(values or {}), merge=merge,
                                                 unset=list(unset))
        if name is not None:
            request.display_name = name
        if description is not None:
            request.description = description
        return self._call(self.configurations.UpdateConfiguration, request)

    def delete_configuration(self, configuration: str) -> None:
        self._call(self.configurations.DeleteConfiguration, cfg.DeleteConfigurationRequest(
            name=r.resource("configurations", configuration)))

    def attach_configuration(self, instance: str, configuration: str) -> pb.Instance:
        return self._call(self.configurations.AttachConfiguration, cfg.AttachConfigurationRequest(
            instance=r.instance_name(instance), configuration=r.resource("configurations", configuration)))

    def detach_configuration(self, instance: str) -> pb.Instance:
        return self._call(self.configurations.DetachConfiguration, cfg.DetachConfigurationRequest(
            instance=r.instance_name(instance)))

    def list_configuration_instances(self, configuration: str) -> list[cfg.ConfigurationInstance]:
        request = cfg.ListConfigurationInstancesRequest(name=r.resource("configurations", configuration))
        return self._all(self._pages(self.configurations.ListConfigurationInstances, request,
                                     lambda p: p.instances))

    def list_parameters(self, datastore: str, version: str) -> list[cfg.ConfigurationParameter]:
        """The parameters a configuration group may set on that datastore version, with their rules."""
        res = self._call(self.configurations.ListConfigurationParameters, cfg.ListConfigurationParametersRequest(
            parent=r.version_name(datastore, version)))
        return list(res.parameters)

    def get_parameter(self, datastore: str, version: str, parameter: str) -> cfg.ConfigurationParameter:
        return self._call(self.configurations.GetConfigurationParameter, cfg.GetConfigurationParameterRequest(
            name=f"{r.version_name(datastore, version)}/parameters/{parameter}"))

    def find_configuration(self, configuration: str) -> cfg.Configuration:
        """The group with this id (or resource name), else the one whose display name this is."""
        if r.may_be_id("configurations", configuration):
            try:
                return self.get_configuration(configuration)
            except NotFound:
                if configuration.startswith("configurations/"):
                    raise
        matches = [c for c in self.list_configurations() if c.display_name == configuration]
        return r.one_match("configuration", configuration, matches)

    def configuration_id(self, configuration: str) -> str:
        return (self.find_configuration(configuration)).id
    # ------------------------------------------------------------------ guest logs

    def list_logs(self, instance: str) -> list[opb.GuestLog]:
        """The instance's logs (error, slow_query, general) with their state and size on the volume."""
        response = self._call(self.logs.ListLogs, opb.ListLogsRequest(parent=r.instance_name(instance)))
        return list(response.logs)

    def get_log(self, instance: str, log: str) -> opb.GuestLog:
        return self._call(self.logs.GetLog, opb.GetLogRequest(name=r.log_name(instance, log)))

    def enable_log(self, instance: str, log: str, long_query_time: float = 0.0) -> opb.GuestLog:
        """Turns a log on (slow_query: optionally with a new threshold in seconds)."""
        return self._call(self.logs.EnableLog, opb.EnableLogRequest(name=r.log_name(instance, log),
                                                                    long_query_time=long_query_time))

    def disable_log(self, instance: str, log: str) -> opb.GuestLog:
        return self._call(self.logs.DisableLog, opb.DisableLogRequest(name=r.log_name(instance, log)))

    def tail_log(self, instance: str, log: str, lines: int = 50, follow: bool = False,
                 from_start: bool = False, timeout: float | None = None) -> Iterator[str]:
        """The log's last `lines` lines (or all of the current file: from_start), then, with follow, what is
        appended until the caller stops iterating (or timeout seconds pass: then WaitTimeout)."""
        stream = self.logs.TailLog(opb.TailLogRequest(name=r.log_name(instance, log), lines=lines, follow=follow,
                                                      from_start=from_start), metadata=self._metadata, timeout=timeout)
        try:
            for chunk in stream:
                yield chunk.data
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED and follow:
                raise WaitTimeout(f"log {log} of {instance} followed for {timeout}s") from None
            raise from_rpc_error(exc) from None
        finally:
            stream.cancel()

    def save_log(self, instance: str, log: str) -> opb.SavedLog:
        """Copies the log into the backup store (encrypted under the tenant's key)."""
        return self._call(self.logs.SaveLog, opb.SaveLogRequest(name=r.log_name(instance, log)),
                          timeout=max(self.config.timeout, 300.0))

    # ------------------------------------------------------------------ event history

    def list_events(self, resource: str = "", kind: str = "", since: dt.datetime | None = None,
                    until: dt.datetime | None = None, tenant: str = "",
                    page_size: int = 0) -> Iterator[opb.Event]:
        """Events oldest first: API changes (kind "api") and status changes ("status"), of the caller's tenant
        (admins: all, or `tenant`'s); since/until are naive UTC or aware datetimes."""
        request = r.list_events_request(resource, kind, since, until, tenant)
        return self._pages(self.events.ListEvents, request, lambda p: p.events, page_size)

    # ------------------------------------------------------------------ admin: hosts, tasks

    def register_host(self, host_id: str, address: str, memory_overcommit: float = 0.0,
                      storage_overcommit: float = 0.0) -> apb.Host:
        return self._call(self.admin.RegisterHost, apb.RegisterHostRequest(host=apb.Host(
            id=host_id, address=address, memory_overcommit=memory_overcommit,
            storage_overcommit=storage_overcommit)))

    def enroll_host(self, host_id: str, ssh_target: str, host_key: str, *, private_key: bytes = b"",
                    ssh_key_path: str = "", password: str = "", hostd_port: int = 0) -> apb.Host:
        """Installs hostd on a machine over SSH and registers it (Admin.EnrollHost). `host_key` is the SHA256
        fingerprint of its SSH host key; log in with `private_key` (the key's text, sent over this mTLS
        channel and only held in the server's memory for the call), a key file on the server
        (`ssh_key_path`) or `password` (also a key's passphrase)."""
        return self._call(self.admin.EnrollHost, apb.EnrollHostRequest(
            id=host_id, ssh_target=ssh_target, host_key=host_key, ssh_private_key=private_key,
            ssh_key_path=ssh_key_path, ssh_password=password, hostd_port=hostd_port),
            timeout=max(self.config.timeout, 900.0))

    def get_host(self, host: str) -> apb.Host:
        return self._call(self.admin.GetHost, apb.GetHostRequest(name=r.resource("hosts", host)))

    def list_hosts(self) -> list[apb.Host]:
        return self._all(self._pages(self.admin.ListHosts, apb.ListHostsRequest(), lambda p: p.hosts))

    def drain_host(self, host: str, drain: bool = True) -> apb.Host:
        return self._call(self.admin.DrainHost,
                          apb.DrainHostRequest(name=r.resource("hosts", host), drain=drain))

    def migrate_instance(self, instance: str, host: str = "") -> apb.Task:
        """Moves an instance whose volume is on the SAN to `host` (or to one the scheduler picks): the
        migrate_instance task it started (follow it with get_task, or wait_for the instance)."""
        return self._call(self.admin.MigrateInstance, apb.MigrateInstanceRequest(
            instance=r.resource("instances", instance), host=r.resource("hosts", host) if host else ""))

    def evacuate_host(self, host: str) -> apb.Task:
        """Declares a host lost: the server fences it (certificate revoked, initiator out of every LUN ACL),
        then moves its SAN-backed instances to hosts with room. The evacuate_host task."""
        return self._call(self.admin.EvacuateHost, apb.EvacuateHostRequest(name=r.resource("hosts", host)))

    def patch_datastore_version(self, version: str, revision: int, datastore: str = "mariadb",
                                apply_now: bool = False) -> apb.PatchDatastoreVersionResponse:
        """Records template `revision` of a datastore version and queues a patch for each of its instances on
        an older one: they move onto it in their maintenance windows (at once with `apply_now`), one at a
        time."""
        return self._call(self.admin.PatchDatastoreVersion, apb.PatchDatastoreVersionRequest(
            datastore=datastore, version=version, revision=revision, apply_now=apply_now))

    def delete_host(self, host: str) -> None:
        self._call(self.admin.DeleteHost, apb.DeleteHostRequest(name=r.resource("hosts", host)))

    def get_task(self, task: str) -> apb.Task:
        return self._call(self.admin.GetTask, apb.GetTaskRequest(name=r.resource("tasks", task)))

    def list_tasks(self, resource: str = "", state: int = 0) -> Iterator[apb.Task]:
        request = apb.ListTasksRequest(resource=resource, state=apb.TaskState.ValueType(state))
        return self._pages(self.admin.ListTasks, request, lambda p: p.tasks)

    # ------------------------------------------------------------------ admin: tenants, tokens, quotas

    def create_tenant(self, tenant_id: str, display_name: str = "",
                      quota: apb.Quota | None = None) -> apb.Tenant:
        return self._call(self.admin.CreateTenant, apb.CreateTenantRequest(
            tenant=apb.Tenant(id=tenant_id, display_name=display_name, quota=quota)))

    def get_tenant(self, tenant: str) -> apb.Tenant:
        return self._call(self.admin.GetTenant, apb.GetTenantRequest(name=r.resource("tenants", tenant)))

    def list_tenants(self) -> list[apb.Tenant]:
        return self._all(self._pages(self.admin.ListTenants, apb.ListTenantsRequest(),
                                     lambda p: p.tenants))

    def delete_tenant(self, tenant: str) -> None:
        self._call(self.admin.DeleteTenant, apb.DeleteTenantRequest(name=r.resource("tenants", tenant)))

    def create_token(self, tenant: str, description: str = "", admin: bool = False,
                     ttl_seconds: int = 0) -> apb.Token:
        return self._call(self.admin.CreateToken, apb.CreateTokenRequest(
            tenant=r.resource("tenants", tenant), description=description, admin=admin, ttl_seconds=ttl_seconds))

    def revoke_token(self, token: str) -> None:
        """token: "tenants/{tenant}/tokens/{id}"."""
        self._call(self.admin.RevokeToken, apb.RevokeTokenRequest(name=token))

    def get_quota(self, tenant: str) -> apb.QuotaUsage:
        return self._call(self.admin.GetQuota, apb.GetQuotaRequest(tenant=r.resource("tenants", tenant)))

    def update_quota(self, tenant: str, quota: apb.Quota) -> apb.QuotaUsage:
        return self._call(self.admin.UpdateQuota,
                          apb.UpdateQuotaRequest(tenant=r.resource("tenants", tenant), quota=quota))

    # ------------------------------------------------------------------ admin: certificates

    def issue_certificate(self, role: str, ident: str, csr_pem: str, days: int = 0) -> apb.Certificate:
        return self._call(self.admin.IssueCertificate, apb.IssueCertificateRequest(
            role=role, id=ident, csr_pem=csr_pem, days=days))

    def revoke_certificate(self, serial: str, reason: str = "") -> apb.Certificate:
        return self._call(self.admin.RevokeCertificate,
                          apb.RevokeCertificateRequest(serial=serial, reason=reason))

    def list_certificates(self) -> list[apb.Certificate]:
        return self._all(self._pages(self.admin.ListCertificates, apb.ListCertificatesRequest(),
                                     lambda p: p.certificates))
