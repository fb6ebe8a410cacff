"""A character-level Hugging Face tokenizer built offline: one character is one token.

Why: the built-in task (`arith.py`) and the tests must run with no downloads, and the model
folder must stay an ordinary HF folder that `transformers.AutoTokenizer` and vLLM load. A
character tokenizer is the smallest thing that does it, and it makes token counts equal
character counts, so response lengths (what LEAD rewards) can be read off the text by eye.

How: `tokenizers`' BPE with an empty merge list is character-level; there is no normaliser and
no pre-tokenizer, so spaces and newlines are ordinary tokens, and `decoders.Fuse` concatenates
on decode (the default decoder would join tokens with spaces). Ids are the positions in
`characters + specials`, so every id in [0, vocab) decodes. No post-processor: encoding plain
text adds no BOS/EOS (the trainer's `PromptEncoder` relies on that for chat-template-free
prompts).

`byte_level=True` (ASCII characters only) stores the vocabulary in GPT-2's byte-level alphabet
(space as "Ġ", newline as "Ċ") with Qwen2's pre-tokenizer, normaliser and decoder. A model folder
whose config.json says `model_type: qwen2` makes transformers 5's AutoTokenizer build a
`Qwen2Tokenizer` from the vocabulary, whatever tokenizer_config.json says; that class applies
exactly those steps, so both ways of loading the folder give the same ids (a plain character
vocabulary loses every space and newline there).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

__all__ = ["save_char_tokenizer"]

_DEFAULT_ROLES = {"unk_token": "<|unk|>", "pad_token": "<|pad|>", "bos_token": "<|bos|>"}
"""Roles taken by name when a special with that name is in `specials` and no role is given."""


def save_char_tokenizer(path, characters: Sequence[str],
                        specials: Sequence[str] = ("<|pad|>", "<|endoftext|>"),
                        chat_template: str | None = None, *, eos_token: str | None = None,
                        pad_token: str | None = None, bos_token: str | None = None,
                        unk_token: str | None = None, model_max_length: int = 4096,
                        byte_level: bool = False) -> str:
    """Write a character tokenizer into folder `path` and return `str(path)`.

    characters: the ordinary tokens, id = position; each must be exactly one character.
    specials: special tokens, ids len(characters).. in this order (AddedToken, special=True,
        never split nor normalised; `decode(skip_special_tokens=True)` drops them).
    chat_template: a Jinja chat template, stored inside tokenizer_config.json; None for none.
    Roles: `eos_token` defaults to the last special; `unk_token` / `pad_token` / `bos_token`
        default to "<|unk|>" / "<|pad|>" / "<|bos|>" when that special is listed, else none.
        Specials with no role become `extra_special_tokens` (e.g. chat markers). Without an
        unk token, characters outside the table are dropped on encode.

    Files: tokenizer.json, tokenizer_config.json (with the template when given) and a
    special_tokens_map.json (transformers 5 no longer writes one; older readers, vLLM's among
    them, look for it), loadable by `AutoTokenizer.from_pretrained(path, local_files_only=True)`.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    characters, specials = list(characters), list(specials)
    bad = [c for c in characters if not isinstance(c, str) or len(c) != 1]
    if bad:
        raise ValueError(f"characters must be single characters, got {bad[:5]!r}")
    if len(set(characters + specials)) != len(characters) + len(specials):
        raise ValueError("characters and specials must be distinct")
    if not specials:
        raise ValueError("at least one special token (the eos) is needed")
    roles = {"eos_token": eos_token or specials[-1], "pad_token": pad_token,
             "bos_token": bos_token, "unk_token": unk_token}
    for role, name in _DEFAULT_ROLES.items():
        if roles[role] is None and name in specials:
            roles[role] = name
    for role, tok in roles.items():
        if tok is not None and tok not in specials:
            raise ValueError(f"{role}={tok!r} is not one of the specials {specials}")
    extra = [s for s in specials if s not in roles.values()]

    if byte_level:
        non_ascii = [c for c in characters if ord(c) > 127]
        if non_ascii:
            raise ValueError(f"byte_level needs ASCII characters, got {non_ascii[:5]!r}")
        symbol = _byte_symbols()
        vocab = {symbol[ord(ch)]: i for i, ch in enumerate(characters)}
        vocab.update({s: len(characters) + i for i, s in enumerate(specials)})
    else:
        vocab = {ch: i for i, ch in enumerate(characters + specials)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=roles["unk_token"]))
    if byte_level:
        _qwen2_pipeline(tok)
    else:
        tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    set_roles = {k: v for k, v in roles.items() if v is not None}
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, **set_roles, extra_special_tokens=extra,
        clean_up_tokenization_spaces=False, model_max_length=model_max_length)
    if chat_template is not None:
        fast.chat_template = chat_template
    Path(path).mkdir(parents=True, exist_ok=True)
    # save_jinja_files=False keeps the template inside tokenizer_config.json, where vLLM and
    # transformers 4 look for it.
    fast.save_pretrained(str(path), save_jinja_files=False)
    special_map = {k: set_roles[k] for k in ("bos_token", "eos_token", "pad_token", "unk_token")
                   if k in set_roles}
    if extra:
        special_map["additional_special_tokens"] = extra
    (Path(path) / "special_tokens_map.json").write_text(json.dumps(special_map, indent=2) + "\n")
    return str(path)


def _byte_symbols() -> dict[int, str]:
    """GPT-2's byte -> printable-character table (what ByteLevel pre-tokenizers emit)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _qwen2_pipeline(tok) -> None:
    """Qwen2's normaliser, pre-tokenizer and decoder (transformers' Qwen2Tokenizer)."""
    from tokenizers import Regex, decoders, normalizers, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
