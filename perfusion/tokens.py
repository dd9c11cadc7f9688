"""Concept tokens: one new token per concept, in the tokenizer and the text encoder's input embedding.

How a concept word enters the text encoder:
- the tokenizer gets the concept token (e.g. "<sku-123>") as an added token, so it is never split;
- the text encoder's token embedding is swapped for `ConceptTokenEmbedding`, an nn.Embedding that SHARES
  the original weight Parameter (same state_dict keys, base rows never touched) and looks up ids past the
  base vocabulary in a small table of concept vectors. Only those vectors can be trained, so the base
  weights are bit-identical after training by construction, not by restoring rows after each step.

Multi-token superclasses ("teddy bear"): the concept token stands for the whole phrase. Its embedding
starts at the mean of the phrase's token embeddings, rescaled to their mean norm (a plain mean of two
unrelated vectors is shorter than either, out of the range the encoder saw). The superclass encoding
i_super is read at the phrase's LAST token: CLIP's text encoder is causal, so the last token has read the
whole phrase (and in English compounds it is the head noun).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence

import torch
from torch import nn
from transformers import CLIPTextModel
from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from perfusion.config import token_problem
from perfusion.errors import ConceptTokenError


class ConceptTokenEmbedding(nn.Embedding):
    """nn.Embedding over the base vocabulary plus concept vectors for ids >= base vocabulary size."""

    def __init__(self, base: nn.Embedding) -> None:
        nn.Module.__init__(self)
        self.num_embeddings, self.embedding_dim = base.num_embeddings, base.embedding_dim
        self.padding_idx, self.max_norm, self.norm_type = base.padding_idx, base.max_norm, base.norm_type
        self.scale_grad_by_freq, self.sparse = base.scale_grad_by_freq, base.sparse
        self.weight = base.weight  # the same Parameter: state_dict keys and bytes unchanged
        # token id -> (embedding_dim,) vector. A plain dict on purpose: concept vectors are not part of the
        # base model's state_dict (saving the pipeline saves the base model only).
        self.concept_vectors: dict[int, torch.Tensor] = {}

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_concept = input_ids >= self.num_embeddings
        embeddings = super().forward(input_ids.masked_fill(is_concept, 0))  # (b, m, dim)
        if not bool(is_concept.any()):
            return embeddings
        for token_id in torch.unique(input_ids[is_concept]).tolist():
            vector = self.concept_vectors.get(token_id)
            if vector is None:
                raise ConceptTokenError(
                    f"token id {token_id} is a concept token with no attached concept; attach its concept first"
                )
            rows = (input_ids == token_id)[..., None]  # (b, m, 1)
            embeddings = torch.where(rows, vector.to(embeddings.dtype), embeddings)
        return embeddings


def concept_embedding_table(text_encoder: CLIPTextModel) -> ConceptTokenEmbedding:
    """The text encoder's ConceptTokenEmbedding, installed on first use (idempotent)."""
    embedding = text_encoder.get_input_embeddings()
    if not isinstance(embedding, ConceptTokenEmbedding):
        embedding = ConceptTokenEmbedding(embedding)
        text_encoder.set_input_embeddings(embedding)
    return embedding


def validate_token(token: str, tokenizer: PreTrainedTokenizerBase) -> None:
    """A concept token must be well-formed and must not be a word the tokenizer already knows."""
    problem = token_problem(token)
    if problem is not None:
        raise ConceptTokenError(problem)
    vocab = tokenizer.get_vocab()
    base_size = _base_vocab_size(tokenizer)
    existing = vocab.get(token, vocab.get(token + "</w>"))
    if existing is not None and existing < base_size:
        raise ConceptTokenError(
            f"concept token {token!r} collides with the existing vocabulary word {token!r}: pick a token the "
            "tokenizer does not know, e.g. '<" + token.strip("<>") + "-1>'"
        )


def add_concept_token(
    tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel, token: str, vector: torch.Tensor
) -> int:
    """Register `token` with its input embedding `vector` (dim,); returns its id. Re-adding replaces it."""
    validate_token(token, tokenizer)
    table = concept_embedding_table(text_encoder)
    if vector.shape != (table.embedding_dim,):
        raise ConceptTokenError(
            f"concept token {token!r}: embedding has shape {tuple(vector.shape)}, the text encoder expects "
            f"({table.embedding_dim},)"
        )
    if token not in tokenizer.get_vocab():
        tokenizer.add_tokens([token])
    token_id = int(tokenizer.convert_tokens_to_ids(token))
    table.concept_vectors[token_id] = vector.to(table.weight.device)
    return token_id


