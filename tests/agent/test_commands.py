"""The command table and the agent's edge, without a server: every command of agent.proto has a handler,
messages become the agent's own values and results come back as the messages the server reads."""
from __future__ import annotations

from datetime import UTC, datetime

import pytest

from reddwarf.agent import convert, model
from reddwarf.agent.commands import COMMANDS, CommandRunner
from reddwarf.agent.fake import FakeDriver
from reddwarf.common.errors import FailedPrecondition, InvalidArgument
from reddwarf.common.states import ServiceState
from reddwarf.v1 import agent_pb2, common_pb2


async def no_progress(percent: int, message: str, done: int) -> None:
    return None


def test_every_command_of_the_protocol_has_a_handler_and_no_other() -> None:
    oneof = agent_pb2.Command.DESCRIPTOR.oneofs_by_name["command"]
    assert set(COMMANDS) == {f.name for f in oneof.fields}


async def test_a_command_runs_through_the_driver_and_answers_in_its_result_field(tmp_path) -> None:
    runner = CommandRunner(FakeDriver(str(tmp_path)))
    made = await runner.run(agent_pb2.Command(command_id="c1", create_databases=agent_pb2.CreateDatabases(
        databases=[common_pb2.Database(database="shop")])), no_progress)
    assert made.command_id == "c1" and made.status.code == 0 and made.WhichOneof("result") is None
    listed = await runner.run(agent_pb2.Command(command_id="c2", list_databases=agent_pb2.ListDatabases()),
                              no_progress)
    assert [d.database for d in listed.databases.databases] == ["shop"]
    root = await runner.run(agent_pb2.Command(command_id="c3", enable_root=agent_pb2.EnableRoot()), no_progress)
    assert root.root_credentials.user == "root" and root.root_credentials.password
    health = await runner.run(agent_pb2.Command(command_id="c4", get_health=agent_pb2.GetHealth()), no_progress)
    assert health.health.service_state == common_pb2.SERVICE_STATE_RUNNING


async def test_a_command_without_a_kind_is_invalid_and_backups_without_a_runner_are_refused(tmp_path) -> None:
    runner = CommandRunner(FakeDriver(str(tmp_path)))
    with pytest.raises(InvalidArgument):
        await runner.run(agent_pb2.Command(command_id="c1"), no_progress)
    with pytest.raises(FailedPrecondition, match="backups are not available"):
        await runner.run(agent_pb2.Command(command_id="c2", backup=agent_pb2.RunBackup(backup_id="b")),
                         no_progress)


def test_health_states_become_the_proto_enum_values() -> None:
    h = model.GuestHealth(service_state=ServiceState.CRASHED, observed=datetime(2026, 1, 2, tzinfo=UTC),
                          restarts=2, services={"memcached": ServiceState.RUNNING})
    pb = convert.health_to_pb(h)
    assert pb.service_state == common_pb2.SERVICE_STATE_CRASHED and pb.restarts == 2
    assert dict(pb.services) == {"memcached": common_pb2.SERVICE_STATE_RUNNING}
    assert pb.observed.ToDatetime(tzinfo=UTC) == h.observed


def test_a_prepare_record_reads_back_and_keeps_the_messages_json_form() -> None:
    spec = model.Prepare(services=(model.ServiceSpec("mariadb", packages=("mariadb-server",), port=3307),),
                         limits=model.Limits(memory_mb=1024, max_open_files=4096), datadir="/var/lib/mysql",
                         bind_address="127.0.0.1")
    data = convert.prepare_to_json(spec)
    assert data["limits"]["memoryMb"] == "1024" and data["bindAddress"] == "127.0.0.1"
    assert convert.prepare_from_json(data) == spec
