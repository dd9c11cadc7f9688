"""The shipped tokenizer files hold what the generator produces, and every corpus word is one token."""

from __future__ import annotations

import json
import re

from perfusion.corpus import NEUTRAL_TEMPLATES, builtin_prompts
from perfusion.vocab import (
    TOKENIZER_DIR,
    build_vocab,
    load_tiny_tokenizer,
    read_tokenizer_files,
    same_tokens,
    write_tokenizer_files,
)


def test_shipped_tokenizer_files_hold_the_tokens_of_a_fresh_build():
    # The BPE trainer numbers equally frequent merges in hash order, so compare contents, not order.
    shipped = read_tokenizer_files()
    fresh = build_vocab()
    assert same_tokens(shipped, fresh)
    assert sorted(shipped[0].values()) == list(range(len(shipped[0])))  # ids are dense 0..n-1


def test_regenerating_keeps_the_shipped_numbering(tmp_path):
    for name in ("vocab.json", "merges.txt"):
        (tmp_path / name).write_text((TOKENIZER_DIR / name).read_text())
    assert write_tokenizer_files(tmp_path) is False
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / name).read_text() == (TOKENIZER_DIR / name).read_text(), name


def test_a_changed_corpus_rewrites_the_files(tmp_path):
    (tmp_path / "vocab.json").write_text(json.dumps({"a": 0}))
    (tmp_path / "merges.txt").write_text("#version\n")
    assert write_tokenizer_files(tmp_path) is True
    assert same_tokens(read_tokenizer_files(tmp_path), read_tokenizer_files())


def test_every_corpus_word_is_one_token():
    tokenizer = load_tiny_tokenizer()
    corpus = builtin_prompts() + [t.format("") for t in NEUTRAL_TEMPLATES]
    # Words as the pre-tokenizer sees them: "close-up" is three (close, -, up).
    words = {word for prompt in corpus for word in re.findall(r"\w+", prompt.lower())}
    split = [w for w in sorted(words) if len(tokenizer(w, add_special_tokens=False).input_ids) != 1]
    assert len(words) > 100 and split == []
