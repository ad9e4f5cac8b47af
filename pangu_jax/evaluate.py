"""Zero-shot evaluation: multiple-choice tasks scored by likelihood, as the PanGu-alpha paper did, and perplexity.

A task is a JSONL file, one example a line (blank lines are skipped):

    {"context": "商品评论：物流很快，东西也好。\\n这是一条", "choices": ["差评", "好评"], "label": 1}

`context` is a non-empty string, `choices` two or more non-empty strings,
`label` the index of the right choice; other keys (an id, say) are allowed
and ignored. `pangu_jax.clue` converts CLUE tasks into this form.

Each choice is scored as the continuation of its context: the context and
the choice are encoded apart and their tokens joined, so that every choice
follows the very same context tokens, and the choice's tokens alone are
scored. A choice's score is the sum of its tokens' log-likelihoods, or,
with `normalize`, that sum divided by its number of tokens ("tokens") or of
characters ("chars", which does not depend on how the tokenizer cuts it).
The prediction is the best-scoring choice. A context too long for the
model's positions loses its first tokens. The majority-class baseline
always answers the label (the choice index) most frequent in the task.

The perplexity of a text file: documents are separated by blank lines and
each is encoded alone. A document longer than the model's positions is cut
into windows of `window` tokens, each window starting on the last token of
the one before: every token but a document's first is scored exactly once,
with the tokens before it in its window as context (so context restarts
at each window). Perplexity is exp of the mean negative log-likelihood
over the scored tokens.

Sequences run in batches of `batch_size` rows, right-padded to a length
rounded up to a power of two, so that few shapes are compiled. JAX is
imported only when something is scored (and scipy when an interval is
computed), so that a script's --help stays quick.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from .atomic import write_atomically
from .config import PanguConfig
from .corpus import shopping_reviews

__all__ = [
    "NORMALIZATIONS",
    "SENTIMENT_CHOICES",
    "SENTIMENT_TEMPLATE",
    "Example",
    "Perplexity",
    "TaskResult",
    "continuation_log_likelihoods",
    "evaluate_task",
    "example_from_dict",
    "jsonl_records",
    "load_task",
    "perplexity",
    "read_documents",
    "save_task",
    "score_choices",
    "shopping_sentiment",
    "wilson_interval",
]

NORMALIZATIONS = ("none", "tokens", "chars")

SENTIMENT_TEMPLATE = "商品评论：{review}\n这是一条"
"""The context of a shopping review in `shopping_sentiment`; the choices continue it."""
SENTIMENT_CHOICES = ("差评", "好评")
"""The choices of `shopping_sentiment`, at the indices of `corpus.shopping_reviews`' labels (0 negative, 1 positive)."""

SHORTEST_BUCKET = 16

Params = dict[str, Any]


class Encoder(Protocol):
    """What scoring needs of a tokenizer (`pangu_jax.Tokenizer` is one)."""

    def encode(self, text: str) -> list[int]: ...


@dataclasses.dataclass(frozen=True)
class Example:
    """One multiple-choice question: the choices continue the context; `label` is the right one's index."""

    context: str
    choices: tuple[str, ...]
    label: int

    def to_dict(self) -> dict:
        return {"context": self.context, "choices": list(self.choices), "label": self.label}


def example_from_dict(record: object) -> Example:
    """The example a task line holds, checked; a ValueError says what is wrong."""
    if not isinstance(record, dict):
        raise ValueError(f"an example is a JSON object, got {type(record).__name__}")
    missing = [key for key in ("context", "choices", "label") if key not in record]
    if missing:
        raise ValueError(f"missing {', '.join(repr(key) for key in missing)}")
    context, choices, label = record["context"], record["choices"], record["label"]
    if not isinstance(context, str) or not context:
        raise ValueError(f"'context' must be a non-empty string, got {context!r}")
    if not isinstance(choices, list) or len(choices) < 2:
        raise ValueError(f"'choices' must be a list of at least two strings, got {choices!r}")
    if not all(isinstance(choice, str) and choice for choice in choices):
        raise ValueError(f"every choice must be a non-empty string, got {choices!r}")
    if not isinstance(label, int) or isinstance(label, bool) or not 0 <= label < len(choices):
        raise ValueError(f"'label' must be an index into the {len(choices)} choices, got {label!r}")
    return Example(context, tuple(choices), label)


def jsonl_records(path: str | os.PathLike) -> Iterator[tuple[int, object]]:
    """(line number, parsed JSON) of each non-blank line of a UTF-8 JSONL file; a line that is not JSON is a
    ValueError naming `path:line`."""
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                yield number, json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: not JSON ({e.msg} at column {e.colno})") from None


