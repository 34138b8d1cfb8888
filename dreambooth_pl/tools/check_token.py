"""Check a DreamBooth identifier against both SDXL tokenizers and suggest rare single-token ones.

DreamBooth (Ruiz et al. 2023, sec. 3.2 "Designing Prompts for Few-Shot Personalization") binds the subject to a
*rare token*: one vocabulary entry with a weak prior, so fine-tuning need not overwrite a meaning the model
already has. A made-up word that splits into several common pieces ("rraj" -> "r" + "raj") inherits their
priors. CLIP's BPE merges (Sennrich et al. 2016) are learned in order of pair frequency, so a token's merge
rank (its id minus the 512 byte tokens) is its frequency rank: the higher, the rarer.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Optional

BYTE_TOKENS = 512  # 256 byte symbols and their end-of-word forms precede the merges in CLIP's vocabulary
# Suffixes whose presence as whole-word tokens marks a candidate as an inflected English word ("howl" -> "howling").
INFLECTIONS = ("s", "es", "ing", "ed", "er", "ers", "y", "ly")


def load_tokenizers(base: Optional[str] = None) -> dict[str, object]:
    """``{"tokenizer": ..., "tokenizer_2": ...}`` of an SDXL base folder, or the offline CLIP BPE build.

    Args:
        base: SDXL pipeline folder or hub id (None: rebuild both tokenizers offline from open_clip's vocabulary,
            as :func:`dreambooth_pl.bases.make_base` does; ids match the real SDXL tokenizers).
    """
    from transformers import AutoTokenizer

    if base is not None:
        from ..sdxl import resolve_base

        root = resolve_base(base)
        try:
            return {sub: AutoTokenizer.from_pretrained(root, subfolder=sub) for sub in ("tokenizer", "tokenizer_2")}
        except (OSError, ValueError) as e:
            raise SystemExit(f"check-token: cannot load tokenizers from {root!r} ({str(e).splitlines()[0][:200]}); "
                             "give an SDXL pipeline folder with tokenizer/ and tokenizer_2/, or omit --base.")
    from ..bases import build_tokenizer

    with tempfile.TemporaryDirectory() as tmp:  # SDXL's two tokenizers differ only in their pad token
        return {"tokenizer": build_tokenizer(Path(tmp) / "t1", pad_token="<|endoftext|>"),
                "tokenizer_2": build_tokenizer(Path(tmp) / "t2", pad_token="!")}


def merge_rank(token_id: int, tokenizer) -> Optional[int]:
    """BPE merge rank of ``token_id`` (0 = most frequent merge); None for byte and special tokens."""
    if token_id < BYTE_TOKENS or token_id in tokenizer.all_special_ids:
        return None
    return token_id - BYTE_TOKENS


def inspect_word(word: str, tokenizer) -> dict:
    """How ``tokenizer`` splits ``word``: ids, pieces, merge ranks, whether it is one token.

    Args:
        word: identifier or class word (lower-cased by CLIP's tokenizer).
        tokenizer: a CLIP BPE tokenizer.
    """
    ids = tokenizer(word, add_special_tokens=False).input_ids
    pieces = tokenizer.convert_ids_to_tokens(ids)
    return {"word": word, "ids": ids, "pieces": pieces, "ranks": [merge_rank(i, tokenizer) for i in ids],
            "single_token": len(ids) == 1, "num_merges": len(tokenizer) - BYTE_TOKENS - 2}


def is_clean_single(body: str, token_id: int, tokenizers) -> bool:
    """``body`` encodes to exactly ``token_id`` alone and in a prompt, and decodes back to itself, everywhere."""
    for tok in tokenizers:
        if tok(body, add_special_tokens=False).input_ids != [token_id]:
            return False
        if tok.decode([token_id]).strip() != body:
            return False
        if token_id not in tok(f"a photo of {body} dog", add_special_tokens=False).input_ids:
            return False
    return True


def suggest_identifiers(tokenizers, num: int = 10, min_rank: int = 35000, lengths: tuple[int, int] = (3, 4),
                        class_name: Optional[str] = None) -> list[dict]:
    """Rare whole-word single tokens that decode cleanly and look like no common English word, rarest first.

    Args:
        tokenizers: the SDXL tokenizers (a candidate must be one clean token in each).
        num: how many to return.
        min_rank: lowest merge rank accepted (CLIP has 48,894 merges; higher = rarer).
        lengths: allowed letter counts (short, like the paper's "sks").
        class_name: the class word; candidates containing it (or contained in it) are skipped.
    A whole-word token is treated as an English word when the vocabulary also holds its inflections
    ("howl" with "howling") or its singular ("bays" with "bay"): frequent words get all their forms merged.
    """
    first = tokenizers[0]
    vocab = first.get_vocab()
    pattern = re.compile(rf"([a-z]{{{lengths[0]},{lengths[1]}}})</w>")
    cls = (class_name or "").lower()
    out = []
    for piece, tid in sorted(vocab.items(), key=lambda kv: -kv[1]):
        m = pattern.fullmatch(piece)
        rank = merge_rank(tid, first)
        if not m or rank is None or rank < min_rank:
            continue
        body = m.group(1)
        if any(f"{body}{s}</w>" in vocab for s in INFLECTIONS) or (body.endswith("s") and f"{body[:-1]}</w>" in vocab):
            continue
        if cls and (cls in body or body in cls):
            continue
        if not is_clean_single(body, tid, tokenizers):
            continue
        out.append({"token": body, "id": tid, "rank": rank})
        if len(out) >= num:
            break
    return out


def format_report(word: str, per_tokenizer: dict[str, dict], class_info: Optional[dict[str, dict]],
                  suggestions: list[dict], min_rank: int) -> str:
    """Plain-text report of :func:`check_token`."""
    lines = []
    for name, info in per_tokenizer.items():
        ranks = ", ".join("byte" if r is None else str(r) for r in info["ranks"])
        lines.append(f"{name}: {word!r} -> {len(info['ids'])} token(s) ids={info['ids']} pieces={info['pieces']} "
                     f"merge ranks=[{ranks}] of {info['num_merges']}")
    info = next(iter(per_tokenizer.values()))
    rank = info["ranks"][0] if info["single_token"] else None
    if not info["single_token"]:
        verdict = ("NOT a single token: the subject would be learnt on pieces that keep their own meanings; "
                   "pick one of the suggestions below.")
    elif rank is not None and rank >= min_rank:
        verdict = f"a single rare token (merge rank {rank} >= {min_rank}): a good identifier."
    else:
        verdict = (f"a single but frequent token (merge rank {rank} < {min_rank}): it carries a strong prior "
                   "the fine-tune has to overwrite.")
    lines.append(f"verdict: {word!r} is {verdict}")
    if class_info:
        for name, ci in class_info.items():
            lines.append(f"class {ci['word']!r} in {name}: ids={ci['ids']} pieces={ci['pieces']}"
                         + ("" if ci["single_token"] else "  (several tokens: fine, but a one-token class word "
                                                          "gives the prior a cleaner anchor)"))
    lines.append("suggested rare single-token identifiers (token, id, merge rank):")
    lines += [f"  {s['token']:<6} id={s['id']:<6} rank={s['rank']}" for s in suggestions]
    return "\n".join(lines)


def check_token(word: str, class_name: Optional[str] = None, base: Optional[str] = None, num_suggestions: int = 10,
                min_rank: int = 35000) -> str:
    """Show how SDXL's tokenizers split an identifier, how rare it is, and suggest rare single-token identifiers.

    Args:
        word: the identifier, e.g. ``rraj`` or ``sks``.
        class_name: the subject's class word (e.g. ``person``): its split is shown and suggestions avoid it.
        base: SDXL pipeline folder whose tokenizers to use (None: the offline CLIP BPE build; same ids).
        num_suggestions: how many identifiers to suggest.
        min_rank: merge rank from which a token counts as rare (CLIP has 48,894 merges).
    """
    if not word.strip() or any(c.isspace() for c in word.strip()):
        raise SystemExit(f"check-token: give one identifier without spaces, got {word!r}.")
    word = word.strip()
    toks = load_tokenizers(base)
    per = {name: inspect_word(word, t) for name, t in toks.items()}
    cls = {name: inspect_word(class_name, t) for name, t in toks.items()} if class_name else None
    sugg = suggest_identifiers(list(toks.values()), num_suggestions, min_rank, class_name=class_name)
    return format_report(word, per, cls, sugg, min_rank)
