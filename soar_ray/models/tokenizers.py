"""Offline tokenizers for random-weight presets: the real CLIP BPE and a byte-level T5 stand-in.

The CLIP vocabulary is rebuilt from the BPE merges file that ships inside open_clip_torch, the same
way OpenAI's CLIP `SimpleTokenizer` builds it, so token ids equal those of the released CLIP-L and
CLIP-G tokenizers. T5's SentencePiece model does not ship with any installed package; presets use
ByT5's tokenizer instead (raw UTF-8 bytes, same special ids as T5: pad 0, eos 1, unk 2), which needs
no files at all. Real checkpoints (`pretrained: PATH`) always use their own saved tokenizers.
"""

import gzip
from functools import lru_cache
from importlib import resources

from transformers import ByT5Tokenizer, CLIPTokenizer

CLIP_MAX_LENGTH = 77  # CLIP's context length; SD3 always pads CLIP prompts to it
# 49152 lines in the merges file minus the header, the 256 byte tokens and 2 special tokens.
_NUM_CLIP_MERGES = 49152 - 256 - 2
BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP/GPT-2 reversible byte -> printable unicode map (256 entries)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += list(range(ord("®"), ord("ÿ") + 1))
    codes = printable[:]
    num_shifted = 0
    for byte in range(256):
        if byte not in printable:
            printable.append(byte)
            codes.append(256 + num_shifted)
            num_shifted += 1
    return {byte: chr(code) for byte, code in zip(printable, codes)}


@lru_cache(maxsize=1)
def clip_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """(vocab, merges) of OpenAI CLIP, rebuilt from open_clip's `bpe_simple_vocab_16e6.txt.gz`."""
    bpe_file = resources.files("open_clip").joinpath("bpe_simple_vocab_16e6.txt.gz")
    with bpe_file.open("rb") as handle:
        lines = gzip.decompress(handle.read()).decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_CLIP_MERGES + 1]]
    if len(merges) != _NUM_CLIP_MERGES or any(len(pair) != 2 for pair in merges):
        raise ValueError(
            f"{bpe_file}: expected {_NUM_CLIP_MERGES} BPE merge pairs after the header"
        )
    byte_tokens = list(_bytes_to_unicode().values())
    tokens = byte_tokens + [token + "</w>" for token in byte_tokens]
    tokens += ["".join(pair) for pair in merges] + [BOS_TOKEN, EOS_TOKEN]
    return {token: index for index, token in enumerate(tokens)}, merges


def clip_tokenizer(pad_token: str) -> CLIPTokenizer:
    """CLIP tokenizer (49408 tokens); SD3 pads CLIP-L with EOS and CLIP-G with "!" (id 0)."""
    vocab, merges = clip_vocabulary()
    return CLIPTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        pad_token=pad_token,
        model_max_length=CLIP_MAX_LENGTH,
    )


def clip_l_tokenizer() -> CLIPTokenizer:
    """Tokenizer of SD3's `tokenizer` folder (CLIP-L, pads with EOS)."""
    return clip_tokenizer(pad_token=EOS_TOKEN)


def clip_g_tokenizer() -> CLIPTokenizer:
    """Tokenizer of SD3's `tokenizer_2` folder (CLIP-G, pads with "!" as open_clip pads with 0)."""
    return clip_tokenizer(pad_token="!")


def t5_tokenizer() -> ByT5Tokenizer:
    """Byte-level T5 tokenizer (384 ids: 3 specials, 256 bytes, 125 sentinels), fully offline."""
    return ByT5Tokenizer()
