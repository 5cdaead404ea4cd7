"""Evaluation and calibration text that works offline.

The built-in text is the Lee news corpus (``lee_background.cor``: 300 short Australian news
articles from 2001, one per line), which ships inside the gensim wheel as test data. It was
compiled by Michael D. Lee et al. ("An empirical evaluation of models of text document
similarity", 2005) and is distributed with gensim under the GNU LGPL 2.1
(https://github.com/piskvorky/gensim). We only read the file; gensim is never imported
(importing it takes seconds and pulls scipy).

The split is deterministic and by whole article, so the two parts never share an article:
the file holds 300 lines but 7 articles appear twice, so exact duplicates are dropped first
(keeping the first occurrence, 293 articles remain); then article ``i`` (0-based, in file
order) goes to ``"eval"`` when ``i`` is even and to ``"calib"`` when ``i`` is odd. Interleaving rather than halving keeps both parts
drawn from the same months and topics, so calibration text resembles the evaluation text
without being part of it. Each part is about 30k words (~40k SmolLM2 tokens).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Union

from quantlib.errors import QuantlibError

LEE_RELATIVE_PATH = Path("test") / "test_data" / "lee_background.cor"
SPLITS = ("eval", "calib")
ARTICLE_SEPARATOR = "\n\n"
BINARY_SNIFF_BYTES = 8192


class CorpusError(QuantlibError, ValueError):
    """Text cannot be used for evaluation; the message names the file and the reason."""


def lee_corpus_path() -> Path:
    """Path of lee_background.cor inside the installed gensim package (without importing it)."""
    spec = importlib.util.find_spec("gensim")
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise CorpusError(
            "The built-in text needs the gensim package (it ships the Lee corpus): "
            "pip install gensim==4.4.0"
        )
    path = Path(locations[0]) / LEE_RELATIVE_PATH
    if not path.is_file():
        raise CorpusError(f"gensim is installed but its Lee corpus is missing at {path}; reinstall gensim.")
    return path


def _articles() -> list[str]:
    """Distinct non-empty articles of the Lee corpus, in file order, whitespace-trimmed.

    Duplicates are dropped so that no article can land in both eval and calib.
    """
    text = lee_corpus_path().read_text(encoding="utf-8", errors="replace")
    lines = (line.strip() for line in text.splitlines())
    return list(dict.fromkeys(line for line in lines if line))


def builtin_text(split: str = "eval") -> str:
    """The "eval" or "calib" part of the Lee corpus (disjoint; see the module docstring)."""
    if split not in SPLITS:
        raise CorpusError(f"Unknown split {split!r}; use one of {', '.join(SPLITS)}.")
    parity = 0 if split == "eval" else 1
    chosen = [a for i, a in enumerate(_articles()) if i % 2 == parity]
    return ARTICLE_SEPARATOR.join(chosen)


def _looks_binary(data: bytes) -> bool:
    """NUL bytes never occur in text files but are common in binaries (and in UTF-16)."""
    return b"\x00" in data[:BINARY_SNIFF_BYTES]


def load_text(path: Union[str, Path]) -> str:
    """A user's UTF-8 text file, with errors that name the file and say what is wrong."""
    file = Path(path).expanduser()
    if not file.exists():
        raise CorpusError(f"Text file {file} does not exist.")
    if not file.is_file():
        raise CorpusError(f"{file} is not a file (a UTF-8 text file is expected).")
    try:
        data = file.read_bytes()
    except OSError as exc:
        raise CorpusError(f"Cannot read {file}: {exc.strerror or exc}") from exc
    if _looks_binary(data):
        raise CorpusError(f"{file} looks binary (it contains NUL bytes); a UTF-8 text file is expected.")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise CorpusError(f"{file} is not valid UTF-8 (byte {exc.start}): save it as UTF-8 text.") from exc
    if not text.strip():
        raise CorpusError(f"{file} is empty; it needs some text to evaluate on.")
    return text
