"""A small in-process gRPC API (Catalog + Instances) for the client unit tests.

It stands in for the control server only where a test needs a behaviour the real server cannot be made to
show on demand (a chosen number of pages, an instance stepping BUILD -> ACTIVE in a second, a status with
field violations); tests against the real server process live beside these.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from concurrent import futures
from contextlib import contextmanager
from dataclasses import dataclass, field

import grpc
from grpc_status import rpc_status

from reddwarf.common.errors import InvalidArgument, NotFound, RedDwarfError, Unauthenticated, to_status_pb
from reddwarf.v1 import common_pb2 as cpb
from reddwarf.v1 import database_pb2 as pb
from reddwarf.v1 import database_pb2_grpc as pb_grpc

from .certs import TestPki

TOKEN = "tok-demo"


def _abort(context: grpc.ServicerContext, err: RedDwarfError) -> None:
    context.abort_with_status(rpc_status.to_status(to_status_pb(err)))


def _auth(context: grpc.ServicerContext) -> None:
    md = dict(context.invocation_metadata())
    if md.get("authorization") != f"Bearer {TOKEN}":
        _abort(context, Unauthenticated("missing or unknown bearer token"))


@dataclass
class FakeState:
    flavors: list[pb.Flavor] = field(default_factory=list)
    instances: dict[str, pb.Instance] = field(default_factory=dict)
    backups: dict[str, pb.Backup] = field(default_factory=dict)
    watch_implemented: bool = True
    list_calls: int = 0


class Catalog(pb_grpc.CatalogServicer):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def ListFlavors(self, request, context):
        _auth(context)
        self.state.list_calls += 1
        size = request.page_size or 50
        start = int(request.page_token or 0)
        page = self.state.flavors[start:start + size]
        nxt = str(start + size) if start + size < len(self.state.flavors) else ""
        return pb.ListFlavorsResponse(flavors=page, next_page_token=nxt)

    def GetFlavor(self, request, context):
        _auth(context)
        if not request.name.startswith("flavors/"):
            _abort(context, InvalidArgument("name must look like flavors/{flavor}", field="name"))
        for f in self.state.flavors:
            if f.name == request.name:
                return f
        _abort(context, NotFound(f"flavor {request.name} not found", field="name"))

    def ListDatastores(self, request, context):
        _auth(context)
        return pb.ListDatastoresResponse(datastores=[pb.Datastore(
            name="datastores/mariadb", id="mariadb", default_version="10.11",
            versions=[pb.DatastoreVersion(name="datastores/mariadb/versions/10.11", version="10.11",
                                          active=True)])])

    def GetCaller(self, request, context):
        _auth(context)
        return pb.Caller(tenant="tenants/demo", identity="spiffe://reddwarf/client/test")


class Instances(pb_grpc.InstancesServicer):
    def __init__(self, state: FakeState) -> None:
        self.state = state

    def CreateInstance(self, request, context):
        _auth(context)
        if not request.instance.display_name:
            _abort(context, InvalidArgument("display_name is required", field="instance.display_name"))
        ident = f"i{len(self.state.instances) + 1}"
        inst = pb.Instance(name=f"instances/{ident}", id=ident, display_name=request.instance.display_name,
                           status=pb.INSTANCE_STATUS_BUILD, flavor=request.instance.flavor, volume=request.instance.volume,
                           datastore="mariadb", datastore_version="10.11", tenant="demo")
        self.state.instances[ident] = inst

        def become_active() -> None:  # the build "finishes" a little later
            time.sleep(0.6)
            inst.status = pb.INSTANCE_STATUS_ACTIVE
        threading.Thread(target=become_active, daemon=True).start()
        return inst

    def _get(self, name: str, context: grpc.ServicerContext) -> pb.Instance:
        inst = self.state.instances.get(name.removeprefix("instances/"))
        if inst is None:
            _abort(context, NotFound(f"instance {name} not found", field="name"))
        return inst

    def GetInstance(self, request, context):
        _auth(context)
        return self._get(request.name, context)

    def ListInstances(self, request, context):
        _auth(context)
        return pb.ListInstancesResponse(instances=list(self.state.instances.values()))

    def DeleteInstance(self, request, context):
        _auth(context)
        inst = self._get(request.name, context)
        del self.state.instances[inst.id]
        inst.status = pb.INSTANCE_STATUS_DELETING
        return inst

    def WatchInstance(self, request, context):
        _auth(context)
        if not self.state.watch_implemented:
            context.abort(grpc.StatusCode.UNIMPLEMENTED, "WatchInstance is not implemented")
        inst = self._get(request.name, context)
        last = None
        while context.is_active():
            if inst.id not in self.state.instances:
                return
            if inst.status != last:
                last = inst.status
                snapshot = pb.Instance()
                snapshot.CopyFrom(inst)
                yield pb.InstanceEvent(instance=snapshot, change="status")
            time.sleep(0.05)


class Backups(pb_grpc.BackupsServicer):
    """Only reads: tests put backups into state.backups."""

    def __init__(self, state: FakeState) -> None:
        self.state = state

    def GetBackup(self, request, context):
        _auth(context)
        b = self.state.backups.get(request.name.removeprefix("backups/"))
        if b is None:
            _abort(context, NotFound(f"backup {request.name} not found", field="name"))
        return b

    def ListBackups(self, request, context):
        _auth(context)
        return pb.ListBackupsResponse(backups=[b for b in self.state.backups.values()
                                               if not request.instance or b.instance == request.instance])


@contextmanager
def fake_api(pki: TestPki, n_flavors: int = 7) -> Iterator[tuple[str, FakeState]]:
    """Serves on 127.0.0.1 with mTLS (client certificates from pki's CA required)."""
    state = FakeState(flavors=[
        pb.Flavor(name=f"flavors/f{i}", id=f"f{i}", display_name=f"Flavor {i}",
                  limits=cpb.Limits(memory_mb=256 * (i + 1), cpu_shares=1024, max_processes=200),
                  default_volume_gb=2) for i in range(n_flavors)])
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8))
    pb_grpc.add_CatalogServicer_to_server(Catalog(state), server)
    pb_grpc.add_InstancesServicer_to_server(Instances(state), server)
    pb_grpc.add_BackupsServicer_to_server(Backups(state), server)
    creds = grpc.ssl_server_credentials([(pki.server_key.read_bytes(), pki.server_cert.read_bytes())],
                                        root_certificates=pki.ca.read_bytes(), require_client_auth=True)
    port = server.add_secure_port("127.0.0.1:0", creds)
    server.start()
    try:
        yield f"127.0.0.1:{port}", state
    finally:
        server.stop(grace=0).wait()
