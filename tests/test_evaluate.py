"""The evaluation harness: tasks, multiple-choice scoring, perplexity, the CLUE converters and infer/evaluate.py."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from pangu_jax import forward
from pangu_jax.clue import TNEWS_CATEGORIES, c3_examples, tnews_examples
from pangu_jax.evaluate import (
    SENTIMENT_CHOICES,
    SENTIMENT_TEMPLATE,
    Example,
    evaluate_task,
    load_task,
    perplexity,
    read_documents,
    save_task,
    score_choices,
    shopping_sentiment,
    wilson_interval,
)
from tests.conftest import ScriptRunner, assert_one_error_line

WORDS = "the film was good bad dull fine food tasted so very and then".split()


class Words:
    """Space-separated words as ids 10, 11, ...: a tokenizer whose cuts a test can see."""

    def encode(self, text: str) -> list[int]:
        return [10 + WORDS.index(word) for word in text.split()]


GOOD = Words().encode("good")[0]


@pytest.fixture(scope="module")
def forced(tiny_fp32):
    """The tiny model made to predict "good" after anything: its top layer adds a large vector that is
    also the head's row of "good" (logit about 100 against a few for every other token)."""
    config, params = tiny_fp32
    direction = np.random.default_rng(0).normal(size=config.hidden_size)
    direction *= 10 / np.linalg.norm(direction)
    top = params["top_query_layer"]
    params = {**params, "word_embedding": params["word_embedding"].at[GOOD].set(direction),
              "top_query_layer": {**top, "mlp": {**top["mlp"], "down_bias": jnp.asarray(direction, jnp.float32)}}}
    return config, params


def _log_probs(config, params, ids) -> np.ndarray:
    """log p(ids[t] | ids[:t]) for t >= 1 from one plain forward pass, in NumPy."""
    logits = np.asarray(forward(config, params, jnp.asarray([ids]))[0][0], np.float64)[:-1]
    logits -= logits.max(-1, keepdims=True)
    logits -= np.log(np.exp(logits).sum(-1, keepdims=True))
    return logits[np.arange(len(ids) - 1), ids[1:]]


def test_the_forced_answer_scores_every_question(forced):
    config, params = forced
    examples = [Example("the film was", ("good", "bad"), 0), Example("the food tasted so", ("dull", "good"), 1),
                Example("then", ("bad", "fine", "good", "dull"), 2)]
    for normalize in ("none", "tokens", "chars"):
        result = evaluate_task(config, params, Words(), examples, normalize=normalize, batch_size=2)
        assert result.accuracy == 1 and result.correct == 3
        assert list(result.predictions) == [0, 1, 2]
        low, high = result.interval
        assert 0.3 < low < 1 and high == pytest.approx(1)


def test_scores_are_the_choice_tokens_log_likelihoods_normalised_as_asked(tiny_fp32):
    config, params = tiny_fp32
    example = Example("the film was very", ("good", "bad and dull", "so so fine"), 1)
    tokens = Words()
    context = tokens.encode(example.context)
    sums = []
    for choice in example.choices:
        ids = tokens.encode(choice)
        sums.append(_log_probs(config, params, context + ids)[-len(ids):].sum())
    counts = {"none": [1, 1, 1], "tokens": [1, 3, 3], "chars": [4, 12, 10]}
    for normalize, sizes in counts.items():
        (scores,) = score_choices(config, params, tokens, [example], normalize=normalize)
        np.testing.assert_allclose(scores, np.array(sums) / sizes, rtol=1e-5)


def test_length_normalisation_can_change_the_answer(forced):
    """One unlikely token against two unlikely ones followed by many forced ones: the sum prefers the
    shorter choice, the mean per token or character the longer."""
    config, params = forced
    example = Example("the film was", ("bad", "dull so good good good good good good"), 0)
    outcomes = {normalize: evaluate_task(config, params, Words(), [example], normalize=normalize)
                for normalize in ("none", "tokens", "chars")}
    assert outcomes["none"].predictions[0] == 0
    assert outcomes["tokens"].predictions[0] == 1 and outcomes["chars"].predictions[0] == 1
    first, second = outcomes["none"].scores[0]
    assert second < first < -20  # the forced tokens cost next to nothing


