"""Classified failures of Captum's tests with fastattr substituted (read by captum_suite.py).

Each entry: (regular expression matched against the pytest node id, category, one-line reason).
"captum-internals": the test inspects Captum's internals (private attributes, Captum base classes,
call counts of Captum functions), so no drop-in can pass it. "fastattr-gap": fastattr lacks
something the test uses. A pattern that no longer matches a failure is reported as stale.
"""

from __future__ import annotations

KNOWN: list[tuple[str, str, str]] = []
