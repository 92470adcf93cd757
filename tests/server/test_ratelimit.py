"""API rate limits per tenant (server/ratelimit.py): the token bucket on a fake clock, then the real server
with a small limit: a tenant over its rate gets RESOURCE_EXHAUSTED with a google.rpc.RetryInfo, another
tenant and the admin are unaffected, the bucket refills, and GetLimits shows the state."""
from __future__ import annotations

import time
import uuid

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from reddwarf.common import errors
from reddwarf.common.pki import Identity
from reddwarf.server.auth import Principal
from reddwarf.server.ratelimit import Rate, RateLimiter, per_unit
from reddwarf.server.settings import Settings
from reddwarf.v1 import admin_pb2, admin_pb2_grpc, database_pb2, database_pb2_grpc
from tests.fixtures.server import start_server

LIMIT, PERIOD = 5, 20.0  # the server below: 5 calls per 20 s, so a token every 4 s


def principal(tenant: str, admin: bool = False) -> Principal:
    return Principal(tenant, admin, Identity("client", "cli", 1))


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_default_is_trove_s_200_a_minute():
    s = Settings()
    assert (s.api_rate_limit, s.api_rate_period_seconds, s.admin_rate_limit) == (200, 60.0, 0)
    assert per_unit(200, 60) == (200, "MINUTE") and per_unit(5, 2) == (150, "MINUTE")
    assert per_unit(10, 1) == (10, "SECOND") and per_unit(100, 3600) == (100, "HOUR")
    with pytest.raises(errors.InvalidArgument):
        Settings(api_rate_period_seconds=0)


def test_bucket_per_tenant_refills_on_the_clock():
    clock = Clock()
    rl = RateLimiter(Rate(3, 3.0), Rate(0), clock)  # a token a second
    a, b = principal("a"), principal("b")
    assert [rl.take(a) for _ in range(3)] == [None, None, None]
    wait = rl.take(a)
    assert wait == pytest.approx(1.0)
    assert rl.take(b) is None  # b's bucket is its own
    clock.t += 0.5
    assert rl.take(a) == pytest.approx(0.5)
    clock.t += 0.5
    assert rl.take(a) is None and rl.take(a) is not None
    clock.t += 100
    st = rl.state(a)
    assert st is not None and st.remaining == 3 and st.next_in == 0  # never more than the bucket holds
    # A free call (GetCaller) takes nothing but is refused on an empty bucket.
    assert rl.take(a, 0) is None and rl.state(a).remaining == 3
    for _ in range(3):
        rl.take(a)
    assert rl.take(a, 0) is not None
    # Admins are not limited by default.
    assert all(rl.take(principal("a", admin=True)) is None for _ in range(100))
    assert rl.state(principal("a", admin=True)) is None


def test_admin_may_have_its_own_limit():
    clock = Clock()
    rl = RateLimiter(Rate(1, 60.0), Rate(2, 60.0), clock)
    assert rl.take(principal("x")) is None and rl.take(principal("x")) is not None
    assert rl.take(principal("x", admin=True)) is None and rl.take(principal("x", admin=True)) is None
    assert rl.take(principal("x", admin=True)) is not None


def test_full_buckets_are_forgotten():
    clock = Clock()
    rl = RateLimiter(Rate(2, 1.0), Rate(0), clock)
    for n in range(1100):
        rl.take(principal(f"t{n}"))
        clock.t += 0.01
    assert len(rl._buckets) < 1100


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with start_server(tmp_path_factory.mktemp("rl"), extra_env={
            "REDDWARF_API_RATE_LIMIT": str(LIMIT), "REDDWARF_API_RATE_PERIOD_SECONDS": str(PERIOD)}) as s:
        yield s


def tenant(server) -> tuple[str, tuple[tuple[str, str], ...]]:
    a = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
    tid = f"r{uuid.uuid4().hex[:6]}"
    a.CreateTenant(admin_pb2.CreateTenantRequest(tenant=admin_pb2.Tenant(id=tid)))
    return tid, server.metadata(a.CreateToken(admin_pb2.CreateTokenRequest(tenant=f"tenants/{tid}")).secret)


def retry_info(e: grpc.RpcError) -> error_details_pb2.RetryInfo:
    st = rpc_status.from_call(e)
    assert st is not None
    for d in st.details:
        if d.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
            info = error_details_pb2.RetryInfo()
            d.Unpack(info)
            return info
    raise AssertionError(f"no RetryInfo in {st}")


def test_over_the_rate_is_resource_exhausted_with_retry_info(server):
    _, md = tenant(server)
    _, other = tenant(server)
    cat = database_pb2_grpc.CatalogStub(server.channel())
    t0 = time.monotonic()
    for _ in range(LIMIT):
        cat.ListFlavors(database_pb2.ListFlavorsRequest(), metadata=md, timeout=5)
    with pytest.raises(grpc.RpcError) as e:
        cat.ListFlavors(database_pb2.ListFlavorsRequest(), metadata=md, timeout=5)
    elapsed = time.monotonic() - t0
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value
    assert "rate limit" in e.value.details()
    delay = retry_info(e.value).retry_delay.ToNanoseconds() / 1e9
    assert 0 < delay <= PERIOD / LIMIT
    assert elapsed < PERIOD / LIMIT or delay < PERIOD / LIMIT  # the refill so far was counted
    # The error table carries the delay, and says 429 for it.
    err = errors.from_rpc_error(e.value)
    assert isinstance(err, errors.ResourceExhausted) and err.retry_after == pytest.approx(delay)
    assert errors.http_status_of(err) == 429 and errors.http_status_of(errors.ResourceExhausted("big")) == 413
    # Another tenant and the admin are unaffected.
    for _ in range(LIMIT):
        cat.ListFlavors(database_pb2.ListFlavorsRequest(), metadata=other, timeout=5)
    admin = admin_pb2_grpc.AdminStub(server.channel(server.admin_files))
    for _ in range(3 * LIMIT):
        admin.ListTenants(admin_pb2.ListTenantsRequest(), timeout=5)
    # The bucket refills: after the delay, the tenant may call again.
    time.sleep(delay + 0.05)
    cat.ListFlavors(database_pb2.ListFlavorsRequest(), metadata=md, timeout=5)


def test_get_limits_shows_quotas_and_the_bucket(server):
    tid, md = tenant(server)
    cat = database_pb2_grpc.CatalogStub(server.channel())
    caller = cat.GetCaller(database_pb2.GetCallerRequest(), metadata=md, timeout=5)  # free
    assert caller.tenant == f"tenants/{tid}"
    lim = cat.GetLimits(database_pb2.GetLimitsRequest(), metadata=md, timeout=5)
    assert lim.max_instances == Settings().default_quota.instances and lim.used_instances == 0
    (rate,) = lim.rates
    assert (rate.verb, rate.value, rate.unit) == ("*", LIMIT * 60 / PERIOD, "MINUTE")
    assert rate.remaining == LIMIT - 1  # GetLimits took one; GetCaller none
    for _ in range(LIMIT - 1):
        cat.GetFlavor(database_pb2.GetFlavorRequest(name="flavors/tiny"), metadata=md, timeout=5)
    # With the bucket empty even the free GetCaller is refused, and says when to come back.
    with pytest.raises(grpc.RpcError) as e:
        cat.GetCaller(database_pb2.GetCallerRequest(), metadata=md, timeout=5)
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and retry_info(e.value).retry_delay.nanos > 0
    # The health service has no principal and no limit.
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    with server.channel() as ch:
        for _ in range(2 * LIMIT):
            health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=5)
