"""Every error fastattr raises on purpose, under one base class.

``FastattrError`` is the base: ``except fastattr.FastattrError`` catches bad input, unusable run
directories, failed peers and the rest, and the CLI turns exactly these into one line and exit
status 2 (anything else is a bug and keeps its traceback). Each class also derives from the builtin
a caller would expect (``ValueError`` for bad arguments, ``RuntimeError`` for unusable state), and
input errors derive from ``AssertionError`` too, because Captum raises that for invalid inputs and
targets and code written against Captum catches it.

This module imports nothing, so every part of fastattr (the store included) can use it.
"""

from __future__ import annotations

__all__ = [
    "AttributionInputError",
    "AuditError",
    "AuditReportError",
    "CorruptShardError",
    "DiskFullError",
    "DistributedRunError",
    "FastattrError",
    "InputDtypeError",
    "NoGradientError",
    "NonFiniteError",
    "OptionError",
    "PaddingNotIgnoredError",
    "PeerFailedError",
    "RenderError",
    "RunMismatchError",
    "SourceError",
    "SpecError",
    "StoreError",
]


class FastattrError(Exception):
    """Base of every error fastattr raises on purpose (bad input, unusable state, a failed check)."""


class AttributionInputError(FastattrError, ValueError, AssertionError):
    """An argument to ``attribute`` (inputs, baselines, target, ...) is malformed.

    Also an ``AssertionError``: Captum asserts on invalid inputs, and ``except AssertionError``
    written against Captum keeps working."""


class InputDtypeError(AttributionInputError, TypeError):
    """An input has a dtype the method cannot use (integers where it interpolates); also a TypeError."""


class NonFiniteError(FastattrError, FloatingPointError):
    """A dataset run met NaN or inf in a sample's model output, attributions or residual
    (``allow_nonfinite=True`` stores such samples and counts them in ``stats/nonfinite``)."""


class OptionError(FastattrError, ValueError):
    """An option's value is invalid (a method name, n_steps, a tolerance, a CLI flag...)."""


class PaddingNotIgnoredError(AttributionInputError):
    """trim_padding=True, but the model's output changes when trailing padding is cut off."""


class NoGradientError(FastattrError, RuntimeError):
    """The selected model output does not depend on an input, so it has no gradient."""


class SourceError(FastattrError, ValueError):
    """The data cannot be used as a source (wrong type, shapes, missing file, a bad sample...)."""


class SpecError(FastattrError, ValueError):
    """A model or data spec cannot be resolved."""


class StoreError(FastattrError, RuntimeError):
    """A run directory or shard is missing, corrupted, unwritable or otherwise unusable."""


class DiskFullError(StoreError):
    """A write failed for lack of room: the disk or a quota is full, or the file-size limit
    (``ulimit -f``) was reached. Finished shards are intact; make room and rerun to resume."""


class RunMismatchError(StoreError):
    """Resuming into a directory that holds a run with a different config / model / data."""


class CorruptShardError(StoreError):
    """A finished shard fails its checks (checksum, structure, a reference outside the run)."""


class DistributedRunError(FastattrError, RuntimeError):
    """The ranks of a distributed run could not agree (a timeout, directories that differ)."""


class PeerFailedError(DistributedRunError):
    """This rank stopped because another one failed; the message names that rank and its error."""


class AuditError(FastattrError, ValueError):
    """An audit cannot run as asked (missing inputs, mismatched runs, shapes, options)."""


class AuditReportError(FastattrError, RuntimeError):
    """The report cannot be written (matplotlib missing, unwritable directory)."""


class RenderError(FastattrError, RuntimeError):
    """Rendering is impossible (matplotlib missing, nothing to draw)."""
