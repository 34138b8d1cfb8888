"""Where a CUDA-graph capture of the LoRA UNet step spends memory, against the eager step (diagnostic, GPU only).

    python benchmarks/graph_memory.py BASE [checkpoint_every ...]

Prints, per checkpointing setting: the eager fwd+bwd peak, then for dreambooth_pl.graphs.GraphedCall and for
torch.cuda.make_graphed_callables the reserved memory after capture and the graph pool's segments (total vs
active bytes: a pool much larger than its active bytes did not reuse memory freed during capture).
"""
from __future__ import annotations

import sys

import torch

from dreambooth_pl.adapter import kinds
from dreambooth_pl import perf
from dreambooth_pl.graphs import GraphedCall
from dreambooth_pl.sdxl import load_parts

GIB = 2**30


def pools() -> str:
    by_pool: dict = {}
    for seg in torch.cuda.memory_snapshot():
        pool = seg.get("segment_pool_id", (0, 0))
        tot, act, n = by_pool.get(pool, (0, 0, 0))
        by_pool[pool] = (tot + seg["total_size"], act + seg["active_size"], n + 1)
    return "; ".join(f"pool {p}: {t / GIB:.2f} GiB in {n} segs, {a / GIB:.2f} active" for p, (t, a, n)
                     in by_pool.items())


def mem(tag: str) -> None:
    torch.cuda.synchronize()
    print(f"  {tag:<28} alloc {torch.cuda.memory_allocated() / GIB:6.2f}  reserved "
          f"{torch.cuda.memory_reserved() / GIB:6.2f}  max_reserved {torch.cuda.max_memory_reserved() / GIB:6.2f}",
          flush=True)


def main(base: str, everys: list[int]) -> None:
    parts = load_parts(base)
    unet = parts.unet.to("cuda", torch.float16)
    kinds.add_adapter(unet, "lora", kinds.peft_config("lora", 4, 4, 0.0, kinds.UNET_TARGETS, "gaussian"))
    unet.cuda()
    perf.keep_lora_inputs_half(unet)
    params = [p for p in unet.parameters() if p.requires_grad]
    gen = torch.Generator("cuda").manual_seed(0)
    inputs = (torch.randn(2, 4, 128, 128, device="cuda", generator=gen), torch.tensor([10, 900], device="cuda"),
              torch.randn(2, 77, 2048, device="cuda", generator=gen).half(),
              torch.randn(2, 1280, device="cuda", generator=gen).half(),
              torch.tensor([[1024, 1024, 0, 0, 1024, 1024]] * 2, device="cuda", dtype=torch.float32))

    def fn(x, t, emb, pooled, ids):
        return unet(x, t, encoder_hidden_states=emb, added_cond_kwargs={"text_embeds": pooled, "time_ids": ids}).sample

    class Wrapped(torch.nn.Module):  # make_graphed_callables takes a module's parameters() as its grad inputs
        def __init__(self):
            super().__init__()
            self.adapters = torch.nn.ParameterList(params)

        def forward(self, *a):
            return fn(*a)

    for every in everys:
        perf.set_checkpointing(unet, every, preserve_rng_state=False)
        print(f"checkpoint_every={every}", flush=True)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        mem("start")

        def step(call, tag: str, cache_enabled: bool = True) -> None:
            """One forward + backward of ``call()``'s result under fp16 autocast; memory after; grads and cache freed."""
            graphed = call()  # held until the pools are read: a freed graph gives its pool back
            with torch.autocast("cuda", dtype=torch.float16, cache_enabled=cache_enabled):
                out = graphed(*inputs)
                out.float().pow(2).mean().backward()
            del out
            mem(tag)
            if tag != "eager fwd+bwd":
                print("  " + pools(), flush=True)
            del graphed
            for p in params:
                p.grad = None
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()

        step(lambda: fn, "eager fwd+bwd")
        step(lambda: GraphedCall(fn, params, torch.float16), "GraphedCall captured")
        mem("graph freed")
        # make_graphed_callables refuses autocast's weight-cast cache
        step(lambda: torch.cuda.make_graphed_callables(Wrapped(), inputs, num_warmup_iters=1),
             "make_graphed_callables", cache_enabled=False)

if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]] or [1])
