"""A character-level tokenizer for the tiny random Qwen2 of `rollout_tiny.py`, built offline.

The tiny model has a 256-token vocabulary (bos 254, eos 255) and, being random, emits any id
in [0, 256); so this tokenizer has exactly 256 ids and every one of them decodes. One character
is one token, which makes expected token counts in tests easy to write by hand.

    ids 0..249   characters: printable ASCII, "\\n", "\\t", Latin-1, Greek, a few math signs
    250 <|unk|>  (characters outside the table)     251 <|im_start|>     252 <|im_end|>
    253 <|pad|>                                     254 <|bos|>          255 <|endoftext|> (eos)
"""

from __future__ import annotations

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
    special_tokens_map.json) into `path` and return it; loadable by AutoTokenizer. The package
    builder gives ids by position and roles by name: unk/pad/bos by name, eos = last special,
    <|im_start|>/<|im_end|> as extra special tokens."""
    from megatron_lead.data.char_tokenizer import save_char_tokenizer

    return save_char_tokenizer(path, characters(), SPECIALS, CHAT_TEMPLATE, eos_token=EOS)
