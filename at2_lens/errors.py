"""Exceptions raised by at2_lens.

Every error a user can trigger with bad input is one of these, raised before expensive work, with a message that
names the argument and what was expected.
"""

from __future__ import annotations


class At2LensError(Exception):
    """Base class of every error raised by at2_lens."""


class InputError(At2LensError, ValueError):
    """An argument has the wrong value, shape or type; the message names the argument."""


class ModelNotSupportedError(At2LensError, TypeError):
    """The model is not a supported TransformerLens class, or its attention cannot be intervened on."""


class ModelLoadError(At2LensError, RuntimeError):
    """An embedded or local model could not be loaded (missing package, wrong checksum, bad directory)."""


class EstimatorFileError(At2LensError, ValueError):
    """An estimator file is missing, corrupted, unsafe, or was written for a different model."""


class StoreError(At2LensError, RuntimeError):
    """The on-disk ablation store is inconsistent or was written with different settings."""


class NumericalError(At2LensError, FloatingPointError):
    """NaN or inf appeared in attention, features, outputs or scores (e.g. every key of an attention row masked);
    at2_lens raises this instead of returning non-finite scores."""


class DatasetNotFoundError(At2LensError, FileNotFoundError):
    """A local data file (e.g. SST-2 train outside a checkout) is missing; the message says where it was looked for."""


class HubDatasetError(DatasetNotFoundError):
    """A Hugging Face ``datasets`` name could not be loaded (``datasets`` not installed, offline, no network, or a hub
    error); the message names the local alternative and, when ``datasets`` is missing, the pip extra."""


class ResultFileError(At2LensError, ValueError):
    """A saved result file is missing, corrupted, unsafe, of another kind, or of a format version this at2_lens does
    not read."""


class OptionalDependencyError(At2LensError, ImportError):
    """A feature needs a package from one of at2_lens's extras that is not installed; the message names the feature,
    the package and the ``pip install 'at2_lens[extra]'`` command."""
