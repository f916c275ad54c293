"""Token classification: sub-token alignment on several tokenizers, windows of long sentences, entity offsets,
seqeval and plain-tag metrics counted by hand, the baseline, the CLI end to end, and bad input."""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import datasets
import numpy as np
import pytest
import torch

from conftest import FILLER, bound_task
from finetune.cli import main
from finetune.errors import ConfigError, DataError
from finetune.recipes import RECIPES_DIR, load_config
from finetune.tasks import TASKS
from finetune.tasks.token_classification import (TokenClassificationLearned, TokenClassificationTask,
                                                 encode_windows, entity_spans, order_tags, plan_windows,
                                                 split_words, word_predictions, words_match_running_text)
from tiny_translation import build_tiny_bart, build_tiny_llama, build_tiny_t5

RECIPE = RECIPES_DIR / "ner.yaml"
TAGS = ("O", "B-LOC", "I-LOC", "B-PER", "I-PER")
PEOPLE = ["anna", "bruno", "carla", "dmitri", "elena", "farid", "greta", "hugo"]
SURNAMES = ["smith", "jones", "garcia", "okafor"]
CITIES = ["paris", "lima", "oslo", "cairo", "delhi", "quito"]


def synthetic_ner(n: int, seed: int = 0) -> list[dict]:
    """Sentences of filler words with a person (one or two words) and sometimes a city."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        words = [rng.choice(FILLER) for _ in range(rng.randint(2, 6))]
        tags = ["O"] * len(words)
        person = [rng.choice(PEOPLE)] + ([rng.choice(SURNAMES)] if rng.random() < 0.5 else [])
        at = rng.randrange(len(words) + 1)
        words[at:at] = person
        tags[at:at] = ["B-PER"] + ["I-PER"] * (len(person) - 1)
        if rng.random() < 0.6:
            words += ["in", rng.choice(CITIES)]
            tags += ["O", "B-LOC"]
        rows.append({"id": f"s{i}", "tokens": words, "tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_conll(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join("".join(f"{w}\t{t}\n" for w, t in zip(r["tokens"], r["tags"])) + "\n" for r in rows),
                    encoding="utf-8")
    return path


def overrides(model: Path, train_file: Path, out: Path, **extra: object) -> list[str]:
    """The ner recipe, made to train a tiny model on a small file in seconds."""
    values = {
        "model.name_or_path": str(model), "data.source": "files", "data.train_file": str(train_file),
        "data.validation_size": 0.2, "data.test_size": 0.2, "data.max_length": 32, "data.stride": 4,
        "train.batch_size": 8, "train.epochs": 2, "train.learning_rate": 0.01, "train.mixed_precision": "no",
        "lora.method": "lora", "lora.r": 4, "lora.alpha": 8, "eval.batch_size": 16, "run.output_dir": str(out),
        "run.name": "tiny",
    }
    values.update(extra)
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def bound(tokenizer_folder: Path, tmp_path: Path, tags: tuple[str, ...] = TAGS, **extra: object
          ) -> TokenClassificationTask:
    """A task bound to a tag set and the folder's tokenizer, as a run binds it (no data needed)."""
    from transformers import AutoTokenizer

    config = load_config(RECIPE, overrides(tokenizer_folder, tmp_path / "unused.jsonl", tmp_path, **extra))
    task = TokenClassificationTask(config)
    task.bind(TokenClassificationLearned(tags), AutoTokenizer.from_pretrained(str(tokenizer_folder)))
    return task


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory: pytest.TempPathFactory, tiny_bert: Path) -> dict[str, Path]:
    """WordPiece (BERT), byte-level BPE without a prefix space (BART/RoBERTa, Llama/SmolLM style) and
    SentencePiece Unigram (T5)."""
    root = tmp_path_factory.mktemp("tokcls-tokenizers")
    return {"bert": tiny_bert, "bart": build_tiny_bart(root / "bart"), "llama": build_tiny_llama(root / "llama"),
            "t5": build_tiny_t5(root / "t5")}


