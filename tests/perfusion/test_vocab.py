"""The shipped tokenizer files are exactly what the generator produces."""

from __future__ import annotations

from perfusion.vocab import TOKENIZER_DIR, write_tokenizer_files


def test_shipped_tokenizer_files_match_a_fresh_build(tmp_path):
    write_tokenizer_files(tmp_path)
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_text() == (TOKENIZER_DIR / name).read_text(), name