def load_task(path: str | os.PathLike) -> list[Example]:
    """The examples of a JSONL task file; a bad line is a ValueError naming `path:line`."""
    examples = []
    for number, record in jsonl_records(path):
        try:
            examples.append(example_from_dict(record))
        except ValueError as e:
            raise ValueError(f"{path}:{number}: {e}") from None
    if not examples:
        raise ValueError(f"{path}: no examples (one JSON object a line)")
    return examples


def save_task(path: str | os.PathLike, examples: Iterable[Example]) -> None:
    """Write examples as a JSONL task file (UTF-8, written whole or not at all)."""
    text = "".join(json.dumps(example.to_dict(), ensure_ascii=False) + "\n" for example in examples)
    write_atomically(path, text.encode("utf-8"))


def shopping_sentiment(size: int = 1000, seed: int = 0, directory: str | os.PathLike | None = None, *,
                       download: bool = True) -> list[Example]:
    """Zero-shot sentiment of the labelled shopping reviews (`corpus.shopping_reviews`) as a two-choice task.

    A fixed sample of `size` reviews (the first `size` of a permutation
    drawn with `seed`, so a smaller sample is part of a larger one), each
    put into `SENTIMENT_TEMPLATE` with the choices `SENTIMENT_CHOICES`.
    """
    reviews = shopping_reviews(directory, download=download)
    if not 1 <= size <= len(reviews):
        raise ValueError(f"shopping_sentiment: size must be 1 .. {len(reviews)} (the reviews there are), got {size}")
    chosen = np.random.default_rng(seed).permutation(len(reviews))[:size]
    return [Example(SENTIMENT_TEMPLATE.format(review=reviews[i][0]), SENTIMENT_CHOICES, reviews[i][1])
            for i in chosen]


def continuation_log_likelihoods(
    config: PanguConfig, params: Params, sequences: Sequence[Sequence[int]], starts: Sequence[int], *,
    batch_size: int = 8, progress: bool = False, description: str | None = None,
) -> np.ndarray:
    """For each sequence, the summed log-likelihood of its tokens from index `start` (>= 1) to its end.

    Each token is scored given all those before it in its sequence
    (`inspect.token_log_probs`). Sequences run longest first in batches of
    `batch_size` rows, right-padded to a power-of-two length; `progress`
    shows a bar (on stderr) labelled `description`.
    """
    from .inspect import token_log_probs

    lengths = np.array([len(sequence) for sequence in sequences])
    if len(starts) != len(sequences):
        raise ValueError(f"{len(sequences)} sequences but {len(starts)} starts")
    for sequence, start in zip(sequences, starts):
        if not 1 <= start < len(sequence) or len(sequence) > config.max_positions:
            raise ValueError(f"a sequence of {len(sequence)} tokens cannot be scored from token {start} by a model "
                             f"of {config.max_positions} positions")
    totals = np.zeros(len(sequences))
    rows = max(1, min(batch_size, len(sequences)))
    order = np.argsort(-lengths, kind="stable")
    with tqdm(total=len(sequences), desc=description, disable=not progress, unit="seq") as bar:
        for first in range(0, len(order), rows):
            batch = order[first:first + rows]
            length = min(max(SHORTEST_BUCKET, 1 << int(lengths[batch[0]] - 1).bit_length()), config.max_positions)
            tokens = np.zeros((rows, length), np.int32)
            scored = np.zeros((rows, length - 1), bool)  # scored[r, t]: token t + 1 of row r counts
            for row, i in enumerate(batch):
                tokens[row, :lengths[i]] = sequences[i]
                scored[row, starts[i] - 1:lengths[i] - 1] = True
            log_probs = np.asarray(token_log_probs(config, params, tokens), np.float64)
            totals[batch] = np.where(scored, log_probs, 0).sum(axis=1)[:len(batch)]
            bar.update(len(batch))
    return totals


