"""Enrollment of a new guest agent: its one-time token (derived from the server secret, stored only as a
hash) and the certificate signed on its own key (its CSR) once the token is accepted."""
from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac

from reddwarf.common.clock import now as utcnow

from . import models
from .admin import record_certificate
from .app import App
from .auth import hash_secret

TOKEN_LIFETIME = dt.timedelta(hours=2)


class Enrollment:
    def __init__(self, app: App, secret: bytes) -> None:
        self.app = app
        self._secret = secret

    def token(self, instance_id: str, generation: int = 0) -> str:
        # Recomputable from the server secret, so a replayed create_container step hands hostd the very
        # same bootstrap (hostd's create is idempotent on it), yet the DB only holds the hash.
        return hmac.new(self._secret, f"enroll:{instance_id}:{generation}".encode(), hashlib.sha256).hexdigest()

    def issue_token(self, instance_id: str, generation: int = 0) -> str:
        """The instance's token, its hash recorded (once) so that enrollment can accept it. A container made
        again for the same instance (a migration) enrolls with a token of a later generation: each is good
        for one enrollment only."""
        token = self.token(instance_id, generation)
        with self.app.sessions() as s, s.begin():
            if s.get(models.EnrollmentToken, hash_secret(token)) is None:
                s.add(models.EnrollmentToken(token_hash=hash_secret(token), instance_id=instance_id,
                                             expires_at=utcnow() + TOKEN_LIFETIME))
        return token

    async def verify_and_consume_token(self, instance_id: str, token: str) -> bool:
        def check() -> bool:
            with self.app.sessions() as s, s.begin():
                row = s.get(models.EnrollmentToken, hash_secret(token))
                if row is None or row.instance_id != instance_id or row.used_at is not None \
                        or row.expires_at < utcnow():
                    return False
                row.used_at = utcnow()
                return True
        return await asyncio.to_thread(check)

    def sign_csr(self, csr_pem: bytes, instance_id: str) -> tuple[bytes, bytes]:
        issued = self.app.ca.sign_csr(csr_pem, "instance", instance_id)
        with self.app.sessions() as s, s.begin():
            record_certificate(s, issued.cert_pem, issued.not_after)
        return issued.cert_pem, self.app.ca.cert_pem
