"""The tiny models' CLIP-style BPE tokenizer: generated from the project's corpus, shipped as data.

CLIP's real vocabulary (49,408 tokens) would need a download. Instead we train a byte-level BPE with
CLIP's conventions (`</w>` end-of-word suffix, `<|startoftext|>` / `<|endoftext|>`, lower-casing) on
perfusion/corpus.py, and ship vocab.json + merges.txt under perfusion/assets/tokenizer/. Every corpus word
becomes one token; any other text still tokenizes through the byte alphabet.

The shipped files are the source of truth, not a cache: token ids index the rows of the tiny model's
embedding table. The trainer breaks ties between equally frequent pairs in hash order, so two fresh builds
have the same tokens and merges but may number tied ones differently. `python -m perfusion.vocab` therefore
rewrites the files only when the corpus gained or lost tokens (and then the tiny model changes with them);
a test checks the shipped files still hold exactly what a fresh build holds.
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from perfusion.corpus import NEUTRAL_TEMPLATES, builtin_prompts

TOKENIZER_DIR = Path(__file__).parent / "assets" / "tokenizer"
VOCAB_SIZE = 1024  # 512 byte symbols (with and without </w>) + 510 merges + 2 specials
BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # CLIP's context length; the tiny text encoder has 77 positions too


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode table (the 256 base symbols)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = 0
    codes = []
    for byte in range(256):
        if byte in printable:
            codes.append(byte)
        else:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def build_vocab(texts: list[str] | None = None, vocab_size: int = VOCAB_SIZE) -> tuple[dict[str, int], list[str]]:
    """Train the BPE on `texts` (default: the tiny models' corpus): same texts -> same tokens and merges (tied
    ones maybe renumbered). With a `vocab_size` above what the texts need, every word becomes one token."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    alphabet = _byte_alphabet()
    tokenizer = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 2,
        min_frequency=1,
        initial_alphabet=alphabet,
        end_of_word_suffix="</w>",
        show_progress=False,
        special_tokens=[],
    )
    if texts is None:
        texts = builtin_prompts() + [t.format("") for t in NEUTRAL_TEMPLATES]
    tokenizer.train_from_iterator([text.lower() for text in texts], trainer=trainer)
    trained = json.loads(tokenizer.to_str())["model"]
    merges = [m if isinstance(m, str) else " ".join(m) for m in trained["merges"]]

    # CLIP's layout: bytes, bytes + </w>, then one entry per merge, then the two specials.
    vocab_list = alphabet + [a + "</w>" for a in alphabet]
    for merge in merges:
        merged = merge.replace(" ", "")
        if merged not in vocab_list:
            vocab_list.append(merged)
    vocab_list += [BOS, EOS]
    return {token: index for index, token in enumerate(vocab_list)}, merges


def same_tokens(a: tuple[dict[str, int], list[str]], b: tuple[dict[str, int], list[str]]) -> bool:
    """Two (vocab, merges) pairs hold the same tokens and merges, whatever their numbering."""
    return set(a[0]) == set(b[0]) and set(a[1]) == set(b[1])


def read_tokenizer_files(directory: Path = TOKENIZER_DIR) -> tuple[dict[str, int], list[str]]:
    vocab = json.loads((directory / "vocab.json").read_text())
    lines = (directory / "merges.txt").read_text().splitlines()
    return vocab, [line for line in lines[1:] if line.strip()]


def write_tokenizer_files(out_dir: Path = TOKENIZER_DIR) -> bool:
    """Write a fresh build unless `out_dir` already holds the same tokens; True if it wrote."""
    vocab, merges = build_vocab()
    if (out_dir / "vocab.json").exists() and same_tokens(read_tokenizer_files(out_dir), (vocab, merges)):
        return False  # keep the shipped numbering: the tiny model's weights depend on it
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False, indent=0) + "\n")
    (out_dir / "merges.txt").write_text("#version: perfusion-batch tiny\n" + "\n".join(merges) + "\n")
    return True


def load_tiny_tokenizer(directory: Path = TOKENIZER_DIR) -> CLIPTokenizer:
    """The shipped tokenizer. Built from in-memory vocab/merges: on transformers 5.x,
    CLIPTokenizer(vocab_file=..., merges_file=...) silently builds a 2-token tokenizer."""
    return clip_tokenizer(*read_tokenizer_files(directory))


def clip_tokenizer(vocab: dict[str, int], merges: list[str]) -> CLIPTokenizer:
    """A CLIPTokenizer from an in-memory vocabulary and merges, with CLIP's specials and 77-token context."""
    return CLIPTokenizer(
        vocab=vocab,
        merges=[tuple(merge.split()) for merge in merges],
        model_max_length=MAX_LENGTH,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )


if __name__ == "__main__":
    if write_tokenizer_files():
        print(f"wrote {TOKENIZER_DIR}: the tokens changed, so the tiny model changed too")
    else:
        print(f"{TOKENIZER_DIR} already holds the corpus's tokens; left unchanged")
