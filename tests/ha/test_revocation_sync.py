"""Each server signs the CRL of its own CA directory; a revocation recorded by another server (in the shared
state DB) reaches this server's CRL through RevocationSync, and so every host's CRL whichever server
pushes it."""
from __future__ import annotations

import datetime as dt
from pathlib import Path

from reddwarf.common.clock import now
from reddwarf.common.pki import CertificateAuthority, identity_from_cert, revoked_in_crl
from reddwarf.server import db, models
from reddwarf.server.cluster import RevocationSync


def test_a_revocation_recorded_by_another_server_enters_this_servers_crl(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path}/state.db"
    db.upgrade(url)
    sessions = db.session_factory(db.make_engine(url))
    ca = CertificateAuthority.init(tmp_path / "pki")
    files = ca.write_identity(tmp_path / "guest", "guest", "instance", "i-1")
    serial = identity_from_cert(files.cert.read_bytes()).serial
    kept = identity_from_cert(ca.write_identity(tmp_path / "other", "o", "instance", "i-2").cert.read_bytes()).serial
    with sessions() as s, s.begin():
        for sn, revoked in ((serial, now()), (kept, None)):
            s.add(models.Certificate(serial=format(sn, "x"), identity=f"spiffe://reddwarf/instance/{sn}",
                                     role="instance", subject_id=str(sn), not_after=now() + dt.timedelta(days=1),
                                     revoked_at=revoked))
    sync = RevocationSync(sessions, ca)
    assert serial not in revoked_in_crl(ca.crl_pem(), ca.cert_pem)
    assert sync.sync_once() == 1
    crl = revoked_in_crl(ca.crl_pem(), ca.cert_pem)
    assert serial in crl and kept not in crl
    assert sync.sync_once() == 0  # nothing new: the CRL is not re-signed again
