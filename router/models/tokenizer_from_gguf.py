"""Build a Hugging Face `tokenizers` tokenizer.json from a GGUF file's vocabulary metadata."""

from __future__ import annotations

import logging
from pathlib import Path

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

from router.models.gguf_metadata import GGUFMetadata
from router.models.gguf_weights import MetadataSource, field_value

logger = logging.getLogger(__name__)

# llama.cpp token types (gguf.TokenType): CONTROL and USER_DEFINED tokens are matched whole in
# the text before BPE, like Hugging Face "added tokens".
_CONTROL = 3
_USER_DEFINED = 4

# llama.cpp pre-tokenizer names whose splitting we reproduce. 'smollm' is the GPT-2 regex
# preceded by splitting every digit alone (llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM).
_DIGIT_SPLITTING = {"smollm": True, "starcoder": True, "gpt-2": False, "gpt2": False}


def tokenizer_from_gguf(reader: MetadataSource) -> Tokenizer:
    """A byte-level BPE tokenizer with ids identical to the GGUF vocabulary."""
    model = field_value(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model={model!r} is not supported; expected 'gpt2' (BPE)")
    pre = str(field_value(reader, "tokenizer.ggml.pre") or "gpt-2")
    if pre not in _DIGIT_SPLITTING:
        raise ValueError(
            f"tokenizer.ggml.pre={pre!r} is not supported; accepted: {sorted(_DIGIT_SPLITTING)}"
        )
    tokens: list[str] = list(field_value(reader, "tokenizer.ggml.tokens"))
    types: list[int] = list(field_value(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ", 1)) for m in field_value(reader, "tokenizer.ggml.merges")]

    tokenizer = Tokenizer(
        models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, fuse_unk=False)
    )
    steps: list[pre_tokenizers.PreTokenizer] = []
    if _DIGIT_SPLITTING[pre]:
        steps.append(pre_tokenizers.Digits(individual_digits=True))
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [
        AddedToken(t, special=ty == _CONTROL, normalized=False)
        for t, ty in zip(tokens, types, strict=True)
        if ty in (_CONTROL, _USER_DEFINED)
    ]
    tokenizer.add_special_tokens([s for s in specials if s.special])
    tokenizer.add_tokens([s for s in specials if not s.special])
    logger.info(
        "built tokenizer: %d tokens, %d merges, %d added", len(tokens), len(merges), len(specials)
    )
    return tokenizer


def write_tokenizer_json(gguf_path: Path, out_path: Path) -> Tokenizer:
    tokenizer = tokenizer_from_gguf(GGUFMetadata.read(gguf_path))
    tokenizer.save(str(out_path))
    return tokenizer
