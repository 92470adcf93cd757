"""schemathesis's `st` command, run with a deeper recursion limit: its coverage phase recurses per level of
a request body's schema, and on CPython 3.11.7 a RecursionError inside `ast` (Hypothesis describing a
strategy's lambdas) surfaces as "SystemError: AST constructor recursion depth mismatch" — a flaky
"Runtime Error" for the deepest bodies, not a finding about the API."""
from __future__ import annotations

import sys

ST = [sys.executable, "-c", "import sys; sys.setrecursionlimit(20000); sys.argv[0] = 'st'; "
      "from schemathesis.cli import schemathesis; sys.exit(schemathesis())"]
