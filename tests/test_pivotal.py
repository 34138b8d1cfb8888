"""Pivotal tuning (pivotal.py): the new rows alone train, exact resume, and an oracle against diffusers' advanced
SDXL script (its ``TokenEmbeddingsHandler``, copied into advanced_script_oracle.py)."""
from __future__ import annotations

import signal
from pathlib import Path

import lightning as L
import pytest
import torch
from advanced_script_oracle import TokenEmbeddingsHandler
from conftest import fit_args, make_subject_dirs
from safetensors.torch import load_file
from test_faults import SendSignal

from dreambooth_pl.callbacks.fault_tolerance import StoppedBySignal
from dreambooth_pl.cli import DreamBoothCLI
from dreambooth_pl.module import DreamBoothLoRA
from dreambooth_pl.pivotal import PivotalSettings, PivotalTokens, TokenRows, rewrite, token_table
from dreambooth_pl.sampling import SamplerSettings

PROMPT = "a photo of sks dog"  # fit_args' instance prompt
PIVOTAL = {"model.pivotal.identifier": "sks", "model.pivotal.learning_rate": 1e-2}


class RecordRows(L.Callback):
    """The first encoder's new rows after every optimizer step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.seen.append(token_table(pl_module.text_encoder).rows.detach().clone())


def _text_parts(base: str):
    from dreambooth_pl.sdxl import load_parts

    parts = load_parts(base)
    return [parts.tokenizer, parts.tokenizer_2], [parts.text_encoder, parts.text_encoder_2]


def test_initialisation_and_renormalisation_equal_the_advanced_script(tiny_base):
    tokenizers, encoders = _text_parts(tiny_base)
    torch.manual_seed(7)
    oracle = TokenEmbeddingsHandler(encoders, tokenizers)
    oracle.initialize_new_tokens(["<s0>", "<s1>"])
    ours_tok, ours_enc = _text_parts(tiny_base)
    state = torch.random.get_rng_state()
    ours = PivotalTokens(PivotalSettings("sks"), ours_tok, ours_enc, seed=7)
    assert torch.equal(torch.random.get_rng_state(), state)  # seeded on its own: the LoRA init draws as before
    for i in range(2):  # the same ids, std and whole resized table, bit for bit
        assert ours_tok[i].convert_tokens_to_ids(["<s0>", "<s1>"]) == oracle.train_ids
        assert torch.equal(ours.std[i], oracle.embeddings_settings[f"std_token_embedding_{i}"])
        assert torch.equal(token_table(ours_enc[i]).weight, token_table(encoders[i]).weight)
    ours.attach()
    gen = torch.Generator().manual_seed(1)
    for step in range(3):  # an update of the whole table (what the script's AdamW does), then the restoration
        for i in range(2):
            table = token_table(encoders[i]).weight
            delta = torch.randn(table.shape, generator=gen) * 0.05
            table.data -= delta
            ours.layers[i].rows.data -= delta[ours.first[i]:]
        oracle.retract_embeddings()
        ours.renormalise()
        for i in range(2):
            assert torch.equal(ours.layers[i].merged(), token_table(encoders[i]).weight), (step, i)


def test_token_rows_read_the_new_rows_from_their_parameter_and_the_rest_from_the_table():
    table = torch.nn.Embedding(6, 3).requires_grad_(False)
    rows = torch.randn(2, 3)
    layer = TokenRows(table.half(), 4, rows)
    ids = torch.tensor([[0, 4, 5, 4, 3]])
    out = layer(ids)
    assert out.dtype == torch.float16 and torch.equal(out[0, 1:4], rows[[0, 1, 0]].half())
    assert torch.equal(out[0, [0, 4]], table.weight[[0, 3]])
    out.sum().backward()
    assert torch.equal(layer.rows.grad, torch.tensor([[2.0] * 3, [1.0] * 3]))


def test_under_mixed_precision_the_rows_start_from_the_fp32_tables(tiny_base):
    """The base loads straight into bf16, but the text encoders load in fp32 for the init (as the script does) and
    are cast after: the run's initial rows are the fp32 tables' bit for bit, and the encoders train in bf16."""
    module = DreamBoothLoRA(base_model=tiny_base, pivotal={"identifier": "sks"})
    module.trainer = L.Trainer(accelerator="cpu", precision="bf16-mixed", logger=False)
    module.configure_model()
    fresh = PivotalTokens(PivotalSettings("sks"), *_text_parts(tiny_base), seed=0)
    fresh.attach()
    for enc, layer in zip((module.text_encoder, module.text_encoder_2), fresh.layers):
        assert token_table(enc).table.weight.dtype == torch.bfloat16 and torch.equal(token_table(enc).rows, layer.rows)
    assert module.unet.dtype == torch.bfloat16


def test_the_pivot_sets_the_rows_learning_rate_to_zero_from_its_step(tiny_base):
    pivotal = PivotalTokens(PivotalSettings("sks", train_fraction=0.5), *_text_parts(tiny_base), seed=0)
    pivotal.attach()
    other = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.AdamW([{"params": [other], "lr": 1.0}, pivotal.param_group()])
    assert opt.param_groups[1]["lr"] == 3e-4 and opt.param_groups[1]["weight_decay"] == 1e-4  # the defaults
    pivotal.pivot(opt, 4, 10)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 3e-4]
    pivotal.pivot(opt, 5, 10)
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.0]


def test_rewrite_replaces_whole_words_only():
    assert rewrite("a photo of sks dog, sks.", "sks", ["<s0>", "<s1>"]) == "a photo of <s0><s1> dog, <s0><s1>."
    assert rewrite("tasks of sks_b", "sks", ["<s0>"]) == "tasks of sks_b"


@pytest.mark.parametrize("over, key", [({"identifier": "two words"}, "identifier"), ({"num_tokens": 0}, "num_tokens"),
                                       ({"train_fraction": 0}, "train_fraction"),
                                       ({"learning_rate": 0}, "learning_rate")])
def test_settings_name_the_bad_key(over, key):
    with pytest.raises(ValueError, match=f"model.pivotal.{key}"):
        PivotalSettings(**{"identifier": "sks", **over})


@pytest.mark.parametrize("over, key", [({"lora": {"train_text_encoder": True}}, "train_text_encoder"),
                                       ({"perf": {"cache": "all"}}, "cache=latents"),
                                       ({"perf": {"cuda_graph": True}}, "cuda_graph: false")])
def test_combinations_that_cannot_work_are_refused_before_loading(over, key):
    with pytest.raises(ValueError, match=key):
        DreamBoothLoRA(base_model="never-loaded", pivotal={"identifier": "sks"}, **over)


def test_identifier_missing_from_the_prompt_is_refused(tiny_base, subject_dirs, tmp_path):
    args = fit_args(tiny_base, *subject_dirs, str(tmp_path), **{"model.pivotal.identifier": "rraj"})
    with pytest.raises(ValueError, match="not a word of data.photos.prompt"):
        DreamBoothCLI(args=args)


@pytest.fixture(scope="module")
def trained(tiny_base, tmp_path_factory):
    """A 5-step fit with pivotal tuning (rows train every step) on cached latents: (cli, run folder)."""
    work = tmp_path_factory.mktemp("pivotal")
    cli = DreamBoothCLI(args=fit_args(tiny_base, *make_subject_dirs(work), str(work / "run"),
                                      steps=5, **PIVOTAL, **{"model.pivotal.train_fraction": 1.0,
                                                             "model.perf.cache": "latents"}))
    return cli, work / "run" / "lightning_logs" / "version_0"


def test_only_the_new_rows_change_in_five_steps(tiny_base, trained):
    cli, run = trained
    model = cli.model
    _, base_encoders = _text_parts(tiny_base)
    fresh = PivotalTokens(PivotalSettings("sks"), *_text_parts(tiny_base), seed=0)  # the run's initial rows
    fresh.attach()
    for i, (enc, base) in enumerate(zip((model.text_encoder, model.text_encoder_2), base_encoders)):
        layer = token_table(enc)
        table, vocab = layer.merged(), token_table(base).weight
        assert table.shape[0] == vocab.shape[0] + 2 and layer.first == vocab.shape[0]
        assert torch.equal(table[:layer.first], vocab)  # every old row bit-identical
        assert (layer.rows - fresh.layers[i].rows).abs().max() > 1e-3  # the new rows trained
        others = {k: v for k, v in enc.state_dict().items() if "token_embedding" not in k}
        assert all(torch.equal(v, base.state_dict()[k]) for k, v in others.items())  # the rest of the encoder too
    assert model.trainer.datamodule.cache is not None  # latents cached; the prompts are encoded every step
    assert model.trainer.datamodule.cache.text == {}
    saved = load_file(run / f"{run.name}_emb.safetensors")
    assert torch.equal(saved["clip_l"], token_table(model.text_encoder).rows.detach())
    assert torch.equal(saved["clip_g"], token_table(model.text_encoder_2).rows.detach())


def test_the_class_prompt_is_cached_and_the_identifier_prompt_has_gradients(trained):
    model = trained[0].model
    emb, pooled = model.encode_text([PROMPT, "a photo of dog"])
    assert emb.requires_grad and "a photo of dog" in model._prompt_cache
    assert "a photo of <s0><s1> dog" not in model._prompt_cache
    emb[0].sum().backward()
    assert token_table(model.text_encoder).rows.grad.abs().sum() > 0


def test_the_pivot_stops_the_rows_and_resume_is_bit_exact(tiny_base, subject_dirs, tmp_path):
    """4 steps, rows train for the first 2 (train_fraction 0.5); a run stopped by SIGTERM in step 1 and resumed
    ends with the uninterrupted run's LoRA and embeddings, bit for bit."""
    over = dict(PIVOTAL, **{"data.crops.flip": 0.5})
    ref = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(tmp_path / "reference"), steps=4, **over)[1:],
                        run=False)
    rows = RecordRows()
    ref.trainer.callbacks.insert(0, rows)
    ref.trainer.fit(ref.model, ref.datamodule)
    std = ref.model.pivotal.std[0]
    for step in range(1, 4):  # before the pivot the rows learn; after it only the renormalisation moves them
        renormalised = rows.seen[step - 1] * (std / rows.seen[step - 1].std()) ** 0.1
        assert torch.allclose(rows.seen[step], renormalised, rtol=0, atol=1e-7) == (step >= 2), step
    stopped = tmp_path / "stopped"
    cli = DreamBoothCLI(args=fit_args(tiny_base, *subject_dirs, str(stopped), steps=4, **over)[1:], run=False)
    cli.trainer.callbacks.insert(0, SendSignal(1, signal.SIGTERM))
    with pytest.raises(StoppedBySignal):
        cli.trainer.fit(cli.model, cli.datamodule)
    config = stopped / "lightning_logs" / "version_0" / "config.yaml"
    DreamBoothCLI(args=["fit", "--config", str(config), "--ckpt_path", "last"])
    for name in ("pytorch_lora_weights.safetensors", "version_0_emb.safetensors"):
        a, b = (load_file(Path(r) / "lightning_logs" / "version_0" / name) for r in (tmp_path / "reference", stopped))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    groups = ref.trainer.optimizers[0].param_groups
    assert groups[-1]["params"][0] is token_table(ref.model.text_encoder).rows and groups[-1]["lr"] == 1e-2


