"""perf.py: each switch keeps the maths (outputs and LoRA gradients) and does what it names, on a tiny UNet."""
from __future__ import annotations

import pytest
import torch

from dreambooth_pl import perf
from dreambooth_pl.adapter.kinds import add_adapter, peft_config


@pytest.fixture(scope="module")
def unet(tiny_base):
    from diffusers import UNet2DConditionModel

    model = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet").requires_grad_(False)
    add_adapter(model, "lora", peft_config("lora", 4, init=False))
    return model


def _inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    cfg = unet.config
    return dict(sample=torch.randn(2, 4, 8, 8, generator=g), timestep=torch.tensor([10, 500]),
                encoder_hidden_states=torch.randn(2, 77, cfg.cross_attention_dim, generator=g),
                added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)})


def _loss_and_grads(unet, inputs):
    for p in unet.parameters():
        p.grad = None
    out = unet(**inputs).sample
    out.pow(2).mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in unet.named_parameters() if p.requires_grad}


def test_checkpointing_every_k_keeps_gradients(unet):
    inputs = _inputs(unet)
    assert perf.set_checkpointing(unet, 0) == 0
    ref_out, ref_grads = _loss_and_grads(unet, inputs)
    n_blocks = len(perf.blocks_of(unet, perf.CHECKPOINT_BLOCKS))
    assert perf.set_checkpointing(unet, 2) == n_blocks // 2
    assert not unet.is_gradient_checkpointing
    out, grads = _loss_and_grads(unet, inputs)
    torch.testing.assert_close(out, ref_out)
    for n in ref_grads:
        torch.testing.assert_close(grads[n], ref_grads[n], rtol=1e-5, atol=1e-7)
    assert perf.set_checkpointing(unet, 1) == n_blocks and unet.is_gradient_checkpointing
    assert not any(getattr(m.forward, "checkpointed", False) for m in perf.blocks_of(unet))  # every-k undone
    _, grads = _loss_and_grads(unet, inputs)
    torch.testing.assert_close(grads[next(iter(grads))], ref_grads[next(iter(grads))], rtol=1e-5, atol=1e-7)
    perf.set_checkpointing(unet, 0)
    assert not unet.is_gradient_checkpointing
    with pytest.raises(ValueError, match="checkpoint every"):
        perf.set_checkpointing(unet, -1)


def test_compile_blocks_matches_eager(tiny_base, unet):
    import copy

    compiled = copy.deepcopy(unet)
    n = perf.compile_blocks(compiled, backend="eager")  # dynamo tracing of peft blocks, no C++ toolchain needed
    assert n == len(perf.blocks_of(unet)) > 0
    inputs = _inputs(unet, seed=1)
    ref_out, ref_grads = _loss_and_grads(unet, inputs)
    out, grads = _loss_and_grads(compiled, inputs)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-6)


def test_attention_backend_and_channels_last(unet):
    inputs = _inputs(unet, seed=2)
    with torch.no_grad():
        ref = unet(**inputs).sample
        with perf.attention_context("math"):
            math = unet(**inputs).sample
    torch.testing.assert_close(math, ref, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="attention backend"):
        perf.attention_context("fastest")
    import copy

    nhwc = perf.to_channels_last(copy.deepcopy(unet))
    assert nhwc.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = nhwc(**{**inputs, "sample": inputs["sample"].contiguous(memory_format=torch.channels_last)}).sample
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_keep_lora_inputs_half_under_autocast(unet):
    import copy

    half = copy.deepcopy(unet).to(torch.bfloat16)
    for p in half.parameters():
        if p.requires_grad:
            p.data = p.data.float()  # adapters stay fp32, as kinds.add_adapter leaves them
    inputs = _inputs(unet, seed=3)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        ref = half(**inputs).sample.float()
        assert perf.keep_lora_inputs_half(half) == sum(hasattr(m, "cast_input_dtype_enabled") for m in half.modules())
        out = half(**inputs).sample.float()
    assert all(not m.cast_input_dtype_enabled for m in half.modules() if hasattr(m, "cast_input_dtype_enabled"))
    torch.testing.assert_close(out, ref, rtol=0.05, atol=0.05)  # bf16 rounding of the adapter input only


def test_ddp_ignores_the_frozen_base(unet):
    """DDP wraps only the adapters: the frozen weights and every buffer are left out of its start-up broadcast
    and per-step buffer sync (so encoders parked on the CPU by caching need no strategy flag)."""
    import socket

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    unet.register_buffer("parked", torch.zeros(3))  # stands for a cached-away encoder's buffer
    try:
        n = perf.ddp_ignore_frozen(unet)
        frozen = {name for name, p in unet.named_parameters() if not p.requires_grad}
        assert set(unet._ddp_params_and_buffers_to_ignore) == frozen | {"parked"} and n == len(frozen) + 1
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
        try:
            ddp = DistributedDataParallel(unet)
            trainable = [p for p in unet.parameters() if p.requires_grad]
            assert len(ddp._module_parameters) == len(trainable)
            assert not ddp.modules_buffers  # nothing to broadcast before each forward
        finally:
            dist.destroy_process_group()
    finally:
        del unet._buffers["parked"]
        del unet._ddp_params_and_buffers_to_ignore
