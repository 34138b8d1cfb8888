"""make-base: the SDXL folder layout, loadable by diffusers, the real SDXL sizes, open_clip-identical tokenizers."""
import json
from pathlib import Path

import pytest
import torch

from dreambooth_pl.bases import build_components, make_base

LAYOUT = {"model_index.json", "unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2",
          "scheduler"}
PROMPTS = ["a photo of sks dog", "A photo of rraj person, wearing a red hat", "a sks dog  in the jungle... 4k, 'HDR'",
           "it's a rraj's backpack on top of pink fabric", "café naïve – émoji 🐶 résumé, 1024x1024",
           "a " + "very " * 100 + "long prompt that open_clip truncates"]


def test_make_base_writes_the_sdxl_layout_loadable_by_diffusers(tiny_base):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    assert LAYOUT <= {p.name for p in Path(tiny_base).iterdir()}
    index = json.loads((Path(tiny_base) / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert list((Path(tiny_base) / "unet").glob("*.safetensors"))
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_base)
    assert isinstance(pipe.scheduler, EulerDiscreteScheduler)
    unet = pipe.unet.config
    assert unet.addition_embed_type == "text_time" and len(unet.block_out_channels) == 3
    assert unet.cross_attention_dim == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    assert unet.projection_class_embeddings_input_dim == (6 * unet.addition_time_embed_dim
                                                          + pipe.text_encoder_2.config.projection_dim)
    assert pipe.vae_scale_factor == 8
    # the real SDXL pads tokenizer with <|endoftext|> and tokenizer_2 with "!" (id 0)
    assert (pipe.tokenizer.pad_token_id, pipe.tokenizer_2.pad_token_id) == (49407, 0)
    assert len(pipe.tokenizer) == len(pipe.tokenizer_2) == 49408


def test_make_base_reuses_a_complete_folder_and_is_a_command(tiny_base):
    from dreambooth_pl.__main__ import main

    stamp = (Path(tiny_base) / "unet" / "config.json").stat().st_mtime_ns
    assert make_base("tiny", tiny_base) == tiny_base
    main(["make-base", "--preset", "tiny", "--out", tiny_base])
    assert (Path(tiny_base) / "unet" / "config.json").stat().st_mtime_ns == stamp
    with pytest.raises(SystemExit):  # jsonargparse rejects an unknown preset before building anything
        main(["make-base", "--preset", "huge", "--out", tiny_base])


def test_random_base_never_replaces_a_folder_it_did_not_build(tmp_path, monkeypatch):
    """``random_base`` with ``base_model`` at a user's folder deleted it and trained on noise; now it is refused."""
    from dreambooth_pl.module import DreamBoothLoRA

    user = tmp_path / "v"
    (user / "sub").mkdir(parents=True)
    (user / "thesis.txt").write_text("years of work")
    with pytest.raises(ValueError, match=r"model\.base_model .* exists but is not a diffusers pipeline folder"):
        DreamBoothLoRA(base_model=str(user), random_base="tiny").prepare_data()
    with pytest.raises(ValueError, match="--out .*not a diffusers pipeline folder"):
        make_base("tiny", str(user))
    monkeypatch.chdir(user)
    with pytest.raises(OSError, match="current folder"):
        make_base("tiny", str(tmp_path), overwrite=True)  # overwrite never reaches a folder holding the cwd
    assert (user / "thesis.txt").read_text() == "years of work" and (user / "sub").is_dir()


def test_random_base_refuses_hub_ids_and_says_it_is_random(tiny_base, tmp_path, monkeypatch):
    """A random base at ``stabilityai/...`` was later loaded as the real model; now it cannot be built there, and
    loading any random base warns, once."""
    from dreambooth_pl.sdxl import RandomBaseWarning, resolve_base

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="reads as a Hugging Face hub id"):
        make_base("tiny", "stabilityai/stable-diffusion-xl-base-1.0")
    assert not (tmp_path / "stabilityai").exists()
    monkeypatch.setattr("dreambooth_pl.sdxl._WARNED_RANDOM", set())  # other tests of this process loaded it already
    with pytest.warns(RandomBaseWarning, match="RANDOM weights"):
        resolve_base(tiny_base)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RandomBaseWarning)
        resolve_base(tiny_base)  # once per base and process: the priors, the model and the grids all ask


def test_sdxl_preset_has_the_real_parameter_counts():
    with torch.device("meta"):  # sizes without allocating 14 GB
        parts = build_components("sdxl")
    counts = {k: round(sum(p.numel() for p in parts[k].parameters()) / 1e6, 1) for k in ("unet", "text_encoder", "text_encoder_2", "vae")}
    assert counts == {"unet": 2567.5, "text_encoder": 123.1, "text_encoder_2": 694.7, "vae": 83.7}
    assert parts["unet"].config.transformer_layers_per_block == [1, 2, 10]


def test_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown base preset 'huge'"):
        build_components("huge")


@pytest.mark.parametrize("subfolder", ["tokenizer", "tokenizer_2"])
def test_tokenizers_give_open_clip_ids(tiny_base, subfolder):
    import open_clip
    from transformers import AutoTokenizer

    from dreambooth_pl.sdxl import tokenize

    tok = AutoTokenizer.from_pretrained(tiny_base, subfolder=subfolder)
    ours, ref = tokenize(tok, PROMPTS), open_clip.tokenize(PROMPTS)
    assert ours.shape == ref.shape == (len(PROMPTS), 77)
    if subfolder == "tokenizer":  # open_clip pads with 0, CLIP-L's tokenizer with <|endoftext|> like SDXL's
        ref = torch.where((ref == 0) & (torch.arange(77) > 0), torch.full_like(ref, 49407), ref)
    assert torch.equal(ours, ref)
    assert ours[-1, -1] == 49407  # truncated prompts still end with <|endoftext|>


def test_tokenizer_2_keeps_the_real_sdxl_exclamation_quirk(tiny_base):
    """SDXL's tokenizer_2 makes its pad token "!" special, so a "!" is id 0 where open_clip has 256
    (diffusers issue 4153); we reproduce the real tokenizer, which the released base was used with."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_base, subfolder="tokenizer_2")
    assert tok("hat!").input_ids == [49406, 3801, 0, 49407]


def test_an_unwritable_base_folder_names_the_option(tmp_path):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    with pytest.raises(OSError, match=r"could not write .*afile/base.*choose another model\.base_model"):
        from dreambooth_pl.bases import build_random_base

        build_random_base("tiny", str(blocker / "base"))