@pytest.mark.slow
def test_batching_and_padding_change_no_score(tiny_fp32):
    config, params = tiny_fp32
    examples = [Example("the film " * n + "was", ("good", "bad very dull", "fine"), 0) for n in range(1, 8)]
    alone = score_choices(config, params, Words(), examples, batch_size=1)
    batched = score_choices(config, params, Words(), examples, batch_size=4)
    np.testing.assert_allclose(np.concatenate(batched), np.concatenate(alone), rtol=1e-5)


def test_a_long_context_loses_its_first_tokens(tiny_fp32):
    config, params = tiny_fp32
    example = Example("the " * (config.max_positions + 20) + "film was", ("good", "bad dull"), 0)
    (scores,) = score_choices(config, params, Words(), [example])
    ids = Words().encode("bad dull")
    kept = Words().encode(example.context)[-(config.max_positions - len(ids)):]
    np.testing.assert_allclose(scores[1], _log_probs(config, params, kept + ids)[-2:].sum(), rtol=1e-5)


def test_accuracy_interval_and_majority_baseline(tiny_fp32):
    config, params = tiny_fp32
    examples = [Example("the film was", ("good", "bad"), label) for label in (1, 1, 1, 0)]
    result = evaluate_task(config, params, Words(), examples)
    assert len(set(result.predictions)) == 1  # the same question every time
    assert result.accuracy in (0.25, 0.75)
    assert result.majority_label == 1 and result.majority_accuracy == 0.75
    assert result.interval == wilson_interval(result.correct, 4)
    assert "majority class 75.0% (always choice 1)" in result.summary()


def test_wilson_interval():
    z = 1.959963984540054
    n, p = 50, 0.7
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    np.testing.assert_allclose(wilson_interval(35, 50), (centre - half, centre + half), rtol=1e-9)
    low, high = wilson_interval(0, 20)
    assert low == 0 and 0.1 < high < 0.2


# --- perplexity -------------------------------------------------------------------


def test_perplexity_is_exp_of_the_mean_token_loss(tiny_fp32):
    config, params = tiny_fp32
    documents = ["the film was good", "then the food tasted so very fine and the film was dull", "so"]
    losses = np.concatenate([-_log_probs(config, params, Words().encode(d)) for d in documents[:2]])
    found = perplexity(config, params, Words(), documents, batch_size=2)
    assert (found.tokens, found.documents, found.windows) == (3 + 11, 3, 2)
    np.testing.assert_allclose(found.loss, losses.mean(), rtol=1e-6)
    np.testing.assert_allclose(found.perplexity, np.exp(losses.mean()), rtol=1e-6)


def test_a_long_document_is_scored_in_windows_each_token_once(tiny_fp32):
    config, params = tiny_fp32
    document = "then the food tasted so very fine and the film was dull"
    ids = Words().encode(document)  # 12 tokens
    # windows of 5 starting every 4 tokens: [0:5], [4:9], [8:12]; each scores all but its first token
    losses = np.concatenate([-_log_probs(config, params, ids[start:start + 5]) for start in (0, 4, 8)])
    assert len(losses) == 11
    found = perplexity(config, params, Words(), [document], window=5)
    assert (found.tokens, found.windows) == (11, 3)
    np.testing.assert_allclose(found.perplexity, np.exp(losses.mean()), rtol=1e-6)


def test_perplexity_refuses_what_it_cannot_score(tiny_fp32):
    config, params = tiny_fp32
    with pytest.raises(ValueError, match="no token to score"):
        perplexity(config, params, Words(), ["good", "bad"])
    with pytest.raises(ValueError, match="window must be 2 .. 128"):
        perplexity(config, params, Words(), ["the film"], window=1)


def test_documents_are_separated_by_blank_lines(tmp_path):
    path = tmp_path / "text.txt"
    path.write_text("\n第一篇，第一行\n第一篇，第二行\n\n \t\n第二篇\n\n\n\n第三篇\n", encoding="utf-8")
    assert read_documents(path) == ["第一篇，第一行\n第一篇，第二行", "第二篇", "第三篇"]


# --- task files --------------------------------------------------------------------


def test_a_task_file_round_trips(tmp_path):
    examples = [Example("商品评论：好。\n这是一条", ("差评", "好评"), 1), Example("问：", ("甲", "乙", "丙"), 2)]
    path = tmp_path / "task.jsonl"
    save_task(path, examples)
    assert "好评" in path.read_text(encoding="utf-8")  # UTF-8, not escapes
    assert load_task(path) == examples


