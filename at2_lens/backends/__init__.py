"""The backend layer: one ``Backend`` subclass per TransformerLens model class, chosen once per model.

``get_backend(model)`` (or ``Backend(model)``) returns a ``HookedTransformerBackend``, ``HookedEncoderBackend`` or
``BridgeBackend``; the rest of at2_lens talks to that object and never asks which class the model is. Hook names
are spelled in ``hook_names``. A new model class goes here: a ``Backend`` subclass overriding what differs
(``model_class``, ``final_hidden_hook``, how masks are passed, generation), listed in ``backend._backend_classes``;
the probe then decides which interventions work on it.
"""

from at2_lens.backends import hook_names
from at2_lens.backends.backend import (
    ACCESS_MODES,
    AccessMode,
    Backend,
    ModelFacts,
    ModelKind,
    backend_class,
    get_backend,
    model_kind,
)
from at2_lens.backends.bridge import BridgeBackend
from at2_lens.backends.hooked import HookedEncoderBackend, HookedTransformerBackend
from at2_lens.backends.probe import AttentionProbe, probe_attention

__all__ = [
    "ACCESS_MODES",
    "AccessMode",
    "AttentionProbe",
    "Backend",
    "BridgeBackend",
    "HookedEncoderBackend",
    "HookedTransformerBackend",
    "ModelFacts",
    "ModelKind",
    "backend_class",
    "get_backend",
    "hook_names",
    "model_kind",
    "probe_attention",
]
