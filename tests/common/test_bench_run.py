"""`make bench` rewrites docs/BENCHMARKS.md section by section: what a session wrote by hand under a section's
NOTES_MARK (a profile, why a target is missed, an earlier run) survives a re-run of that section."""
from __future__ import annotations

from pathlib import Path

from bench import run

DOC = f"""# Red Dwarf benchmarks

Produced by `make bench`.

## Provisioning: create → ACTIVE

| measure | p50 |
|---|---|
| floor | 1.0 s |

Command: `.venv/bin/python -m bench.provision_bench` (run by `make bench`), 2026-11-25 10:23 UTC.

{run.NOTES_MARK}

### What a profile showed

hostd's lock; see `python -m bench.hostd_bench` for the container part.

## REST gateway overhead

Command: `.venv/bin/python -m bench.gateway_bench --seconds 5` (run by `make bench`), 2026-11-26 20:53 UTC.
"""


def test_sections_are_found_by_their_command_and_keep_their_hand_written_notes(tmp_path: Path) -> None:
    path = tmp_path / "BENCHMARKS.md"
    path.write_text(DOC)
    sections = run.existing_sections(str(path))
    # The notes name another bench, but a section is keyed by the command of its generated part.
    assert set(sections) == {"provision_bench", "gateway_bench"}
    notes = run.notes_of(sections["provision_bench"])
    assert notes.lstrip().startswith(run.NOTES_MARK)
    assert "### What a profile showed" in notes and "hostd's lock" in notes
    assert "| floor |" not in notes  # the generated table is not a note: a re-run replaces it
    assert run.notes_of(sections["gateway_bench"]) == ""
