"""Build the CLIP tokenizer folder of the shapes model from the CLIP BPE merges file.

The vocabulary is the real 49,408-token CLIP vocabulary (as in SD 1.x), rebuilt from OpenAI's
``bpe_simple_vocab_16e6.txt.gz``, which ships inside the PyPI wheel ``open-clip-torch``::

    pip download --no-deps -d /tmp/x open-clip-torch==3.3.0
    unzip -j /tmp/x/open_clip_torch-3.3.0-py3-none-any.whl open_clip/bpe_simple_vocab_16e6.txt.gz -d /tmp/x
    python -m gnr_shapes.training.tokenizer --bpe /tmp/x/bpe_simple_vocab_16e6.txt.gz --out runs/tokenizer

Vocabulary order (so token ids equal the real CLIP ids): the 256 byte symbols, the same 256 with
the ``</w>`` end-of-word marker, one token per merge in merge order, then ``<|startoftext|>`` and
``<|endoftext|>``. ``model_max_length`` is 77; leaving it unset makes diffusers fail with
``OverflowError: int too big to convert`` (toy-model-training.md).
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
from pathlib import Path

from transformers import CLIPTokenizer

logger = logging.getLogger(__name__)

# CLIP's BPE file: one header line, then merges; CLIP uses the first 49152 - 256 - 2 = 48894.
N_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77  # CLIP text context length used by SD 1.x
START, END = "<|startoftext|>", "<|endoftext|>"


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins for bytes 0..255 used by byte-level BPE, in byte order.

    Bytes that are printable, non-space Latin-1 characters stand for themselves; every other
    byte gets the next unused code point from 256 upwards.
    """
    keep = set(range(ord("!"), ord("~") + 1))
    keep |= set(range(ord("¡"), ord("¬") + 1)) | set(range(ord("®"), ord("ÿ") + 1))
    symbols, extra = [], 0
    for byte in range(256):
        if byte in keep:
            symbols.append(chr(byte))
        else:
            symbols.append(chr(256 + extra))
            extra += 1
    return symbols


def _ordered_byte_symbols() -> list[str]:
    """Byte symbols in CLIP's vocabulary order: the self-mapped bytes first, then the rest."""
    symbols = byte_symbols()
    own = [s for b, s in enumerate(symbols) if ord(s) == b]
    shifted = [s for b, s in enumerate(symbols) if ord(s) != b]
    return own + shifted


def read_merges(bpe_path: Path) -> list[tuple[str, str]]:
    """The first :data:`N_MERGES` merges of a CLIP BPE file (plain text or gzip)."""
    opener = gzip.open if bpe_path.suffix == ".gz" else open
    with opener(bpe_path, "rt", encoding="utf-8") as handle:
        lines = handle.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]
    if len(merges) != N_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path} does not look like a CLIP BPE merges file")
    return merges  # type: ignore[return-value]


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's token -> id table for ``merges`` (see the module docstring for the order)."""
    base = _ordered_byte_symbols()
    tokens = base + [s + "</w>" for s in base] + ["".join(m) for m in merges] + [START, END]
    return {token: index for index, token in enumerate(tokens)}


def build_tokenizer(bpe_path: Path, out: Path) -> CLIPTokenizer:
    """Save the tokenizer (tokenizer.json, vocab.json, merges.txt, configs) to ``out``."""
    merges = read_merges(bpe_path)
    out.mkdir(parents=True, exist_ok=True)
    vocab = build_vocab(merges)
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=list(merges),
        model_max_length=MAX_LENGTH,
        bos_token=START,
        eos_token=END,
        unk_token=END,
        pad_token=END,  # SD 1.x pads with <|endoftext|>
    )
    tokenizer.save_pretrained(str(out))
    # tokenizer.json is what transformers 5 loads; vocab.json + merges.txt keep the folder
    # readable by older transformers and by the slow-tokenizer convention of SD 1.x folders.
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (out / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    logger.info("wrote CLIP tokenizer (%d tokens) to %s", len(tokenizer), out)
    return tokenizer


def main(argv: list[str] | None = None) -> None:
    """CLI entry point."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--bpe", type=Path, required=True, help="bpe_simple_vocab_16e6.txt.gz")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    tokenizer = build_tokenizer(args.bpe, args.out)
    print(f"{len(tokenizer)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
