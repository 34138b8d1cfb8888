"""CUDA-graph replay of the UNet's forward and backward: one launch each instead of ~10k small kernels.

The frozen-base LoRA step is host-bound: the GPU idles while Python issues thousands of small adapter kernels
(BENCHMARKS.md profile). With pre-encoded inputs (``model.perf.cache``) and a fixed resolution every tensor of the UNet
call has a static shape, so its forward and backward can be captured once and replayed (NVIDIA, "CUDA Graphs";
the same idea as ``torch.cuda.make_graphed_callables``, written out here so that the warm-up's memory is returned
before capture and the adapters' gradients leave the graph as fresh tensors, which gradient accumulation needs).

The loss, the optimizer (8-bit Adam included), gradient scaling and clipping stay eager and unchanged; only the
UNet call is replayed, so Lightning's loop, resume, accumulation and the NaN guard work as before. A call whose
shapes differ from the captured ones runs eagerly.

:class:`GraphedForward` is the inference half alone: the prior sampler's UNet forward at its fixed batch shape.
"""
from __future__ import annotations

import time
import warnings
from typing import Callable, Sequence

import torch


class GraphedCall:
    """``fn(*inputs) -> Tensor`` replayed from a CUDA graph, differentiable w.r.t. ``params``.

    Args:
        fn: the eager call (the UNet on positional tensors), free of host syncs and data-dependent control flow.
        params: the trainable parameters ``fn`` reads (the adapters); their gradients come out of the graph.
        autocast_dtype: the mixed-precision dtype the trainer runs ``fn`` under (None: no autocast).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], params: Sequence[torch.nn.Parameter],
                 autocast_dtype: torch.dtype | None = None):
        self.fn, self.params, self.autocast_dtype = fn, tuple(params), autocast_dtype
        self.key = None
        self.fallbacks = 0
        self.replays = 0
        self.seconds: dict[str, float] = {}  # the capture's: its eager warm-up pass, the capture itself

    @staticmethod
    def signature(inputs: Sequence[torch.Tensor]) -> tuple:
        return tuple((x.shape, x.dtype, x.stride(), x.device) for x in inputs)

    def _autocast(self):
        # make_graphed_callables' rule: autocast's weight-cast cache would hold tensors from outside the graph
        return torch.autocast("cuda", dtype=self.autocast_dtype or torch.float16,
                              enabled=self.autocast_dtype is not None, cache_enabled=False)

    def capture(self, inputs: Sequence[torch.Tensor]) -> None:
        """Warm up once on a side stream, give its memory back, then capture forward and backward in one pool."""
        t = time.perf_counter()
        self.static_in = [x.detach().clone() for x in inputs]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), self._autocast():  # cuBLAS/cuDNN plans and lazy init happen outside capture
            out = self.fn(*self.static_in)
            torch.autograd.grad(out, self.params, torch.ones_like(out), allow_unused=True)
            del out
        torch.cuda.current_stream().wait_stream(stream)
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the warm-up's activations would otherwise stay cached beside the graph's pool
        self.seconds["warmup"], t = time.perf_counter() - t, time.perf_counter()
        self.fwd, self.bwd = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        pool = torch.cuda.graph_pool_handle()
        # thread_local: under DDP, NCCL's watchdog thread polls CUDA events during the capture; the default
        # "global" mode would count those calls against this capture and invalidate it
        mode = "thread_local"
        with torch.cuda.graph(self.fwd, pool=pool, stream=stream, capture_error_mode=mode), self._autocast():
            self.static_out = self.fn(*self.static_in)
        self.static_grad_out = torch.empty_like(self.static_out)
        with torch.cuda.graph(self.bwd, pool=pool, stream=stream, capture_error_mode=mode):
            grads = torch.autograd.grad(self.static_out, self.params, self.static_grad_out, allow_unused=True)
        self.static_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(self.params, grads)]
        torch.cuda.synchronize()
        self.seconds["capture"] = time.perf_counter() - t  # (the phases' first step: where its time goes)
        self.key = self.signature(inputs)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        if self.key is None:
            self.capture(inputs)
        if self.signature(inputs) != self.key:  # e.g. a last short batch: correct, just not replayed
            self.fallbacks += 1
            if self.fallbacks == 1:
                warnings.warn("model.perf.cuda_graph: a batch of another shape than the captured one ran eagerly "
                              f"({[tuple(x.shape) for x in inputs]}).", stacklevel=2)
            return self.fn(*inputs)
        self.replays += 1
        return _Replay.apply(self, *inputs, *self.params)


class _Replay(torch.autograd.Function):
    """Autograd node of one replay: forward copies the inputs in and replays; backward replays the gradient graph."""

    @staticmethod
    def forward(ctx, call: GraphedCall, *args: torch.Tensor) -> torch.Tensor:
        ctx.call = call
        for static, x in zip(call.static_in, args[:len(call.static_in)]):
            static.copy_(x)
        call.fwd.replay()
        return call.static_out.clone()  # the next replay overwrites the static output

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        call = ctx.call
        call.static_grad_out.copy_(grad_out)
        call.bwd.replay()
        # fresh tensors in a few multi-tensor kernels: autograd may keep a returned gradient as ``.grad``, and a
        # static buffer kept there would be overwritten by the next micro-batch's replay
        grads = torch._foreach_mul(call.static_grads, 1.0)
        return (None,) + (None,) * len(call.static_in) + tuple(grads)


class GraphedForward:
    """The SDXL UNet's inference forward at one input shape, captured once and replayed (no autograd state; the
    prior sampler's fixed batches). Inputs are copied into the captured buffers unless they already are them.

    The one warm-up forward (cuBLAS/cuDNN plans and Triton's compile happen outside the capture) runs on the
    inputs given here, and its output is :attr:`first`: the caller's first step, so the capture costs no forward
    of its own (three forwards at batch 16 and 1024² were ~0.8 s of the sampler's first batch)."""

    def __init__(self, unet, x: torch.Tensor, t: torch.Tensor, embeds: torch.Tensor, text: torch.Tensor,
                 time_ids: torch.Tensor):
        self.unet = unet
        self.x, self.t, self.embeds, self.text, self.time_ids = (v.clone() for v in (x, t, embeds, text, time_ids))
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up off the default stream, as torch.cuda.graphs asks before capture
            self.first = self._forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.first.record_stream(torch.cuda.current_stream())  # made on the side stream, read on this one
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = self._forward()

    def _forward(self) -> torch.Tensor:
        return self.unet(self.x, self.t, encoder_hidden_states=self.embeds,
                         added_cond_kwargs={"text_embeds": self.text, "time_ids": self.time_ids}, return_dict=False)[0]

    def __call__(self, x, t, embeds, text, time_ids) -> torch.Tensor:
        for buf, v in ((self.x, x), (self.t, t), (self.embeds, embeds), (self.text, text), (self.time_ids, time_ids)):
            if buf.data_ptr() != v.data_ptr():
                buf.copy_(v)
        self.graph.replay()
        return self.out