@pytest.mark.parametrize("line, message", [
    ('{"context": "a", "choices": ["b", "c"], "label": 2', "not JSON"),
    ('["a", ["b", "c"], 0]', "an example is a JSON object"),
    ('{"context": "a", "choices": ["b", "c"]}', "missing 'label'"),
    ('{"context": "", "choices": ["b", "c"], "label": 0}', "'context' must be a non-empty string"),
    ('{"context": "a", "choices": ["b"], "label": 0}', "'choices' must be a list of at least two strings"),
    ('{"context": "a", "choices": ["b", ""], "label": 0}', "every choice must be a non-empty string"),
    ('{"context": "a", "choices": ["b", "c"], "label": 2}', "'label' must be an index into the 2 choices"),
    ('{"context": "a", "choices": ["b", "c"], "label": true}', "'label' must be an index"),
])
def test_a_bad_task_line_is_named_by_file_and_line(tmp_path, line, message):
    path = tmp_path / "task.jsonl"
    path.write_text('{"context": "a", "choices": ["b", "c"], "label": 0, "id": 7}\n\n' + line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=f"task.jsonl:3: {message}"):
        load_task(path)


def test_an_empty_task_is_refused(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no examples"):
        load_task(tmp_path / "empty.jsonl")


# --- CLUE -------------------------------------------------------------------------

TNEWS = [
    {"label": "102", "label_desc": "news_entertainment", "sentence": "江疏影甜甜圈自拍，迷之角度竟这么好看", "keywords": "江疏影"},
    {"label": "110", "label_desc": "news_military", "sentence": "以色列大规模空袭开始", "keywords": ""},
]
C3 = [
    [["男：你今天晚上有时间吗?", "女：有啊，怎么了?"],
     [{"question": "男的想做什么?", "choice": ["看电影", "吃饭", "回家"], "answer": "吃饭"}], "m32-1"],
    [["北京是中国的首都。"],
     [{"question": "中国的首都是哪里?", "choice": ["上海", "北京"], "answer": "北京"},
      {"question": "这段话讲的是什么?", "choice": ["首都", "天气"], "answer": "首都"}], "d1-2"],
]


def test_tnews_becomes_a_fifteen_way_choice_of_categories(tmp_path):
    path = tmp_path / "dev.json"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in TNEWS), encoding="utf-8")
    examples = tnews_examples(path)
    assert len(examples) == 2 and all(len(e.choices) == 15 for e in examples)
    assert examples[0].context == "新闻：江疏影甜甜圈自拍，迷之角度竟这么好看\n这条新闻的类别是"
    assert [e.choices[e.label] for e in examples] == ["娱乐", "军事"]
    assert examples[0].choices == tuple(TNEWS_CATEGORIES.values())


def test_c3_becomes_one_example_per_question(tmp_path):
    path = tmp_path / "m-dev.json"
    path.write_text(json.dumps(C3, ensure_ascii=False), encoding="utf-8")
    examples = c3_examples(path)
    assert examples[0] == Example("男：你今天晚上有时间吗?\n女：有啊，怎么了?\n问：男的想做什么?\n答：",
                                  ("看电影", "吃饭", "回家"), 1)
    assert [e.choices[e.label] for e in examples] == ["吃饭", "北京", "首都"]


@pytest.mark.parametrize("task, content, message", [
    ("tnews", '{"sentence": "无标签"}\n', r"dev.json:1: label None is none of TNEWS's 100, .* carry no labels"),
    ("tnews", '{"label": "102"}\n', "dev.json:1: not a TNEWS record"),
    ("tnews", "{\n", "dev.json:1: not JSON"),
    ("c3", '[[["文"], [{"question": "问", "choice": ["a", "b"]}], "x"]]', r"dev.json: item 0: answer None .* no answers"),
    ("c3", '[[["文"], [{"question": "问", "choice": ["a"], "answer": "a"}], "x"]]', "item 0: 'choices' must be"),
    ("c3", '[["文", "x"]]', "item 0: not a C3 item"),
    ("c3", '{"a": 1}', "holds a JSON array"),
])
def test_clue_files_that_cannot_be_converted(tmp_path, task, content, message):
    path = tmp_path / "dev.json"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=message):
        {"tnews": tnews_examples, "c3": c3_examples}[task](path)