def test_export_verb_writes_the_checkpoints_rows_beside_the_lora(trained, tmp_path):
    from dreambooth_pl.tools.export import export

    _, run = trained
    export(str(run / "checkpoints" / "last.ckpt"), str(tmp_path / "out" / "subject.safetensors"))
    a, b = load_file(tmp_path / "out" / "out_emb.safetensors"), load_file(run / f"{run.name}_emb.safetensors")
    assert a.keys() == b.keys() == {"clip_l", "clip_g"} and all(torch.equal(a[k], b[k]) for k in a)
    lora = load_file(tmp_path / "out" / "subject.safetensors")
    assert lora.keys() == load_file(run / "pytorch_lora_weights.safetensors").keys()


def test_training_grids_draw_the_identifier_as_its_tokens(trained):
    from dreambooth_pl.callbacks.sample_grid import SampleGrid
    from dreambooth_pl.sampling import generate, pipeline_from_module

    model = trained[0].model
    grid = SampleGrid([PROMPT], sampler=SamplerSettings(steps=2), resolution=32, log_base=False)
    drawn = torch.tensor(list(grid.draw(None, model)[0].getdata()), dtype=torch.float)
    with torch.no_grad():
        pipe = pipeline_from_module(model)
        direct, plain = (torch.tensor(list(generate(pipe, [p], [grid.seed], 2, grid.sampler.guidance, None, 32, 32)[0]
                                           .getdata()), dtype=torch.float)
                         for p in (model.pivotal.rewrite(PROMPT), PROMPT))
    assert torch.equal(drawn, direct) and (drawn - plain).abs().mean() > 1


def test_auto_memory_plan_keeps_the_text_encoders_and_runs_eagerly():
    from dreambooth_pl import memory_plan as mp
    from dreambooth_pl.data.datamodule import DataShape
    from dreambooth_pl.settings import LoraSettings, PerfSettings, graph_blockers

    auto, h200, shape = PerfSettings(memory_plan="auto"), mp.Target("cuda", 139.0, half=True), DataShape(1024, 2)
    lines = []
    speed = mp.resolve_perf(auto, LoraSettings(), shape, h200, 5.06, lines.append, pivotal=True)
    assert (speed.cache, speed.cuda_graph) == ("latents", False) and "eager" in lines[0]
    without = mp.resolve_perf(auto, LoraSettings(), shape, h200, 5.06)
    assert (without.cache, without.cuda_graph) == ("all", True)  # the same run without pivotal: leanest and graphed
    assert graph_blockers(LoraSettings(), auto, pivotal=True) == ["model.pivotal"]
