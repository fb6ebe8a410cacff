"""A character-level tokenizer for the tiny random Qwen2 of `rollout_tiny.py`, built offline.

The tiny model has a 256-token vocabulary (bos 254, eos 255) and, being random, emits any id
in [0, 256); so this tokenizer has exactly 256 ids and every one of them decodes. One character
is one token, which makes expected token counts in tests easy to write by hand.

    ids 0..249   characters: printable ASCII, "\\n", "\\t", Latin-1, Greek, a few math signs
    250 <|unk|>  (characters outside the table)     251 <|im_start|>     252 <|im_end|>
    253 <|pad|>                                     254 <|bos|>          255 <|endoftext|> (eos)
"""

from __future__ import annotations

import json
from pathlib import Path

VOCAB_SIZE = 256
UNK, IM_START, IM_END, PAD, BOS, EOS = (
    "<|unk|>", "<|im_start|>", "<|im_end|>", "<|pad|>", "<|bos|>", "<|endoftext|>")
SPECIALS = (UNK, IM_START, IM_END, PAD, BOS, EOS)  # ids 250..255, in this order

# Qwen's layout without its default system prompt. trim_blocks/lstrip_blocks (on in transformers'
# renderer) only touch whitespace right after a tag or spaces before one, so no newline is lost.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def characters() -> list[str]:
    """The 250 ordinary characters, id = position in this list."""
    chars = [chr(c) for c in range(0x20, 0x7F)] + ["\n", "\t"]  # 97: printable ASCII first
    extra = [chr(c) for c in list(range(0xA1, 0x100)) + list(range(0x391, 0x3CA))] + list("≤≥≠≈√∞")
    chars += [c for c in extra if c.isprintable()][:VOCAB_SIZE - len(SPECIALS) - len(chars)]
    assert len(chars) == VOCAB_SIZE - len(SPECIALS)
    return chars


def save_tiny_tokenizer(path) -> str:
    """Write the tokenizer (tokenizer.json, tokenizer_config.json with the chat template,
    special_tokens_map.json) into `path` and return it; loadable by AutoTokenizer."""
    from tokenizers import AddedToken, Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(characters() + list(SPECIALS))}
    # BPE with no merges is character-level; no pre-tokenizer, so spaces stay ordinary tokens,
    # and Fuse concatenates on decode (the default decoder would join tokens with spaces).
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=UNK))
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token=UNK, pad_token=PAD, bos_token=BOS, eos_token=EOS,
        extra_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False,
        model_max_length=4096)
    fast.chat_template = CHAT_TEMPLATE
    Path(path).mkdir(parents=True, exist_ok=True)
    # Template inside tokenizer_config.json and a special_tokens_map.json as well (transformers 5
    # writes neither by default), so older readers (vLLM's, transformers 4) see the same thing.
    fast.save_pretrained(str(path), save_jinja_files=False)
    special = dict(bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=UNK,
                   additional_special_tokens=[IM_START, IM_END])
    (Path(path) / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n")
    return str(path)