# --- the offline task and the script ----------------------------------------------


def test_shopping_sentiment_is_a_fixed_sample_of_the_reviews(shopping_reviews):
    examples = shopping_sentiment(200)
    assert examples == shopping_sentiment(200) and examples[:50] == shopping_sentiment(50)
    assert shopping_sentiment(50, seed=1) != examples[:50]
    by_context = {SENTIMENT_TEMPLATE.format(review=review): label for review, label in shopping_reviews}
    assert all(by_context[e.context] == e.label and e.choices == SENTIMENT_CHOICES for e in examples)
    assert 0.3 < np.mean([e.label for e in examples]) < 0.7
    with pytest.raises(ValueError, match="size must be 1 .. 35123"):
        shopping_sentiment(0)


@pytest.fixture(scope="module")
def script():
    return ScriptRunner("infer/evaluate.py")


@pytest.fixture
def base(vocab_path):
    return ["--vocab", str(vocab_path), "--no-compilation-cache", "--no-progress"]


@pytest.mark.slow
def test_the_script_scores_the_shopping_reviews(script, base, shopping_reviews, capsys):
    assert script(["--task", "shopping-sentiment", "--limit", "12", *base]) == 0
    out, err = capsys.readouterr()
    assert "TINY RANDOM" in err
    lines = out.splitlines()
    assert lines[0] == "shopping-sentiment: 12 examples, 2 choices each"
    assert lines[1].startswith("accuracy ") and "95% Wilson interval" in lines[1]
    assert lines[2].startswith("majority class ")


def test_the_script_scores_a_task_file_and_a_text(script, base, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    save_task(task, [Example("四川的省会是", ("成都", "重庆", "拉萨"), 0), Example("一加一等于", ("二", "三"), 0),
                     Example("天空是", ("蓝色的", "绿色的"), 0)])
    assert script(["--task", str(task), "--limit", "2", "--normalize", "chars", *base]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{task}: 2 examples, 2 to 3 choices each\naccuracy ") and "normalised by chars" in out
    text = tmp_path / "text.txt"
    text.write_text("四川的省会是成都。\n\n天空是蓝色的。", encoding="utf-8")
    assert script(["--text", str(text), "--window", "4", *base]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"{text}: perplexity ") and "2 documents in" in out


def test_the_script_converts_a_clue_file(script, tmp_path, capsys):
    source, destination = tmp_path / "d-dev.json", tmp_path / "c3.jsonl"
    source.write_text(json.dumps(C3, ensure_ascii=False), encoding="utf-8")
    assert script(["convert-clue", "c3", str(source), str(destination)]) == 0
    assert capsys.readouterr().out == f"wrote 3 c3 examples to {destination}\n"
    assert load_task(destination) == c3_examples(source)
    assert script(["convert-clue", "c3", str(source), str(destination)]) == 1
    assert_one_error_line(capsys.readouterr().err, "c3.jsonl exists; pass --overwrite")
    assert script(["convert-clue", "c3", str(source), str(destination), "--overwrite"]) == 0


def test_a_bad_task_line_ends_the_script_with_one_error_line(script, base, tmp_path, capsys):
    task = tmp_path / "task.jsonl"
    task.write_text('{"context": "a", "choices": ["b", "c"], "label": 0}\n{"context": "a"}\n', encoding="utf-8")
    assert script(["--task", str(task), *base]) == 1
    assert_one_error_line(capsys.readouterr().err, "task.jsonl:2: missing 'choices', 'label'")
    assert script(["--task", str(tmp_path / "missing.jsonl"), *base]) == 1
    assert_one_error_line(capsys.readouterr().err, "missing.jsonl")


def test_help_is_quick(script):
    done = script.subprocess(["--help"], env={"PYTHONPROFILEIMPORTTIME": "1", "PYTHONPATH": str(script.path.parents[1])})
    assert done.returncode == 0, done.stderr
    imported = {line.split("|")[-1].strip() for line in done.stderr.splitlines() if line.startswith("import time:")}
    assert "jax" not in imported and "pangu_jax.evaluate" in imported
    assert "shopping-sentiment" in done.stdout and "--normalize" in done.stdout
