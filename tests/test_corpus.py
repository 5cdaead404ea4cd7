"""Built-in Lee corpus split and user text loading."""

from __future__ import annotations

import pytest

from quantlib import corpus
from quantlib.corpus import CorpusError, builtin_text, load_text


def test_splits_are_disjoint_deterministic_and_cover_the_corpus():
    eval_text, calib_text = builtin_text("eval"), builtin_text("calib")
    assert eval_text == builtin_text("eval")
    eval_docs, calib_docs = eval_text.split("\n\n"), calib_text.split("\n\n")
    assert not set(eval_docs) & set(calib_docs)
    assert len(eval_docs) + len(calib_docs) == len(corpus._articles()) == 293
    assert len(eval_text.split()) > 20_000 and len(calib_text.split()) > 20_000
    assert eval_text.startswith("Hundreds of people have been forced to vacate")


def test_default_split_is_eval():
    assert builtin_text() == builtin_text("eval")


def test_unknown_split():
    with pytest.raises(CorpusError, match="eval, calib"):
        builtin_text("train")


def test_missing_gensim_is_explained(monkeypatch):
    monkeypatch.setattr(corpus.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(CorpusError, match="pip install gensim"):
        builtin_text("eval")


def test_gensim_not_imported():
    import sys

    builtin_text("calib")
    assert "gensim" not in sys.modules or "gensim.models" not in sys.modules


def test_load_text_roundtrip(tmp_path):
    path = tmp_path / "ok.txt"
    path.write_text("Grüße aus Köln.\n", encoding="utf-8")
    assert load_text(path) == "Grüße aus Köln.\n"
    assert load_text(str(path)) == "Grüße aus Köln.\n"


@pytest.mark.parametrize(
    "content, message",
    [(b"", "empty"), (b"  \n\t", "empty"), (b"\x89PNG\r\n\x00\x00", "binary"), (b"caf\xe9", "UTF-8")],
)
def test_load_text_rejects_bad_files(tmp_path, content, message):
    path = tmp_path / "bad.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message) as err:
        load_text(path)
    assert str(path) in str(err.value)


def test_load_text_missing_and_directory(tmp_path):
    with pytest.raises(CorpusError, match="does not exist") as err:
        load_text(tmp_path / "nope.txt")
    assert "nope.txt" in str(err.value)
    with pytest.raises(CorpusError, match="not a file"):
        load_text(tmp_path)
