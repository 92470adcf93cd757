"""The Configurations service: a tenant's configuration groups (Trove's /configurations), the parameter rules
of each datastore version, and attaching a group to an instance.

Every value is checked against the rules (common/parameters.py) and, for an instance, its flavor's memory
before anything is stored or sent; the guest agent checks again and applies all of an instance's values or
none (agent/configuration.py). A static parameter leaves the instance RESTART_REQUIRED (recorded in
instance_configurations) until RestartInstance, whose task clears it.
"""
from __future__ import annotations

import asyncio
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

from google.protobuf import empty_pb2
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common import parameters
from reddwarf.common.errors import FailedPrecondition, InvalidArgument, NotFound, RedDwarfError, grpc_edge
from reddwarf.common.states import InstanceStatus
from reddwarf.v1 import agent_pb2, configuration_pb2, configuration_pb2_grpc, database_pb2

from . import models
from .agents import AgentRegistry
from .app import App, Context
from .auth import Principal, current_principal
from .catalog import resource_id, ts
from .events import EventBus
from .instance_views import derived_status, instance_pb, owned_instance
from .pagination import Paginator

APPLY_TIMEOUT = 120
# The statuses in which a group may be attached, detached or changed under an instance.
READY = (InstanceStatus.ACTIVE, InstanceStatus.RESTART_REQUIRED)


def owned_configuration(s: Session, p: Principal, name: str, field: str = "name") -> models.Configuration:
    """The caller's group of that name; another tenant's is NOT_FOUND (its existence is not disclosed)."""
    cid = resource_id(name, "configurations", field)
    row = s.get(models.Configuration, cid)
    if row is None or (not p.admin and row.tenant_id != p.tenant_id):
        raise NotFound(f"configuration {cid!r} does not exist", field=field)
    return row


def _live_attached(s: Session, cid: str) -> list[models.Instance]:
    return list(s.scalars(select(models.Instance).join(
        models.InstanceConfiguration, models.InstanceConfiguration.instance_id == models.Instance.id).where(
        models.InstanceConfiguration.configuration_id == cid, models.Instance.deleted_at.is_(None))
        .order_by(models.Instance.created_at, models.Instance.id)))


def configuration_pb(s: Session, row: models.Configuration) -> configuration_pb2.Configuration:
    count = s.scalar(select(func.count()).select_from(models.InstanceConfiguration).join(
        models.Instance, models.Instance.id == models.InstanceConfiguration.instance_id).where(
        models.InstanceConfiguration.configuration_id == row.id, models.Instance.deleted_at.is_(None)))
    return configuration_pb2.Configuration(
        name=f"configurations/{row.id}", id=row.id, display_name=row.display_name, description=row.description,
        datastore=row.datastore, datastore_version=row.datastore_version,
        values={k: str(v) for k, v in (row.values or {}).items()}, instance_count=int(count or 0),
        create_time=ts(row.created_at), update_time=ts(row.updated_at), tenant=f"tenants/{row.tenant_id}")


def parameter_pb(datastore: str, version: str, r: parameters.Rule) -> configuration_pb2.ConfigurationParameter:
    pb = configuration_pb2.ConfigurationParameter(
        name=f"datastores/{datastore}/versions/{version}/parameters/{r.name}", parameter=r.name,
        datastore=datastore, datastore_version=version, type=r.type, allowed_values=list(r.allowed),
        dynamic=r.dynamic, restart_required=r.restart_required, flavor_bound=r.flavor_bound,
        description=r.description)
    if r.min is not None:
        pb.min = float(r.min)
    if r.max is not None:
        pb.max = float(r.max)
    return pb


def _display_name(name: str, field: str) -> str:
    name = name.strip()
    if not 1 <= len(name) <= 255:
        raise InvalidArgument("a configuration's name must be 1..255 characters", field=field)
    return name


def _flavor_memory(s: Session, inst: models.Instance) -> int:
    f = s.get(models.Flavor, inst.flavor_id)
    return int(f.memory_mb) if f is not None else 0


def bind_on_create(s: Session, p: Principal, inst: models.Instance, name: str) -> None:
    """CreateInstance's `configuration`: the group checked against the new instance (same datastore version,
    its flavor's memory) and recorded, so prepare writes it before mysqld first starts."""
    g = owned_configuration(s, p, name, "configuration")
    if (g.datastore, g.datastore_version) != (inst.datastore, inst.datastore_version):
        raise InvalidArgument(f"configuration is for {g.datastore} {g.datastore_version}, the instance is "
                              f"{inst.datastore} {inst.datastore_version}", field="configuration")
    values = parameters.validate(g.datastore, g.datastore_version, g.values or {}, _flavor_memory(s, inst),
                                 "configuration.values")
    s.add(models.InstanceConfiguration(instance_id=inst.id, configuration_id=g.id, applied=values,
                                       restart_required=False))


