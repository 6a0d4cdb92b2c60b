"""Topic classification on the English chatterbot corpus: utterance -> topic (the file it comes from).

The raw corpus is unbalanced (trivia has ~540 utterances, health 9) and repeats
utterances, so it is deduplicated, large topics are capped and tiny ones dropped;
otherwise accuracy would mostly measure the majority class.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from pathlib import Path

import yaml

from . import Dataset, Split, package_dir

MAX_PER_TOPIC = 120
MIN_PER_TOPIC = 25
TEST_PERCENT = 20


def corpus_dir() -> Path:
    """The English files of the installed ``chatterbot_corpus`` package."""
    folder = package_dir("chatterbot_corpus", "chatterbot-corpus") / "data" / "english"
    if not any(folder.glob("*.yml")):
        raise FileNotFoundError(f"{folder} has no *.yml files; reinstall with `pip install chatterbot-corpus`")
    return folder


def _digest(text: str) -> int:
    """A stable hash (Python's ``hash`` is salted per process), so choices survive reruns."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big")


def _utterances(path: Path) -> set[str]:
    doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    out: set[str] = set()
    for conversation in doc.get("conversations") or []:
        for turn in conversation or []:
            if isinstance(turn, str) and turn.strip():
                out.add(" ".join(turn.split()))
    return out


def load(folder: Path | None = None) -> Dataset:
    """Train/test splits (~80/20 by a hash of the text) over the topics with enough utterances."""
    folder = folder or corpus_dir()
    topics_of: dict[str, set[str]] = defaultdict(set)
    for path in sorted(folder.glob("*.yml")):
        for text in _utterances(path):
            topics_of[text].add(path.stem)
    by_topic: dict[str, list[str]] = defaultdict(list)
    for text, topics in topics_of.items():
        if len(topics) == 1:  # an utterance filed under several topics has no single right answer
            by_topic[next(iter(topics))].append(text)
    kept = {t: sorted(texts, key=_digest)[:MAX_PER_TOPIC] for t, texts in by_topic.items() if len(texts) >= MIN_PER_TOPIC}
    if len(kept) < 2:
        raise ValueError(f"{folder} has fewer than two topics with {MIN_PER_TOPIC}+ distinct utterances")
    names = sorted(kept)
    splits: dict[str, tuple[list[str], list[int]]] = {"train": ([], []), "test": ([], [])}
    for label, topic in enumerate(names):
        for text in kept[topic]:
            texts, labels = splits["test" if _digest(text) % 100 < TEST_PERCENT else "train"]
            texts.append(text)
            labels.append(label)
    return Dataset({k: Split(*v) for k, v in splits.items()}, names)
