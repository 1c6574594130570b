"""What is attributed: tasks (context, query, response), sources (spans of the context) and the exact
character ↔ token ↔ source mapping.

- :class:`ContextTask` describes a task; ``ContextTask.tokenize(tokenizer)`` gives a :class:`TokenizedTask`
  with token ids and the token range of every source and of the target.
- Source granularities live in :data:`PARTITIONERS` (``sources.py``); a new one is a function registered with
  :func:`register_partitioner`.
- ``spans.py`` holds the token-assignment rule (a token belongs to the source it shares most characters with).
- ``prepare.py``: :func:`prepare_task` (tokenize for a model, generate a missing response, apply a target) and
  :func:`check_tasks` (refuse bad tasks before any model work), what every method and runner calls.
"""

from at2_lens._defaults import DEFAULT_MAX_NEW_TOKENS
from at2_lens.tasks.context import (
    PLAIN_TEMPLATE,
    ContextTask,
    PromptLayout,
    TargetSpan,
    TokenizedTask,
    as_target_span,
)
from at2_lens.tasks.prepare import check_tasks, prepare_task, prepare_task_unchecked
from at2_lens.tasks.sources import (
    PARTITIONERS,
    Partitioner,
    PartitionInput,
    Span,
    join_documents,
    partition,
    register_partitioner,
    split_sentences,
    validate_spans,
)
from at2_lens.tasks.spans import (
    assign_tokens,
    char_range_to_tokens,
    encode_with_offsets,
    offsets_from_ids,
    source_token_ranges,
)

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "PARTITIONERS",
    "PLAIN_TEMPLATE",
    "ContextTask",
    "PartitionInput",
    "Partitioner",
    "PromptLayout",
    "Span",
    "TargetSpan",
    "TokenizedTask",
    "as_target_span",
    "assign_tokens",
    "char_range_to_tokens",
    "check_tasks",
    "encode_with_offsets",
    "join_documents",
    "offsets_from_ids",
    "partition",
    "prepare_task",
    "prepare_task_unchecked",
    "register_partitioner",
    "source_token_ranges",
    "split_sentences",
    "validate_spans",
]