def check_flavor(s: Session, inst: models.Instance, memory_mb: int) -> None:
    """A resize keeps the instance's configuration group valid: its buffer pool must fit the new flavor."""
    ic = s.get(models.InstanceConfiguration, inst.id)
    if ic is None or not ic.configuration_id:
        return
    try:
        parameters.validate(inst.datastore, inst.datastore_version, {k: str(v) for k, v in (ic.applied or {}).items()},
                            memory_mb, "values")
    except InvalidArgument as exc:
        raise InvalidArgument(f"the instance's configuration group does not fit this flavor: {exc.message}",
                              field="flavor") from None


def values_for_prepare(sessions: sessionmaker[Session], iid: str) -> dict[str, str]:
    """The group values an instance's prepare writes into its my.cnf include (none without a group)."""
    with sessions() as s:
        ic = s.get(models.InstanceConfiguration, iid)
        return {k: str(v) for k, v in (ic.applied or {}).items()} if ic is not None and ic.configuration_id else {}


def restarted(sessions: sessionmaker[Session], iid: str) -> None:
    """After mysqld restarted (the restart task): static values are in effect, no restart is pending."""
    with sessions() as s, s.begin():
        ic = s.get(models.InstanceConfiguration, iid)
        if ic is not None and ic.restart_required:
            ic.restart_required = False