# --- alignment -----------------------------------------------------------------------------------------
SENTENCES = [["The", "big", "dog", "sees", "Anna-Maria", "Okafor", "in", "Paris", "."],
             ["water", "and", "bread"],
             ["Hugo", "runs", "to", "Lima", "and", "Oslo", "!"]]
SENTENCE_TAGS = [["O", "O", "O", "O", "B-PER", "I-PER", "O", "B-LOC", "O"],
                 ["O", "O", "O"],
                 ["B-PER", "O", "O", "B-LOC", "O", "B-LOC", "O"]]


def running_text_pieces(tokenizer, words: list[str]) -> list[list[int]]:
    """The sub-tokens each word gets inside the sentence written as text (words joined by spaces): a token
    belongs to the first word that ends at or after its end (a leading space goes with the word after it)."""
    encoded = tokenizer(" ".join(words), add_special_tokens=False, return_offsets_mapping=True)
    ends = np.cumsum([len(w) + 1 for w in words]) - 1
    pieces: list[list[int]] = [[] for _ in words]
    for token, (_, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
        pieces[int(np.searchsorted(ends, end))].append(token)
    return pieces


@pytest.mark.parametrize("kind", ["bert", "bart", "llama", "t5"])
def test_words_to_subtokens_to_one_tag_per_word(kind: str, tokenizers: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    fresh = AutoTokenizer.from_pretrained(str(tokenizers[kind]))
    # Byte-level BPE without add_prefix_space tokenizes a pre-split word as if it started the text ("dog", not
    # "Ġdog"): binding the task fixes that.
    assert words_match_running_text(fresh) == (kind in ("bert", "t5"))
    task = bound(tokenizers[kind], tmp_path)
    tokenizer = task.tokenizer
    assert words_match_running_text(tokenizer)
    index = {tag: i for i, tag in enumerate(TAGS)}
    tags = [[index[t] for t in row] for row in SENTENCE_TAGS]
    encoded = encode_windows(tokenizer, SENTENCES, tags, max_length=64, stride=8, specials=task.specials)
    assert encoded["example"] == [0, 1, 2]  # short sentences: one window each
    for row, words in enumerate(SENTENCES):
        ids, labels, word_index = (encoded[k][row] for k in ("input_ids", "labels", "word_index"))
        prefix, suffix = task.specials
        assert ids[:len(prefix)] == prefix and ids[len(ids) - len(suffix):] == suffix
        body = ids[len(prefix):len(ids) - len(suffix)]
        # Each word's sub-tokens are those it has in running text (byte-level: with its leading space) ...
        expected = running_text_pieces(tokenizer, words)
        assert body == [t for piece in expected for t in piece]
        # ... the first carries the word's tag, the others -100, specials -100.
        starts = np.cumsum([0] + [len(p) for p in expected[:-1]]) + len(prefix)
        assert [i for i, w in enumerate(word_index) if w >= 0] == starts.tolist()
        assert [labels[i] for i in starts] == tags[row]
        assert sum(label != -100 for label in labels) == len(words)
        if kind in ("bart", "llama"):  # byte-level BPE is lossless
            assert tokenizer.decode(body) == " " + " ".join(words)
    # Predictions of the labelled positions go back to one tag per word.
    width = max(encoded["length"])
    predicted = np.array([labels + [-100] * (width - len(labels)) for labels in encoded["labels"]])
    words_back, _ = word_predictions(predicted, np.ones_like(predicted, dtype=float), encoded["example"],
                                     encoded["word_index"], [len(s) for s in SENTENCES])
    assert [row.tolist() for row in words_back] == tags


def test_the_prefix_space_survives_saving_the_tokenizer(tokenizers: dict[str, Path], tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    task = bound(tokenizers["llama"], tmp_path)
    task.tokenizer.save_pretrained(str(tmp_path / "saved"))  # what a run saves beside its weights
    assert words_match_running_text(AutoTokenizer.from_pretrained(str(tmp_path / "saved")))


def test_label_all_subtokens_continues_b_as_i(tiny_bert: Path, tmp_path: Path) -> None:
    task = bound(tiny_bert, tmp_path, **{"data.label_all_subtokens": True})
    examples = datasets.Dataset.from_dict(
        {"tokens": [["dmitri", "okafor", "sleeps"]], "tags": [[3, 4, 0]]},  # B-PER I-PER O
        features=datasets.Features({"tokens": datasets.List(datasets.Value("string")),
                                    "tags": datasets.List(datasets.ClassLabel(names=list(TAGS)))}))
    feature = task.features(examples, "train")[0]
    pieces = running_text_pieces(task.tokenizer, ["dmitri", "okafor", "sleeps"])
    assert len(pieces[0]) > 1  # a word of several sub-tokens: the test means something
    labels = feature["labels"][1:-1]
    expected = [3] + [4] * (len(pieces[0]) - 1) + [4] * len(pieces[1]) + [0] * len(pieces[2])
    assert labels == expected
    assert [w for w in feature["word_index"] if w >= 0] == [0, 1, 2]  # predictions still read the first


def test_a_word_the_tokenizer_drops_gets_the_unknown_token(tiny_bert: Path, tmp_path: Path) -> None:
    task = bound(tiny_bert, tmp_path)
    encoded = encode_windows(task.tokenizer, [["anna", "\u200b", "sleeps"]], [[3, 0, 0]], max_length=32, stride=4,
                             specials=task.specials)
    positions = [i for i, w in enumerate(encoded["word_index"][0]) if w >= 0]
    assert len(positions) == 3 and encoded["input_ids"][0][positions[1]] == task.tokenizer.unk_token_id


# --- windows ---------------------------------------------------------------------------------------------
def test_window_plans_tile_the_sentence_and_respect_the_budget() -> None:
    rng = random.Random(0)
    for _ in range(300):
        lengths = [rng.choice([1, 1, 1, 2, 3, 9]) for _ in range(rng.randint(1, 60))]
        budget, stride = rng.randint(4, 20), rng.randint(0, 6)
        stride = min(stride, budget // 2)
        windows = plan_windows(lengths, budget, stride)
        own = [w for _, start, end in windows for w in range(start, end)]
        assert own == list(range(len(lengths)))  # every word own exactly once, in order
        for first, start, end in windows:
            assert first <= start < end
            assert sum(lengths[first:start]) <= stride
            assert sum(lengths[first:end]) <= budget or (end - first == 1 and lengths[first] > budget)


@pytest.mark.parametrize("max_length,stride", [(10, 0), (12, 4), (16, 8)])
def test_long_sentences_become_windows_that_keep_every_word_once(max_length: int, stride: int, tiny_bert: Path,
                                                                  tmp_path: Path) -> None:
    task = bound(tiny_bert, tmp_path, **{"data.max_length": max_length, "data.stride": stride})
    rng = random.Random(1)
    sentences = [[rng.choice(PEOPLE + CITIES + FILLER) for _ in range(n)] for n in (3, 40, 75)]
    sentences[2][10] = "supercalifragilisticexpialidocious"  # longer than a whole window on its own
    tags = [[rng.randrange(len(TAGS)) for _ in words] for words in sentences]
    encoded = encode_windows(task.tokenizer, sentences, tags, max_length=max_length, stride=stride,
                             specials=task.specials)
    assert encoded["example"].count(0) == 1 and encoded["example"].count(2) > 3
    assert max(encoded["length"]) <= max_length
    for example, words in enumerate(sentences):
        owned = sorted(w for e, index in zip(encoded["example"], encoded["word_index"]) if e == example
                       for w in index if w >= 0)
        assert owned == list(range(len(words)))  # no word lost at a cut, none doubled
    width = max(encoded["length"])
    predicted = np.array([labels + [-100] * (width - len(labels)) for labels in encoded["labels"]])
    back, _ = word_predictions(predicted, np.zeros(predicted.shape), encoded["example"], encoded["word_index"],
                               [len(s) for s in sentences])
    assert [row.tolist() for row in back] == tags


def test_a_word_predicted_twice_or_never_is_an_error() -> None:
    from finetune.errors import FinetuneError

    predicted = np.zeros((2, 4), dtype=int)
    with pytest.raises(FinetuneError, match="predicted by two windows"):
        word_predictions(predicted, predicted.astype(float), [0, 0], [[-1, 0, 1, -1], [-1, 1, -1, -1]], [2])
    with pytest.raises(FinetuneError, match="word 3 has no prediction"):
        word_predictions(predicted, predicted.astype(float), [0, 0], [[-1, 0, -1, -1], [-1, 1, -1, -1]], [3])


# --- entities and offsets --------------------------------------------------------------------------------
def test_entity_offsets_match_the_given_text() -> None:
    text = "Yesterday  Anna Smith flew to Paris, then (Lima)."
    tokens = ["Yesterday", "Anna", "Smith", "flew", "to", "Paris", ",", "then", "(", "Lima", ")", "."]
    from finetune.tasks.token_classification import word_starts

    _, starts, problem = word_starts(tokens, text, "text")
    assert problem is None
    tags = ["O", "B-PER", "I-PER", "O", "O", "B-LOC", "O", "O", "O", "I-LOC", "O", "O"]  # a stray I-LOC
    spans = entity_spans(tags, [0.9] * 3 + [0.5] * 9, text, starts, tokens)
    assert [(s["text"], s["type"], s["start"], s["end"]) for s in spans] == [
        ("Anna Smith", "PER", 11, 21), ("Paris", "LOC", 30, 35), ("Lima", "LOC", 43, 47)]
    assert all(text[s["start"]:s["end"]] == s["text"] for s in spans)
    assert spans[0]["score"] == pytest.approx((0.9 + 0.9) / 2)


def test_split_words_keeps_offsets() -> None:
    text = "Obama met (Merkel) in Berlin, again."
    words, starts = split_words(text)
    assert words == ["Obama", "met", "(", "Merkel", ")", "in", "Berlin", ",", "again", "."]
    assert [text[s:s + len(w)] for w, s in zip(words, starts)] == words


class TagByToken(torch.nn.Module):
    """A stand-in model that tags a sub-token by a fixed table (everything else O)."""

    def __init__(self, table: dict[int, int], num_tags: int):
        super().__init__()
        self.table, self.num_tags = table, num_tags
        self.anchor = torch.nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(*input_ids.shape, self.num_tags)
        logits[..., 0] = 1.0
        for token, tag in self.table.items():
            logits[input_ids == token, tag] = 5.0
        return SimpleNamespace(logits=logits)


def test_predict_maps_entities_to_character_offsets_of_the_text(tiny_bert: Path, tmp_path: Path) -> None:
    task = bound(tiny_bert, tmp_path, **{"data.max_length": 10, "data.stride": 2})  # long inputs: windows
    first = {word: task.tokenizer(word, add_special_tokens=False)["input_ids"][0] for word in ("anna", "smith", "lima")}
    model = TagByToken({first["anna"]: 3, first["smith"]: 4, first["lima"]: 1}, len(TAGS))
    text = "Yesterday  anna smith flew to the river in (lima), the movie was so good and anna was happy."
    rows = task.predict(model, [{"text": text}, {"tokens": ["anna", "in", "lima"]}])
    entities = rows[0]["entities"]
    assert [(e["text"], e["type"]) for e in entities] == [("anna smith", "PER"), ("lima", "LOC"), ("anna", "PER")]
    assert all(text[e["start"]:e["end"]] == e["text"] for e in entities)
    assert entities[0]["start"] == text.index("anna") and 0 < entities[0]["score"] <= 1
    assert len(rows[0]["predicted"]) == len(rows[0]["tokens"]) == len(split_words(text)[0])
    assert rows[1]["entities"] == [{"text": "anna", "type": "PER", "start": 0, "end": 4,
                                    "score": rows[1]["entities"][0]["score"]},
                                   {"text": "lima", "type": "LOC", "start": 8, "end": 12,
                                    "score": rows[1]["entities"][1]["score"]}]
    with pytest.raises(DataError, match="input 2: a token-classification input needs a non-empty 'text'"):
        task.predict(model, [{"text": "anna"}, {"text": "  "}])


# --- metrics and baseline --------------------------------------------------------------------------------
def test_entity_scores_equal_a_hand_counted_example(tiny_bert: Path, tmp_path: Path) -> None:
    task = bound(tiny_bert, tmp_path, ("O", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-PER", "I-PER"))
    references = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG", "O"]]
    predictions = [["B-PER", "I-PER", "O", "O"], ["O", "B-ORG", "B-LOC"]]
    # Entities: reference PER s1[0:2], LOC s1[3], ORG s2[1]; predicted PER s1[0:2], ORG s2[1], LOC s2[2].
    # Right (same span and type): PER, ORG -> P = 2/3, R = 2/3, F1 = 2/3. Tokens right: 3 of 4 + 2 of 3 = 5/7.
    scores = task.scores(references, predictions)
    assert scores["precision"] == pytest.approx(2 / 3) and scores["recall"] == pytest.approx(2 / 3)
    assert scores["f1"] == pytest.approx(2 / 3) and scores["accuracy"] == pytest.approx(5 / 7)
    assert scores["per_type"]["PER"] == {"precision": 1.0, "recall": 1.0, "f1": 1.0, "number": 1}
    assert scores["per_type"]["LOC"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "number": 1}
    # seqeval counts entities, not tokens: a stray I-PER starts an entity, whose span and type are right.
    stray = task.scores([["O", "B-PER", "O"]], [["O", "I-PER", "O"]])
    assert stray["f1"] == 1.0 and stray["accuracy"] == pytest.approx(2 / 3)


def test_plain_tags_get_accuracy_and_macro_f1(tiny_bert: Path, tmp_path: Path) -> None:
    task = bound(tiny_bert, tmp_path, ("DET", "NOUN", "VERB"), **{"train.metric_for_best": "macro_f1"})
    assert not task.entities
    scores = task.scores([["DET", "NOUN", "VERB"], ["NOUN", "VERB"]], [["DET", "VERB", "VERB"], ["NOUN", "NOUN"]])
    # DET 1/1 right (F1 1); NOUN: 1 right, 1 false, 1 missed (F1 1/2); VERB the same (1/2). Tokens 3/5.
    assert scores["accuracy"] == pytest.approx(0.6)
    assert scores["macro_f1"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert scores["per_tag"]["NOUN"] == pytest.approx({"precision": 0.5, "recall": 0.5, "f1": 0.5})
    assert "f1" not in scores


def test_baseline_is_the_most_frequent_tag_of_each_word(tiny_bert: Path, tmp_path: Path) -> None:
    task = bound(tiny_bert, tmp_path)
    index = {tag: i for i, tag in enumerate(TAGS)}

    def rows(tokens: list[list[str]], tags: list[list[str]]) -> datasets.Dataset:
        return datasets.Dataset.from_dict({"tokens": tokens, "tags": [[index[t] for t in r] for r in tags]})

    train = rows([["anna", "runs"], ["anna", "sleeps"], ["paris", "sleeps"], ["paris", "anna"]],
                 [["B-PER", "O"], ["B-PER", "O"], ["B-LOC", "O"], ["B-LOC", "B-LOC"]])
    test = rows([["paris", "anna", "rome"]], [["B-LOC", "B-PER", "B-LOC"]])
    # anna: B-PER twice, B-LOC once -> B-PER; paris -> B-LOC; rome unseen -> O (4 of 8 training tags).
    # Entities: 3 in the reference, 2 predicted, both right: P = 1, R = 2/3, F1 = 0.8; tokens 2/3.
    baseline = task.baseline(train, test, test)
    assert baseline["name"] == "most frequent tag of each word in train (unseen words: O)"
    assert baseline["precision"] == 1.0 and baseline["recall"] == pytest.approx(2 / 3)
    assert baseline["f1"] == pytest.approx(0.8) and baseline["accuracy"] == pytest.approx(2 / 3)


def test_tag_order_and_learned_round_trip() -> None:
    assert order_tags({"I-PER", "B-LOC", "O", "B-PER", "I-LOC"}) == ["O", "B-LOC", "I-LOC", "B-PER", "I-PER"]
    assert order_tags({"VERB", "NOUN", "ADJ"}) == ["ADJ", "NOUN", "VERB"]
    values = {"tags": ["O", "B-X", "I-X"]}
    learned = TASKS["token-classification"].Learned.from_dict(json.loads(json.dumps(values)), "task.json")
    assert learned.tags == ("O", "B-X", "I-X") and json.loads(json.dumps(learned.to_dict())) == values


# --- data layouts ----------------------------------------------------------------------------------------
def test_hub_layout_with_class_label_ids(tiny_bert: Path, tmp_path: Path) -> None:
    """conll2003's shape: ``tokens`` and ``ner_tags`` as ClassLabel ids; the ClassLabel names are the tags."""
    names = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
    features = datasets.Features({"id": datasets.Value("string"), "tokens": datasets.List(datasets.Value("string")),
                                  "ner_tags": datasets.List(datasets.ClassLabel(names=names))})
    raw = datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"id": ["0", "1"], "tokens": [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]],
         "ner_tags": [[3, 0, 7, 0], [1, 2]]}, features=features)})
    config = load_config(RECIPE, overrides(tiny_bert, tmp_path / "unused", tmp_path,
                                           **{"data.source": "conll2003", "data.train_file": None,
                                              "data.tags_column": "ner_tags"}))
    task = bound_task(config, raw=raw)
    assert task.learned.tags == tuple(names)  # the ClassLabel's order, unused tags included
    prepared = task.prepare(raw)["train"]
    assert [names[t] for t in prepared[0]["tags"]] == ["B-ORG", "O", "B-MISC", "O"]
    assert prepared[1]["text"] == "Peter Blackburn" and prepared[1]["starts"] == [0, 6]


def test_conllu_part_of_speech_tags(tiny_bert: Path, tmp_path: Path) -> None:
    treebank = tmp_path / "ud.conllu"
    treebank.write_text("1\tThe\tthe\tDET\t_\t_\t2\tdet\t_\t_\n2\tdog\tdog\tNOUN\t_\t_\t3\tnsubj\t_\t_\n"
                        "3\truns\trun\tVERB\t_\t_\t0\troot\t_\t_\n\n", encoding="utf-8")
    config = load_config(RECIPE, overrides(tiny_bert, treebank, tmp_path, **{"train.metric_for_best": "macro_f1"}))
    task = bound_task(config)
    assert task.learned.tags == ("DET", "NOUN", "VERB") and not task.entities
    with pytest.raises(ConfigError, match=r"'train.metric_for_best' must be one of loss, accuracy, macro_f1 for "
                                          r"plain \(no B-/I- entity\) tags; got 'f1'"):
        bound_task(load_config(RECIPE, overrides(tiny_bert, treebank, tmp_path)))


# --- end to end ------------------------------------------------------------------------------------------
def test_train_eval_predict_cli_on_a_conll_file(tiny_bert: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    data = write_conll(tmp_path / "train.conll", synthetic_ner(150))
    assert main(["train", "ner", *overrides(tiny_bert, data, tmp_path, **{"train.epochs": 3})]) == 0
    out = capsys.readouterr().out
    run = tmp_path / "tiny"
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"f1", "precision", "recall", "accuracy", "loss", "per_type"} <= set(metrics["test"])
    assert set(metrics["test"]["per_type"]) <= {"PER", "LOC"}
    assert metrics["baseline"]["name"].startswith("most frequent tag of each word")
    assert "baseline (most frequent tag of each word" in out and "f1" in out
    rows = [json.loads(line) for line in (run / "predictions_test.jsonl").read_text().splitlines()]
    assert len(rows) == metrics["split_sizes"]["test"] == 30
    assert set(rows[0]) == {"id", "tokens", "tags", "predicted", "entities"}
    assert all(len(r["predicted"]) == len(r["tokens"]) for r in rows)
    saved = json.loads((run / "adapter" / "task.json").read_text())
    assert saved["learned"]["tags"] == ["O", "B-LOC", "B-PER", "I-PER"]  # the tags the data uses

    assert main(["eval", str(run)]) == 0
    evaluated = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert evaluated["f1"] == pytest.approx(metrics["test"]["f1"])  # same split, same weights

    assert main(["predict", str(run), "--text", "yesterday anna smith was in lima."]) == 0
    [prediction] = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert prediction["tokens"] == ["yesterday", "anna", "smith", "was", "in", "lima", "."]
    for entity in prediction["entities"]:
        assert set(entity) == {"text", "type", "start", "end", "score"}
        assert "yesterday anna smith was in lima."[entity["start"]:entity["end"]] == entity["text"]
    inputs = write_jsonl(tmp_path / "inputs.jsonl", [{"tokens": ["greta", "in", "oslo"]}, {"text": "hugo jones"}])
    assert main(["predict", str(run), "--input", str(inputs)]) == 0
    predictions = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["tokens"] for p in predictions] == [["greta", "in", "oslo"], ["hugo", "jones"]]


# --- bad input -------------------------------------------------------------------------------------------
def prepare(tiny_bert: Path, tmp_path: Path, train: list[dict], test: list[dict] | None = None,
            **extra: object) -> tuple[TokenClassificationTask, datasets.DatasetDict]:
    train_file = write_jsonl(tmp_path / "train.jsonl", train)
    if test is not None:
        extra["data.test_file"] = str(write_jsonl(tmp_path / "test.jsonl", test))
    config = load_config(RECIPE, overrides(tiny_bert, train_file, tmp_path, **extra))
    task = bound_task(config)
    from finetune.data import load_raw

    return task, task.prepare(load_raw(config.data, config.run.seed))


GOOD = [{"tokens": ["anna", "runs"], "tags": ["B-PER", "O"]}, {"tokens": ["in", "lima"], "tags": ["O", "B-LOC"]}]


@pytest.mark.parametrize("row,message", [
    ({"tokens": ["anna", "runs"], "tags": ["B-PER"]},
     r"train.jsonl: row 3: 2 words in column 'tokens' but 1 tags in column 'tags': one tag per word"),
    ({"tokens": [], "tags": []}, r"train.jsonl: row 3: empty sentence: no words in column 'tokens'"),
    ({"tokens": ["anna", " "], "tags": ["B-PER", "O"]}, r"row 3: word 2 is empty or not text \(' '\)"),
    ({"tokens": "anna runs", "tags": ["B-PER", "O"]}, r"row 3: empty sentence: no words in column 'tokens'"),
    ({"tokens": ["anna"], "tags": "B-PER"}, r"row 3: column 'tags' must hold a list of tags"),
])
def test_bad_sentences_name_the_row(row: dict, message: str, tiny_bert: Path, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=message + r".*\(data.on_bad_example=skip drops such sentences\)"):
        prepare(tiny_bert, tmp_path, GOOD + [row])


def test_an_unknown_tag_in_the_test_split_only_names_file_and_row(tiny_bert: Path, tmp_path: Path) -> None:
    test = [GOOD[0], {"tokens": ["paris", "hilton"], "tags": ["B-PER", "I-PERSON"]}]
    with pytest.raises(DataError, match=r"test.jsonl: row 2: tag 'I-PERSON' of word 2 \('hilton'\) is not among the "
                                        r"training split's tags \(O, B-LOC, B-PER\)"):
        prepare(tiny_bert, tmp_path, GOOD * 3, test)


def test_skip_counts_bad_sentences_and_stray_inside_tags_are_counted(tiny_bert: Path, tmp_path: Path) -> None:
    train = GOOD * 3 + [{"tokens": ["a"], "tags": []}, {"tokens": ["the", "lima", "river"],
                                                       "tags": ["O", "I-LOC", "O"]}]
    task, prepared = prepare(tiny_bert, tmp_path, train, **{"data.on_bad_example": "skip"})
    assert len(prepared["train"]) == 7
    lines = task.describe(prepared)
    assert any(line.endswith("train.jsonl: skipped 1 bad sentence(s)") for line in lines)
    assert any("train.jsonl: 1 tag(s) I-X after neither B-X nor I-X, kept" in line for line in lines)


def test_text_column_offsets_and_a_word_missing_from_its_text(tiny_bert: Path, tmp_path: Path) -> None:
    rows = [{"text": "Anna  runs.", "tokens": ["Anna", "runs", "."], "tags": ["B-PER", "O", "O"]},
            {"text": "in Lima", "tokens": ["in", "Lima"], "tags": ["O", "B-LOC"]}]
    _, prepared = prepare(tiny_bert, tmp_path, rows, **{"data.text_column": "text"})
    assert prepared["train"][0]["starts"] == [0, 6, 10] and prepared["train"][0]["text"] == "Anna  runs."
    rows.append({"text": "in Lima", "tokens": ["in", "Lima", "now"], "tags": ["O", "B-LOC", "O"]})
    with pytest.raises(DataError, match=r"row 3: word 3 \('now'\) does not occur in column 'text' after character 7"):
        prepare(tiny_bert, tmp_path, rows, **{"data.text_column": "text"})


def test_cli_errors_are_one_line(tiny_bert: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = write_jsonl(tmp_path / "train.jsonl", GOOD + [{"tokens": ["x", "y"], "tags": ["O"]}])
    assert main(["train", "ner", *overrides(tiny_bert, data, tmp_path)]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert errors == [f"error: {data}: row 3: 2 words in column 'tokens' but 1 tags in column 'tags': one tag per "
                      f"word (data.on_bad_example=skip drops such sentences)"]
    assert main(["train", "ner", *overrides(tiny_bert, data, tmp_path, **{"data.stride": 20})]) == 2
    assert "config key 'data.stride' must be in [0, 16]" in capsys.readouterr().err
    assert main(["train", "ner", *overrides(tiny_bert, data, tmp_path, **{"data.tags_column": "ner",
                                                                          "run.name": "other"})]) == 2
    assert "no column 'ner' (data.tags_column); it has: tokens, tags" in capsys.readouterr().err


def test_shipped_ner_recipe() -> None:
    config = load_config(RECIPE)
    assert config.run.task == "token-classification" and config.data.source == "builtin:wnut16-ner"
    assert config.train.metric_for_best == "f1"


def test_conll_files_load_as_sentences_and_txt_stays_plain_text(tmp_path: Path) -> None:
    from finetune.data import load_file

    rows = synthetic_ner(3)
    loaded = load_file(write_conll(tmp_path / "ner.conll", rows))
    assert loaded.column_names == ["tokens", "tags"] and loaded["tokens"] == [r["tokens"] for r in rows]
    assert loaded["tags"] == [r["tags"] for r in rows]
    as_text = load_file(write_conll(tmp_path / "ner.txt", rows))  # .txt is plain text: one row per line
    assert as_text.column_names == ["text"] and len(as_text) > len(rows)
    (tmp_path / "bad.conll").write_text("anna\tB-PER\nruns\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"bad.conll:2: expected at least 2 whitespace-separated columns"):
        load_file(tmp_path / "bad.conll")


@pytest.mark.real
def test_real_minilm_tokenizer_alignment(tmp_path: Path) -> None:
    """The recipe's own WordPiece tokenizer (uncased all-MiniLM-L6-v2): words split into several sub-tokens keep
    their tag on the first one and come back one tag per word."""
    config = load_config(RECIPE, [f"run.output_dir={tmp_path}"])
    task = bound_task(config, raw=datasets.DatasetDict({"train": datasets.Dataset.from_dict(
        {"tokens": [["x", "y"]], "tags": [["B-PER", "O"]]})}))
    tokens = ["@justinbieber", "performs", "in", "Dortmund", "tonight", "#BieberFever", "http://t.co/x1"]
    encoded = encode_windows(task.tokenizer, [tokens], [[0] * len(tokens)], max_length=64, stride=16,
                             specials=task.specials)
    assert task.specials == ([task.tokenizer.cls_token_id], [task.tokenizer.sep_token_id])
    assert len(encoded["input_ids"][0]) > len(tokens) + 4  # several sub-tokens per word
    assert [w for w in encoded["word_index"][0] if w >= 0] == list(range(len(tokens)))