def score_choices(
    config: PanguConfig, params: Params, tokenizer: Encoder, examples: Sequence[Example], *,
    normalize: str = "none", batch_size: int = 8, progress: bool = False,
) -> list[np.ndarray]:
    """Each example's choice scores (float64 [choices]): summed log-likelihood, normalised as `normalize` says."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {normalize!r}")
    sequences, starts, sizes = [], [], []
    for example in examples:
        context = tokenizer.encode(example.context)
        if not context:
            raise ValueError(f"context {example.context!r} encodes to no tokens")
        for choice in example.choices:
            ids = tokenizer.encode(choice)
            if not 1 <= len(ids) < config.max_positions:
                raise ValueError(f"choice {choice!r} is {len(ids)} tokens; a choice takes 1 .. "
                                 f"{config.max_positions - 1} (the model's positions, less one of context)")
            sequence = context[-(config.max_positions - len(ids)):] + ids
            sequences.append(sequence)
            starts.append(len(sequence) - len(ids))
            sizes.append({"none": 1, "tokens": len(ids), "chars": len(choice)}[normalize])
    totals = continuation_log_likelihoods(config, params, sequences, starts, batch_size=batch_size,
                                          progress=progress, description="choices") / np.array(sizes)
    bounds = np.cumsum([len(example.choices) for example in examples])[:-1]
    return np.split(totals, bounds)


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """The Wilson score interval of a proportion (scipy's, without continuity correction)."""
    from scipy.stats import binomtest

    interval = binomtest(successes, trials).proportion_ci(confidence_level=confidence, method="wilson")
    return float(interval.low), float(interval.high)


@dataclasses.dataclass(frozen=True)
class TaskResult:
    """A multiple-choice task's outcome.

    `scores` holds each example's choice scores, `predictions` the best
    choice of each; `interval` is the accuracy's Wilson 95% interval;
    `majority_label` the most frequent label (the lowest on a tie) and
    `majority_accuracy` the accuracy of always answering it.
    """

    normalize: str
    scores: list[np.ndarray]
    predictions: np.ndarray
    labels: np.ndarray
    accuracy: float
    interval: tuple[float, float]
    majority_label: int
    majority_accuracy: float

    @property
    def correct(self) -> int:
        return int((self.predictions == self.labels).sum())

    def summary(self) -> str:
        """Two lines: the accuracy with its interval, and the majority-class baseline."""
        low, high = self.interval
        return (f"accuracy {self.accuracy:.1%} ({self.correct}/{len(self.labels)}; 95% Wilson interval "
                f"{low:.1%} .. {high:.1%}), scores normalised by {self.normalize}\n"
                f"majority class {self.majority_accuracy:.1%} (always choice {self.majority_label})")


def evaluate_task(
    config: PanguConfig, params: Params, tokenizer: Encoder, examples: Sequence[Example], *,
    normalize: str = "none", batch_size: int = 8, progress: bool = False,
) -> TaskResult:
    """Score every example's choices (`score_choices`) and measure the accuracy beside the majority baseline."""
    if not examples:
        raise ValueError("evaluate_task: no examples")
    scores = score_choices(config, params, tokenizer, examples, normalize=normalize, batch_size=batch_size,
                           progress=progress)
    predictions = np.array([int(np.argmax(choice_scores)) for choice_scores in scores])
    labels = np.array([example.label for example in examples])
    counts = np.bincount(labels)
    correct = int((predictions == labels).sum())
    return TaskResult(normalize, scores, predictions, labels, correct / len(labels),
                      wilson_interval(correct, len(labels)), int(counts.argmax()), float(counts.max() / len(labels)))


def read_documents(path: str | os.PathLike) -> list[str]:
    """The documents of a file as fine-tuning reads them (`train.documents`): plain text separated by blank
    lines, or JSONL records (a supervised record's prompt and response as one text). A bad JSONL line is an
    error naming it."""
    from .train.documents import detect_format
    from .train.documents import read_documents as read_records

    records, bad = read_records(path, detect_format(path))
    if bad:
        raise ValueError(f"{bad[0]} ({len(bad)} bad line{'s' if len(bad) > 1 else ''} in all)")
    return [record.text if record.prompt is None else f"{record.prompt}\n{record.text}" for record in records]


@dataclasses.dataclass(frozen=True)
class Perplexity:
    """exp(`loss`), where `loss` is the mean negative log-likelihood (nats) of the `tokens` scored."""

    perplexity: float
    loss: float
    tokens: int
    documents: int
    windows: int

    def summary(self) -> str:
        """One line: the perplexity, the mean loss, and what was scored."""
        return (f"perplexity {self.perplexity:.4g} (mean loss {self.loss:.4f} nats over {self.tokens} tokens; "
                f"{self.documents} documents in {self.windows} windows)")


def perplexity(
    config: PanguConfig, params: Params, tokenizer: Encoder, documents: Sequence[str], *,
    window: int | None = None, batch_size: int = 8, progress: bool = False,
) -> Perplexity:
    """The perplexity of `documents`, each encoded alone and cut into windows (module docstring)."""
    window = config.max_positions if window is None else window
    if not 2 <= window <= config.max_positions:
        raise ValueError(f"window must be 2 .. {config.max_positions} tokens, got {window}")
    windows = []
    for document in documents:
        ids = tokenizer.encode(document)
        windows.extend(ids[start:start + window] for start in range(0, max(len(ids) - 1, 0), window - 1))
    scored = sum(len(ids) - 1 for ids in windows)
    if not scored:
        raise ValueError("no token to score: every document is a single token or none")
    total = continuation_log_likelihoods(config, params, windows, [1] * len(windows), batch_size=batch_size,
                                         progress=progress, description="windows").sum()
    loss = -total / scored
    return Perplexity(float(np.exp(loss)), float(loss), scored, len(documents), len(windows))