def remove_concept_token(tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel, token: str) -> None:
    """Forget the token's vector (the tokenizer keeps the id; using it then raises a clear error)."""
    token_id = tokenizer.get_vocab().get(token)
    if token_id is not None:
        concept_embedding_table(text_encoder).concept_vectors.pop(int(token_id), None)


@contextlib.contextmanager
def temporary_concept_token(
    tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel, token: str, vector: torch.Tensor
) -> Iterator[int]:
    """Register `token` for the duration of a block (training, a loss evaluation), then put back whatever
    vector the token had before, so a renderer sharing this base keeps its attached concept."""
    table = concept_embedding_table(text_encoder)
    known_id = tokenizer.get_vocab().get(token)
    previous = table.concept_vectors.get(int(known_id)) if known_id is not None else None
    token_id = add_concept_token(tokenizer, text_encoder, token, vector)
    try:
        yield token_id
    finally:
        if previous is None:
            table.concept_vectors.pop(token_id, None)
        else:
            table.concept_vectors[token_id] = previous


def prompt_tokens(tokenizer: PreTrainedTokenizerBase, prompt: str) -> int:
    """How many tokens the text encoder reads for `prompt` (BOS and EOS included; a concept token is one):
    more than tokenizer.model_max_length and the prompt is cut."""
    return len(tokenizer(prompt).input_ids)


def superclass_token_ids(tokenizer: PreTrainedTokenizerBase, superclass: str) -> list[int]:
    """Token ids of the superclass phrase (no BOS/EOS). Raises if it is empty or uses concept tokens."""
    ids = tokenizer(superclass.strip(), add_special_tokens=False).input_ids
    if not ids:
        raise ConceptTokenError(f"superclass {superclass!r} is empty: give a word such as 'backpack'")
    base_size = _base_vocab_size(tokenizer)
    if any(i >= base_size for i in ids):
        raise ConceptTokenError(f"superclass {superclass!r} contains a concept token; use plain words")
    return list(ids)


def superclass_embedding(
    tokenizer: PreTrainedTokenizerBase, text_encoder: CLIPTextModel, superclass: str
) -> torch.Tensor:
    """Initial concept embedding (dim,): the superclass word's embedding (see module docstring)."""
    ids = torch.tensor(superclass_token_ids(tokenizer, superclass))
    weight = text_encoder.get_input_embeddings().weight.detach()
    rows = weight[ids.to(weight.device)].float()  # (n, dim)
    if len(rows) == 1:
        return rows[0].clone()
    mean = rows.mean(0)
    return mean * (rows.norm(dim=-1).mean() / mean.norm().clamp_min(1e-12))


def substitute_superclass(
    input_ids: torch.Tensor, phrases: Mapping[int, Sequence[int]], max_length: int, pad_id: int, eos_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Replace every concept token id by its superclass phrase ids, for global key locking.

    input_ids (b, m). Returns (substituted ids (b, max_length), alignment (b, m)) where alignment[b, p] is
    the position in the substituted prompt that corresponds to position p of the original: a concept token
    maps to the LAST token of its phrase, other tokens to themselves (shifted). Gathering the substituted
    prompt's encodings with it gives keys aligned with the concept prompt's values, even when a phrase has
    several tokens. Positions pushed past max_length map to the last position.
    """
    batch, length = input_ids.shape
    substituted = torch.full((batch, max_length), pad_id, dtype=input_ids.dtype)
    alignment = torch.zeros(batch, length, dtype=torch.long)
    for b in range(batch):
        out: list[int] = []
        for p, token_id in enumerate(input_ids[b].tolist()):
            out.extend(phrases.get(token_id, (token_id,)))
            alignment[b, p] = min(len(out) - 1, max_length - 1)
        out = out[:max_length]
        if eos_id not in out:
            out[-1] = eos_id  # a longer phrase pushed EOS out: truncate like the tokenizer does
        substituted[b, : len(out)] = torch.tensor(out, dtype=input_ids.dtype)
    return substituted, alignment


def _base_vocab_size(tokenizer: PreTrainedTokenizerBase) -> int:
    """Size of the vocabulary before any concept tokens were added."""
    return int(tokenizer.vocab_size)
