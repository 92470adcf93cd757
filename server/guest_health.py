"""What the agent registry learns about a guest, written to its instance row: each health report (a guest
heard from again is ACTIVE again) and silence (an ACTIVE instance whose heartbeats stopped is SHUTDOWN)."""
from __future__ import annotations

import asyncio

from google.protobuf import json_format
from sqlalchemy.orm import Session, sessionmaker

from reddwarf.common import states
from reddwarf.common.clock import now as utcnow
from reddwarf.common.states import InstanceStatus, ServiceState
from reddwarf.v1 import common_pb2

from . import models
from .events import EventBus


class GuestHealthRecorder:
    def __init__(self, sessions: sessionmaker[Session], events: EventBus) -> None:
        self.sessions = sessions
        self.events = events

    async def on_health(self, instance_id: str, health: common_pb2.GuestHealth) -> None:
        data = json_format.MessageToDict(health)
        running = health.service_state == states.to_pb(ServiceState.RUNNING)

        def save() -> None:
            with self.sessions() as s, s.begin():
                row = s.get(models.Instance, instance_id)
                if row is None:
                    return
                row.health = data
                row.health_at = utcnow()
                if row.status == InstanceStatus.SHUTDOWN and running:
                    row.status = InstanceStatus.ACTIVE
        await asyncio.to_thread(save)
        self.events.publish(instance_id, "health")

    async def on_silent(self, instance_id: str) -> None:
        def save() -> None:
            with self.sessions() as s, s.begin():
                row = s.get(models.Instance, instance_id)
                if row is not None and row.status == InstanceStatus.ACTIVE:
                    row.status = InstanceStatus.SHUTDOWN
        await asyncio.to_thread(save)
        self.events.publish(instance_id, "silent")
