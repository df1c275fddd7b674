"""The training engine: the one module that imports DeepSpeed.

    info = init_distributed()                    # gloo on CPU, nccl on CUDA; also for a single process
    engine = Engine(model, EngineConfig(zero_stage=3), optim_cfg, total_steps, micro_batch=256, accumulation_steps=4)
    out = engine(image=x, text=t)                # forward (DeepSpeed gathers ZeRO-3 shards)
    engine.backward(loss)                        # summed over micro-batches, averaged over ranks
    engine.micro_step()                          # the optimizer steps on the accumulation boundary

DeepSpeed runs ZeRO stage 0 (plain data parallel), 1 (optimizer states sharded), 2 (+ gradients) or 3
(+ parameters); bf16 (fp32 master weights in the optimizer, gradients accumulated and reduced in fp32: see
:func:`deepspeed_config`) or fp32; gradient clipping; a client torch AdamW
with CLIP's parameter groups and our warmup + cosine LambdaLR (both saved in DeepSpeed checkpoints).
``backward`` does *not* divide by the accumulation steps: with gradient caching every micro-batch's
surrogate already carries its share of the full-batch loss, so the gradients must be summed.

The DeepSpeed config this builds is printed by ``python -m jobs.pretrain --print-ds-config``; any key can be
overridden through ``EngineConfig.deepspeed`` (a TOML table merged into it).
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from pipeline import dist as pdist
from pipeline.train.optim import OptimConfig, build_optimizer, lr_lambda, param_groups


@dataclass(frozen=True)
class EngineConfig:
    zero_stage: int = 1
    """ZeRO stage: 0 data parallel, 1 shard optimizer states, 2 + gradients, 3 + parameters."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Working precision of weights and activations (bf16: fp32 master weights in the optimizer, gradients
    accumulated and reduced in fp32; needs zero_stage >= 1)."""
    overlap_comm: bool = True
    """Overlap gradient reduction with backward (ZeRO 2 and 3 only: with ZeRO-1 and gradient accumulation
    DeepSpeed 0.19.8's overlapped reduction gives gradients that differ from stages 0, 2 and 3)."""
    reduce_bucket_size: int = 500_000_000
    """Elements per gradient-reduction bucket."""
    allgather_bucket_size: int = 500_000_000
    """Elements per parameter all-gather bucket (ZeRO 1/2)."""
    deepspeed: dict[str, Any] = field(default_factory=dict)
    """Extra DeepSpeed config, merged over the generated one (e.g. {zero_optimization = {stage3_prefetch_bucket_size = 1e8}})."""

    def __post_init__(self) -> None:
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"zero_stage: must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.precision not in ("bf16", "fp32"):
            raise ValueError(f"precision: must be bf16 or fp32, got {self.precision!r}")
        accum = self.deepspeed.get("data_types", {}).get("grad_accum_dtype", "fp32")
        if self.precision == "bf16" and self.zero_stage == 0 and accum == "fp32":
            raise ValueError(
                "zero_stage: bf16 accumulates gradients in fp32, which DeepSpeed 0.19.8 supports with ZeRO 1-3 "
                "only (ZeRO-0 bf16 raises NotImplementedError); use zero_stage = 1 (the same communication as "
                "plain data parallel), precision = 'fp32', or opt into bf16 accumulation with "
                "deepspeed = {data_types = {grad_accum_dtype = 'bf16'}}"
            )
        if self.reduce_bucket_size < 1 or self.allgather_bucket_size < 1:
            raise ValueError("reduce_bucket_size / allgather_bucket_size: must be >= 1")


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = (
            _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
        )
    return out


BF16_FP32_GRADIENTS: dict[str, Any] = {
    "data_types": {"grad_accum_dtype": "fp32"},
    "communication_data_type": "fp32",
}
"""bf16 runs accumulate and reduce gradients in fp32. With gradient caching every micro-batch's backward adds a
partial sum of the full-batch gradient (32-256 of them per step in the recipe); bf16 keeps 8 significant bits
(relative step 2^-8 = 1/256), so once the running sum is large, each further partial sum of about 1/256 of it
is rounded away or doubled. DeepSpeed 0.19.8 honours ``grad_accum_dtype = "fp32"`` per stage as: ZeRO-1 -> its BF16_Optimizer (fp32
gradient buffers, fp32 master weights, partitioned like ZeRO-1); ZeRO-2 / ZeRO-3 -> the ZeRO optimizers' fp32
gradient partitions; ZeRO-0 -> NotImplementedError (so :class:`EngineConfig` rejects bf16 at stage 0).
``communication_data_type = "fp32"`` makes the reduce-scatter / all-reduce run in fp32 too (bf16 by default)."""


def deepspeed_config(
    cfg: EngineConfig, optim: OptimConfig, micro_batch: int, accumulation_steps: int, world_size: int
) -> dict[str, Any]:
    """The DeepSpeed config dict for our configs (optimizer and scheduler are passed as objects); bf16 adds
    :data:`BF16_FP32_GRADIENTS`."""
    zero: dict[str, Any] = {"stage": cfg.zero_stage}
    if cfg.zero_stage > 0:
        zero.update(
            reduce_bucket_size=cfg.reduce_bucket_size,
            contiguous_gradients=True,
            overlap_comm=cfg.overlap_comm and cfg.zero_stage >= 2,
        )
    if cfg.zero_stage in (1, 2):
        zero.update(allgather_bucket_size=cfg.allgather_bucket_size, reduce_scatter=True)
    ds = {
        "train_batch_size": micro_batch * accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": accumulation_steps,
        # Plain fp32 data parallel: the Engine clips itself (DeepSpeed would compute the norm and drop it).
        "gradient_clipping": 0.0 if clips_itself(cfg) else optim.grad_clip_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": cfg.precision == "bf16"},
        **(BF16_FP32_GRADIENTS if cfg.precision == "bf16" else {}),
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 1 << 62,
        "wall_clock_breakdown": False,
    }
    return _merge(ds, cfg.deepspeed)


def clips_itself(cfg: EngineConfig) -> bool:
    """ZeRO-0 in fp32 hands the client optimizer the module's gradients: clipping them here is one norm
    computation instead of two (DeepSpeed's clip plus ours for logging)."""
    return cfg.zero_stage == 0 and cfg.precision == "fp32"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def init_distributed(info: pdist.WorldInfo | None = None) -> pdist.WorldInfo:
    """Join the process group (torchrun / deepspeed / srun env) and hand it to DeepSpeed.

    A single process gets a one-rank group too (DeepSpeed needs one); gloo on CPU, nccl on CUDA.
    """
    info = pdist.init_distributed(info)
    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        for key, value in (("RANK", info.rank), ("LOCAL_RANK", info.local_rank), ("WORLD_SIZE", 1)):
            os.environ.setdefault(key, str(value))
    if torch.cuda.is_available():
        torch.cuda.set_device(pdist.device_for(info))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    import deepspeed  # imported here so that configs and --help load without DeepSpeed's start-up cost

    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return info


class Engine:
    """A DeepSpeed engine behind the few calls the trainer makes."""

    def __init__(
        self,
        model: nn.Module,
        cfg: EngineConfig,
        optim: OptimConfig,
        total_steps: int,
        micro_batch: int,
        accumulation_steps: int,
    ) -> None:
        self.cfg = cfg
        world_size = dist.get_world_size() if dist.is_initialized() else 1
        self.ds_config = deepspeed_config(cfg, optim, micro_batch, accumulation_steps, world_size)
        groups = param_groups(model, optim.weight_decay)
        device = pdist.device_for(pdist.world_info_from_env())
        model.to(device)
        optimizer = build_optimizer(groups, optim)
        schedule = lr_lambda(optim, total_steps)
        import deepspeed

        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
            config=self.ds_config,
            dist_init_required=False,
        )
        self.device = self.engine.device
        self.dtype = torch.bfloat16 if cfg.precision == "bf16" else torch.float32
        self.max_grad_norm = optim.grad_clip_norm
        self._own_norm: float | None = None
        if cfg.zero_stage == 0 and world_size == 1:
            self.engine.enable_backward_allreduce = False  # averaging over one rank: skip the flatten + copy

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    @property
    def global_steps(self) -> int:
        """Optimizer steps taken (restored by :meth:`load`)."""
        return int(self.engine.global_steps)

    def __call__(self, **inputs: torch.Tensor) -> Any:
        """Forward; float inputs are moved to the device and cast to the working precision."""
        moved = {
            k: v.to(self.device, dtype=self.dtype if v.is_floating_point() else None, non_blocking=True)
            for k, v in inputs.items()
        }
        return self.engine(**moved)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss, scale_wrt_gas=False)

    def micro_step(self) -> bool:
        """End one micro-batch; on the accumulation boundary clip, step the optimizer and the schedule.

        Returns True when the optimizer stepped."""
        boundary = self.engine.is_gradient_accumulation_boundary()
        if boundary and clips_itself(self.cfg):  # gradients are already averaged over ranks here
            params = [p for p in self.module.parameters() if p.grad is not None]
            max_norm = self.max_grad_norm or float("inf")
            self._own_norm = float(torch.nn.utils.clip_grad_norm_(params, max_norm, foreach=True))
        self.engine.step()
        return boundary

    def lr(self) -> float:
        return float(self.scheduler.get_last_lr()[0])

    def grad_norm(self) -> float | None:
        norm = self._own_norm if clips_itself(self.cfg) else self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def train(self, mode: bool = True) -> None:
        self.engine.train(mode)

    def save(self, directory: str, tag: str, client_state: dict[str, Any]) -> None:
        """Collective: every rank writes its shards of ``directory/tag`` (no ``latest`` file)."""
        self.engine.save_checkpoint(directory, tag=tag, client_state=client_state, save_latest=False)

    def load(self, directory: str, tag: str) -> dict[str, Any]:
        """Collective: restore weights, optimizer, scheduler and step; returns the saved client state."""
        path, client_state = self.engine.load_checkpoint(directory, tag=tag)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint {tag!r} in {directory}")
        return client_state or {}

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The full fp32 weights (the optimizer's master copy where it has one) and buffers, on CPU.

        A collective under ZeRO-3: every rank must call it."""
        from deepspeed.utils import safe_get_full_fp32_param

        params = dict(self.module.named_parameters())
        out: dict[str, torch.Tensor] = {}
        for name, value in self.module.state_dict(keep_vars=True).items():
            full = safe_get_full_fp32_param(params[name]) if name in params else None
            out[name] = (value if full is None else full).detach().float().cpu().clone()
        return out