@dataclass(eq=False)
class ConfigurationsServicer(configuration_pb2_grpc.ConfigurationsServicer):
    app: App
    registry: AgentRegistry
    events: EventBus
    pages: Paginator
    # One change at a time per instance: the agent's view and the recorded one move together.
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)

    # -- groups ------------------------------------------------------------------------------------
    @grpc_edge
    async def CreateConfiguration(self, request: configuration_pb2.CreateConfigurationRequest,
                                  context: Context) -> configuration_pb2.Configuration:
        p = current_principal(context)
        c = request.configuration
        display = _display_name(c.display_name, "configuration.display_name")

        def create() -> configuration_pb2.Configuration:
            with self.app.sessions() as s, s.begin():
                ds = s.get(models.Datastore, c.datastore or "mariadb")
                if ds is None:
                    raise NotFound(f"datastore {c.datastore!r} does not exist", field="configuration.datastore")
                version = c.datastore_version or ds.default_version
                dv = s.scalar(select(models.DatastoreVersion).where(
                    models.DatastoreVersion.datastore_id == ds.id, models.DatastoreVersion.version == version))
                if dv is None:
                    raise NotFound(f"datastore version {ds.id} {version!r} does not exist",
                                   field="configuration.datastore_version")
                parameters.rules_for(ds.id, version, "configuration.datastore_version")
                values = parameters.validate(ds.id, version, dict(c.values), None, "configuration.values")
                if not p.tenant_id:
                    raise InvalidArgument("a configuration belongs to a tenant: call with a tenant token",
                                          field="configuration")
                row = models.Configuration(id=str(uuid.uuid4()), tenant_id=p.tenant_id, display_name=display,
                                           description=c.description[:4096], datastore=ds.id,
                                           datastore_version=version, values=values)
                s.add(row)
                s.flush()
                return configuration_pb(s, row)
        return await asyncio.to_thread(create)

    @grpc_edge
    async def GetConfiguration(self, request: configuration_pb2.GetConfigurationRequest,
                               context: Context) -> configuration_pb2.Configuration:
        p = current_principal(context)
        with self.app.sessions() as s:
            return configuration_pb(s, owned_configuration(s, p, request.name))

    @grpc_edge
    async def ListConfigurations(self, request: configuration_pb2.ListConfigurationsRequest,
                                 context: Context) -> configuration_pb2.ListConfigurationsResponse:
        p = current_principal(context)
        page = self.pages.page("ListConfigurations", p.caller_key, request.page_size, request.page_token)

        def q() -> configuration_pb2.ListConfigurationsResponse:
            with self.app.sessions() as s:
                query = select(models.Configuration).order_by(models.Configuration.created_at, models.Configuration.id)
                if not p.admin:
                    query = query.where(models.Configuration.tenant_id == p.tenant_id)
                rows = s.scalars(query.offset(page.offset).limit(page.size + 1)).all()
                return configuration_pb2.ListConfigurationsResponse(
                    configurations=[configuration_pb(s, r) for r in rows[:page.size]],
                    next_page_token=self.pages.next_token("ListConfigurations", p.caller_key, page,
                                                          len(rows) > page.size))
        return await asyncio.to_thread(q)

    @grpc_edge
    async def UpdateConfiguration(self, request: configuration_pb2.UpdateConfigurationRequest,
                                  context: Context) -> configuration_pb2.Configuration:
        """Trove's PUT (merge unset: the values replace the group's) and PATCH (merge: set on top). All the
        new values are checked, for every attached instance's flavor too, before the group changes; then
        each attached instance gets them, all or nothing per instance."""
        p = current_principal(context)
        if request.unset and not request.merge:
            raise InvalidArgument("unset goes with merge (a replacing update names every value it keeps)",
                                  field="unset")
        display = _display_name(request.display_name, "display_name") if request.HasField("display_name") else None

        def store() -> tuple[configuration_pb2.Configuration, dict[str, str], list[str]]:
            with self.app.sessions() as s, s.begin():
                g = owned_configuration(s, p, request.name)
                new = dict(g.values or {}) if request.merge else {}
                new.update(request.values)
                for i, key in enumerate(request.unset):
                    if key not in new:
                        raise InvalidArgument(f"{key[:64]!r} is not set in this configuration", field=f"unset[{i}]")
                    new.pop(key)
                values = parameters.validate(g.datastore, g.datastore_version, new, None, "values")
                attached = _live_attached(s, g.id)
                for inst in attached:
                    self._check_ready(s, inst, "name")
                    parameters.validate(g.datastore, g.datastore_version, values, _flavor_memory(s, inst), "values")
                g.values = values
                if display is not None:
                    g.display_name = display
                if request.HasField("description"):
                    g.description = request.description[:4096]
                s.flush()
                return configuration_pb(s, g), values, [i.id for i in attached]
        pb, values, instances = await asyncio.to_thread(store)
        outcomes = await asyncio.gather(*(self._apply(iid, pb.id, values) for iid in instances),
                                        return_exceptions=True)
        failed = [(iid, o) for iid, o in zip(instances, outcomes, strict=True) if isinstance(o, BaseException)]
        for _, o in failed:
            if not isinstance(o, RedDwarfError):
                raise o
        if failed:
            iid, err = failed[0]
            assert isinstance(err, RedDwarfError)
            raise type(err)(f"the configuration was stored but instance {iid} did not take it: {err.message} "
                            f"({len(failed)} of {len(instances)} instances failed; each kept its values as they were)",
                            field="name")
        with self.app.sessions() as s:
            return configuration_pb(s, owned_configuration(s, p, request.name))

    @grpc_edge
    async def DeleteConfiguration(self, request: configuration_pb2.DeleteConfigurationRequest,
                                  context: Context) -> empty_pb2.Empty:
        p = current_principal(context)

        def delete() -> None:
            with self.app.sessions() as s, s.begin():
                g = owned_configuration(s, p, request.name)
                attached = _live_attached(s, g.id)
                if attached:
                    raise FailedPrecondition(f"configuration is attached to {len(attached)} instance(s) "
                                             f"({', '.join(i.id for i in attached[:5])}); detach it first",
                                             field="name")
                # Deleted instances keep their row; it no longer names the group.
                for ic in s.scalars(select(models.InstanceConfiguration).where(
                        models.InstanceConfiguration.configuration_id == g.id)):
                    ic.configuration_id = None
                s.flush()
                s.delete(g)
        await asyncio.to_thread(delete)
        return empty_pb2.Empty()

    @grpc_edge
    async def ListConfigurationInstances(self, request: configuration_pb2.ListConfigurationInstancesRequest,
                                         context: Context) -> configuration_pb2.ListConfigurationInstancesResponse:
        p = current_principal(context)
        page = self.pages.page("ListConfigurationInstances", p.caller_key, request.page_size, request.page_token,
                               request.name)
        with self.app.sessions() as s:
            g = owned_configuration(s, p, request.name)
            rows = _live_attached(s, g.id)
            items = []
            for inst in rows[page.offset:page.offset + page.size + 1]:
                ic = s.get(models.InstanceConfiguration, inst.id)
                items.append(configuration_pb2.ConfigurationInstance(
                    instance=f"instances/{inst.id}", id=inst.id, display_name=inst.display_name,
                    restart_required=bool(ic and ic.restart_required)))
        return configuration_pb2.ListConfigurationInstancesResponse(
            instances=items[:page.size], next_page_token=self.pages.next_token(
                "ListConfigurationInstances", p.caller_key, page, len(items) > page.size, request.name))

    # -- parameters --------------------------------------------------------------------------------
    @staticmethod
    def _version(parent: str, field: str) -> tuple[str, str]:
        parts = parent.split("/")
        if len(parts) != 4 or parts[0] != "datastores" or parts[2] != "versions" or not parts[1] or not parts[3]:
            raise InvalidArgument(f"{field} must be datastores/<datastore>/versions/<version>, got {parent[:100]!r}",
                                  field=field)
        return parts[1], parts[3]

    @grpc_edge
    async def ListConfigurationParameters(self, request: configuration_pb2.ListConfigurationParametersRequest,
                                          context: Context) -> configuration_pb2.ListConfigurationParametersResponse:
        current_principal(context)
        ds, version = self._version(request.parent, "parent")
        rules = parameters.rules_for(ds, version, "parent")
        return configuration_pb2.ListConfigurationParametersResponse(
            parameters=[parameter_pb(ds, version, r) for _, r in sorted(rules.items())])

    @grpc_edge
    async def GetConfigurationParameter(self, request: configuration_pb2.GetConfigurationParameterRequest,
                                        context: Context) -> configuration_pb2.ConfigurationParameter:
        current_principal(context)
        parent, sep, name = request.name.rpartition("/parameters/")
        if not sep or not name:
            raise InvalidArgument("name must be datastores/<datastore>/versions/<version>/parameters/<parameter>",
                                  field="name")
        ds, version = self._version(parent, "name")
        return parameter_pb(ds, version, parameters.rule(ds, version, name, "name"))

    # -- instances ---------------------------------------------------------------------------------
    def _check_ready(self, s: Session, inst: models.Instance, field: str) -> None:
        status, _ = derived_status(s, inst, self.app.settings.heartbeat_expiry_seconds)
        if status not in READY or not self.registry.is_connected(inst.id):
            raise FailedPrecondition(f"instance {inst.id} is {status}; configurations change only on an ACTIVE "
                                     "(or RESTART_REQUIRED) instance", field=field)

    async def _apply(self, iid: str, cid: str | None, values: Mapping[str, str]) -> None:
        """Sends the instance's whole set of values to its guest and records what it answered."""
        lock = self._locks.setdefault(iid, asyncio.Lock())
        async with lock:
            res = await self.registry.call(iid, agent_pb2.Command(apply_configuration=agent_pb2.ApplyConfiguration(
                values=dict(values))), timeout=APPLY_TIMEOUT)

            def record() -> None:
                with self.app.sessions() as s, s.begin():
                    ic = s.get(models.InstanceConfiguration, iid)
                    if ic is None:
                        ic = models.InstanceConfiguration(instance_id=iid)
                        s.add(ic)
                    ic.configuration_id, ic.applied = cid, dict(values)
                    ic.restart_required = res.configuration_applied.restart_required
            await asyncio.to_thread(record)
        self.events.publish(iid, "status")

    def _instance_pb(self, iid: str) -> database_pb2.Instance:
        with self.app.sessions() as s:
            row = s.get(models.Instance, iid)
            assert row is not None
            return instance_pb(s, row, self.app.settings.heartbeat_expiry_seconds)

    @grpc_edge
    async def AttachConfiguration(self, request: configuration_pb2.AttachConfigurationRequest,
                                  context: Context) -> database_pb2.Instance:
        p = current_principal(context)

        def check() -> tuple[str, str, dict[str, str]]:
            with self.app.sessions() as s:
                inst = owned_instance(s, p, request.instance, "instance")
                g = owned_configuration(s, p, request.configuration, "configuration")
                if (g.datastore, g.datastore_version) != (inst.datastore, inst.datastore_version):
                    raise InvalidArgument(f"configuration is for {g.datastore} {g.datastore_version}, the instance "
                                          f"is {inst.datastore} {inst.datastore_version}", field="configuration")
                ic = s.get(models.InstanceConfiguration, inst.id)
                if ic is not None and ic.configuration_id and ic.configuration_id != g.id:
                    raise FailedPrecondition(f"instance already has configuration {ic.configuration_id}; detach it "
                                             "first", field="instance")
                values = parameters.validate(g.datastore, g.datastore_version, g.values or {},
                                             _flavor_memory(s, inst), "configuration.values")
                self._check_ready(s, inst, "instance")
                return inst.id, g.id, values
        iid, cid, values = await asyncio.to_thread(check)
        await self._apply(iid, cid, values)
        return self._instance_pb(iid)

    @grpc_edge
    async def DetachConfiguration(self, request: configuration_pb2.DetachConfigurationRequest,
                                  context: Context) -> database_pb2.Instance:
        p = current_principal(context)
        with self.app.sessions() as s:
            inst = owned_instance(s, p, request.instance, "instance")
            ic = s.get(models.InstanceConfiguration, inst.id)
            if ic is None or not ic.configuration_id:
                raise FailedPrecondition("the instance has no configuration to detach", field="instance")
            self._check_ready(s, inst, "instance")
            iid = inst.id
        await self._apply(iid, None, {})
        return self._instance_pb(iid)
