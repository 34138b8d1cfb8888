"""The UNet's GroupNorms as group_norm_kernel.py's Triton kernels: each resnet's ``+ temb``, norm and SiLU in one
read-read-write (forward; the backward recomputes the norm from the input), and a channels_last (NHWC) UNet
without layout copies. The prior sampler draws with them; ``model.perf.fused_norms`` trains with them.

- :func:`fuse_norms` routes every ``nn.GroupNorm`` and diffusers ``ResnetBlock2D`` of a model through the kernels.
  A resnet's ``norm1 → SiLU`` and ``+ temb → norm2 → SiLU`` become one kernel call each (eager: four and five
  passes over the activation, the ``temb`` add broadcast and not vectorised), and its ``/ output_scale_factor``
  is skipped where the factor is 1 (SDXL's: a full pass that divides by one).
- With the UNet in channels_last (``to_nhwc``), the convolutions read and write NHWC as cuDNN's Hopper kernels
  want (no ``nchwToNhwc`` conversions), the norms keep NHWC, each ``Transformer2DModel``'s ``proj_in`` reads its
  input as a view, and its output is added to the residual in NHWC without the ``.contiguous()`` copy back to NCHW.

Where a norm's own weight or bias wants a gradient, on a CPU, inside compiled code, or for an input the kernels
do not take, each module runs diffusers' own forward. :func:`unfuse_norms` restores the modules; weights are
never touched.
"""
from __future__ import annotations

import types
import warnings

import torch
import torch.nn.functional as F

_kernel_failed: list[str] = []  # the first launch's error, where Triton could not build the kernels here


def uses_kernel(device: torch.device) -> bool:
    """Whether the norms run as the Triton kernels on ``device`` (a GPU with Triton; block_ops' rule)."""
    from .block_ops import uses_kernel as geglu_kernel_runs

    return geglu_kernel_runs(device) and not _kernel_failed


def stopped() -> bool:
    """Whether the kernels stopped in this process after a failed Triton launch (the norms' own, or the GEGLU's,
    whose rule :func:`uses_kernel` follows): what ran since is PyTorch's norms, which a cache key naming the
    kernels does not describe."""
    from . import block_ops

    return bool(_kernel_failed or block_ops._kernel_failed)


def _takes(x: torch.Tensor, *params) -> bool:
    """Whether the kernels take this call: a floating tensor on a kernel device, and no gradient wanted for the
    norms' own ``params`` (the kernels' backward gives the input's and the add's only)."""
    if torch.is_grad_enabled() and any(p is not None and p.requires_grad for p in params):
        return False
    if torch.compiler.is_compiling() or not x.is_floating_point() or x.dim() not in (3, 4) \
            or not uses_kernel(x.device):
        return False
    from .group_norm_kernel import flat_strides  # (imports Triton: only where the kernels run)

    return flat_strides(x) is not None


def _norm(norm: torch.nn.GroupNorm, x: torch.Tensor, add=None, silu: bool = False) -> torch.Tensor:
    """``silu?(norm(x + add))`` through the kernels where they take it, else eagerly (the same formula)."""
    if _takes(x, norm.weight, norm.bias):
        from . import group_norm_kernel

        try:
            return group_norm_kernel.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps, add, silu)
        except torch.OutOfMemoryError:
            raise
        except Exception as err:  # a Triton that cannot build the kernels: eager norms, not a failed draw
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                raise
            _kernel_failed.append(str(err))
            warnings.warn(f"fused norms: the Triton GroupNorm kernels failed ({str(err).splitlines()[0][:200]}); "
                          "the norms run eagerly.", stacklevel=2)
    if add is not None:
        x = x + add.reshape(*add.shape[:2], *(1,) * (x.dim() - 2))
    y = F.group_norm(x, norm.num_groups, norm.weight, norm.bias, norm.eps)
    return F.silu(y) if silu else y


def _group_norm_forward(self, x: torch.Tensor) -> torch.Tensor:
    return _norm(self, x)


def _fusable(block) -> bool:
    """A resnet whose forward :func:`_resnet_forward` reproduces: GroupNorms, SiLU, ``temb`` added before norm2."""
    return isinstance(block.norm1, torch.nn.GroupNorm) and isinstance(block.norm2, torch.nn.GroupNorm) \
        and isinstance(block.nonlinearity, torch.nn.SiLU) and block.time_embedding_norm == "default"


