"""check-token: splits and ids of both SDXL tokenizers, rarity verdicts, and suggestions that are single tokens."""
from __future__ import annotations

import pytest

from dreambooth_pl.tools.check_token import (check_token, inspect_word, load_tokenizers, merge_rank,
                                             suggest_identifiers)


@pytest.fixture(scope="module")
def toks():
    return load_tokenizers(None)


@pytest.fixture(scope="module")
def open_clip_tok():
    """open_clip's own BPE implementation: an independent reference for ids."""
    from open_clip.tokenizer import SimpleTokenizer

    return SimpleTokenizer()


def test_sks_is_one_known_token_in_both(toks, open_clip_tok):
    for tok in toks.values():
        info = inspect_word("sks", tok)
        assert info["ids"] == [48136] and info["pieces"] == ["sks</w>"] and info["single_token"]
        assert info["ranks"] == [48136 - 512]
    assert open_clip_tok.encode("sks") == [48136]


def test_rraj_splits_and_common_words_rank_low(toks, open_clip_tok):
    tok = toks["tokenizer_2"]
    info = inspect_word("rraj", tok)
    assert not info["single_token"] and info["ids"] == open_clip_tok.encode("rraj") == [81, 10813]
    assert info["ranks"][0] is None  # "r" is a byte token, not a merge
    assert merge_rank(inspect_word("dog", tok)["ids"][0], tok) < merge_rank(48136, tok)


def test_suggestions_are_rare_clean_single_tokens(toks, open_clip_tok):
    sugg = suggest_identifiers(list(toks.values()), num=8, min_rank=40000, class_name="dog")
    assert len(sugg) == 8 and len({s["token"] for s in sugg}) == 8
    vocab = toks["tokenizer"].get_vocab()
    for s in sugg:
        assert s["rank"] >= 40000 and 3 <= len(s["token"]) <= 4 and "dog" not in s["token"]
        assert open_clip_tok.encode(s["token"]) == [s["id"]]
        for tok in toks.values():
            assert tok(f"a photo of {s['token']} dog", add_special_tokens=False).input_ids[3] == s["id"]
            assert tok.decode([s["id"]]).strip() == s["token"]
        assert f"{s['token']}ing</w>" not in vocab and f"{s['token']}s</w>" not in vocab
    ranks = [s["rank"] for s in sugg]
    assert ranks == sorted(ranks, reverse=True)  # rarest first


def test_report_verdicts(monkeypatch, toks):
    import dreambooth_pl.tools.check_token as ct

    monkeypatch.setattr(ct, "load_tokenizers", lambda base=None: toks)  # skip a second offline build
    rare = check_token("sks", class_name="dog", num_suggestions=3)
    assert "ids=[48136]" in rare and "single rare token" in rare and "class 'dog'" in rare
    assert "NOT a single token" in check_token("rraj", num_suggestions=1)
    assert "frequent token" in check_token("dog", num_suggestions=1)
    with pytest.raises(SystemExit, match="without spaces"):
        check_token("sks dog")


def test_base_folder_tokenizers_match_offline_build(tiny_base, toks, tmp_path):
    from_base = load_tokenizers(tiny_base)
    for name in ("tokenizer", "tokenizer_2"):
        assert inspect_word("rraj", from_base[name])["ids"] == inspect_word("rraj", toks[name])["ids"]
    (tmp_path / "model_index.json").write_text("{}")  # a pipeline folder without tokenizers
    with pytest.raises(SystemExit, match="tokenizer/ and tokenizer_2/"):
        load_tokenizers(str(tmp_path))


def test_verb_takes_the_word_positionally(capsys):
    from dreambooth_pl.__main__ import main

    main(["check-token", "sks", "--class_name", "dog", "--num_suggestions", "2"])
    out = capsys.readouterr().out
    assert "'sks' -> 1 token(s) ids=[48136]" in out and out.count(" id=") == 2
