"""CLUE tasks in their published formats, as multiple-choice examples (`pangu_jax.evaluate`'s task format).

TNEWS (news headline classification, 15 classes): one JSON object a line,
``{"label": "102", "label_desc": "news_entertainment", "sentence": ..., "keywords": ...}``.
Each headline becomes ``新闻：{sentence}\\n这条新闻的类别是`` with the 15
categories' Chinese names as choices (`TNEWS_CATEGORIES`).

C3 (reading comprehension with choices): one JSON array per file, each item
``[[paragraph, ...], [{"question": ..., "choice": [...], "answer": ...}, ...], id]``.
Each question becomes ``{paragraphs joined by newlines}\\n问：{question}\\n答：``
with its own choices; the label is the answer's index among them.

CLUE's test files carry no labels, so they cannot be converted.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

from .evaluate import Example, example_from_dict, jsonl_records

__all__ = ["CLUE_TASKS", "TNEWS_CATEGORIES", "c3_examples", "tnews_examples"]

TNEWS_CATEGORIES = {
    "100": "故事", "101": "文化", "102": "娱乐", "103": "体育", "104": "财经", "106": "房产", "107": "汽车",
    "108": "教育", "109": "科技", "110": "军事", "112": "旅游", "113": "国际", "114": "股票", "115": "农业",
    "116": "电竞",
}
"""TNEWS label -> the Chinese name its choice is (the published labels skip 105 and 111)."""


def tnews_examples(path: str | os.PathLike) -> list[Example]:
    """The examples of a TNEWS file (train.json or dev.json); a bad line is a ValueError naming `path:line`."""
    choices = tuple(TNEWS_CATEGORIES.values())
    labels = list(TNEWS_CATEGORIES)
    examples = []
    for number, record in jsonl_records(path):
        if not isinstance(record, dict) or not isinstance(record.get("sentence"), str):
            raise ValueError(f"{path}:{number}: not a TNEWS record (an object with a 'sentence')")
        label = record.get("label")
        if label not in TNEWS_CATEGORIES:
            raise ValueError(f"{path}:{number}: label {label!r} is none of TNEWS's {', '.join(labels)} "
                             "(test files carry no labels)")
        examples.append(Example(f"新闻：{record['sentence']}\n这条新闻的类别是", choices, labels.index(label)))
    return examples


def c3_examples(path: str | os.PathLike) -> list[Example]:
    """The examples of a C3 file (d-train.json, m-dev.json, ...): one per question; errors name the item."""
    try:
        items = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(items, list):
        raise ValueError(f"{path}: a C3 file holds a JSON array of [paragraphs, questions, id]")
    examples = []
    for index, item in enumerate(items):
        where = f"{path}: item {index}"
        if not (isinstance(item, list) and len(item) == 3 and isinstance(item[0], list) and isinstance(item[1], list)):
            raise ValueError(f"{where}: not a C3 item [paragraphs, questions, id]")
        paragraphs, questions, _ = item
        for question in questions:
            if not isinstance(question, dict) or not {"question", "choice"} <= question.keys():
                raise ValueError(f"{where}: a question is not an object with 'question' and 'choice'")
            try:
                if question.get("answer") not in question["choice"]:
                    raise ValueError(f"answer {question.get('answer')!r} is none of the choices "
                                     f"{question['choice']!r} (test files carry no answers)")
                examples.append(example_from_dict({
                    "context": "\n".join(paragraphs) + f"\n问：{question['question']}\n答：",
                    "choices": question["choice"], "label": question["choice"].index(question["answer"])}))
            except (TypeError, ValueError) as e:
                raise ValueError(f"{where}: {e}") from None
    return examples


CLUE_TASKS: dict[str, Callable[[str | os.PathLike], list[Example]]] = {"c3": c3_examples, "tnews": tnews_examples}
"""Name -> converter of the CLUE tasks `infer/evaluate.py convert-clue` knows."""
