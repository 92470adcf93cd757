"""Sealing the initial users' passwords of a create request while they wait for its prepare step: the state
DB never holds a tenant's password in clear, not even for the seconds before the guest receives it."""
from __future__ import annotations

import base64
import hashlib
import hmac

from cryptography.fernet import Fernet

PREFIX = "sealed:"


class PasswordSealer:
    """Fernet under a key derived from the server secret, so every server sharing the secret unseals."""

    def __init__(self, secret: bytes) -> None:
        key = hmac.new(secret, b"create-params", hashlib.sha256).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(key))

    def seal(self, password: str) -> str:
        return PREFIX + self._fernet.encrypt(password.encode()).decode()

    def unseal(self, value: str) -> str:
        return self._fernet.decrypt(value.removeprefix(PREFIX).encode()).decode()