def _resnet_forward(self, input_tensor: torch.Tensor, temb, *args, **kwargs) -> torch.Tensor:
    """diffusers' ``ResnetBlock2D.forward`` (time_embedding_norm "default") with the norms fused."""
    if args or kwargs or not _takes(input_tensor, self.norm1.weight, self.norm1.bias, self.norm2.weight,
                                    self.norm2.bias):
        return type(self).forward(self, input_tensor, temb, *args, **kwargs)
    hidden_states = _norm(self.norm1, input_tensor, silu=True)
    if self.upsample is not None:
        if hidden_states.shape[0] >= 64:  # diffusers' guard: upsample_nearest_nhwc fails with large batches
            input_tensor, hidden_states = input_tensor.contiguous(), hidden_states.contiguous()
        input_tensor, hidden_states = self.upsample(input_tensor), self.upsample(hidden_states)
    elif self.downsample is not None:
        input_tensor, hidden_states = self.downsample(input_tensor), self.downsample(hidden_states)
    hidden_states = self.conv1(hidden_states)
    if self.time_emb_proj is not None:
        temb = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
    if temb is not None and temb.numel() != hidden_states.shape[0] * hidden_states.shape[1]:
        hidden_states, temb = hidden_states + temb.reshape(*temb.shape[:2], 1, 1), None  # a broadcast one: eager
    hidden_states = _norm(self.norm2, hidden_states, add=temb, silu=True)
    hidden_states = self.conv2(self.dropout(hidden_states))
    if self.conv_shortcut is not None:
        input_tensor = self.conv_shortcut(input_tensor)
    out = input_tensor + hidden_states
    return out if self.output_scale_factor == 1 else out / self.output_scale_factor


def _transformer_output(self, hidden_states, residual, batch_size, height, width, inner_dim):
    """``Transformer2DModel``'s linear-projection output added to an NHWC residual in NHWC (diffusers copies it
    back to NCHW first); its own method for anything else."""
    if not self.use_linear_projection or not residual.is_contiguous(memory_format=torch.channels_last) \
            or residual.is_contiguous():
        return type(self)._get_output_for_continuous_inputs(self, hidden_states, residual, batch_size, height,
                                                             width, inner_dim)
    hidden_states = self.proj_out(hidden_states)
    return hidden_states.reshape(batch_size, height, width, inner_dim).permute(0, 3, 1, 2) + residual


_PATCHES = {"forward": (_group_norm_forward, _resnet_forward), "_get_output_for_continuous_inputs":
            (_transformer_output,)}


def fuse_norms(model: torch.nn.Module) -> int:
    """Route ``model``'s GroupNorms, resnets and 2-D transformers' outputs through the kernels (see the module
    docstring). Returns the number of modules patched."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    count = 0
    for m in model.modules():
        if type(m) is torch.nn.GroupNorm and "forward" not in vars(m):
            m.forward = types.MethodType(_group_norm_forward, m)
        elif type(m) is ResnetBlock2D and _fusable(m) and "forward" not in vars(m):
            m.forward = types.MethodType(_resnet_forward, m)
        elif type(m) is Transformer2DModel:
            m._get_output_for_continuous_inputs = types.MethodType(_transformer_output, m)
        else:
            continue
        count += 1
    return count


def runs_fused(model: torch.nn.Module) -> bool:
    """Whether ``model``'s norms go to the kernels: patched by :func:`fuse_norms`, on a device where they run."""
    param = next(model.parameters(), None)
    return param is not None and uses_kernel(param.device) and any(
        getattr(vars(m).get(name), "__func__", None) in funcs for m in model.modules() for name, funcs in
        _PATCHES.items())


def unfuse_norms(model: torch.nn.Module) -> int:
    """Undo :func:`fuse_norms`. Returns the number of modules restored."""
    count = 0
    for m in model.modules():
        for name, funcs in _PATCHES.items():
            if getattr(vars(m).get(name), "__func__", None) in funcs:
                delattr(m, name)
                count += 1
    return count


def to_nhwc(model: torch.nn.Module, on: bool = True) -> torch.nn.Module:
    """``model``'s 4-D weights (its convolutions) in channels_last, or back in NCHW (``on`` False)."""
    return model.to(memory_format=torch.channels_last if on else torch.contiguous_format)


def is_nhwc(model: torch.nn.Module) -> bool:
    """Whether ``model``'s convolutions run NHWC (:func:`to_nhwc`): its first convolution with a spatial kernel
    (a 1×1 kernel is both layouts at once)."""
    for m in model.modules():
        if isinstance(m, torch.nn.Conv2d) and m.weight.shape[-2:].numel() > 1 and m.weight.shape[1] > 1:
            return m.weight.is_contiguous(memory_format=torch.channels_last)
    return False
