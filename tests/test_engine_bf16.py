"""bf16 DeepSpeed engines build on CPU with fp32 gradient accumulation and reduction (ZeRO 1, 2 and 3).

    .venv/bin/pytest tests/test_engine_bf16.py -q        # ~30 s on a 2-core CPU

One subprocess (so DeepSpeed's one-rank process group stays out of the test process) builds the debug CLIP
behind :class:`pipeline.train.engine.Engine` at each stage in bf16, runs one optimizer step over two
micro-batches, and reports the gradient-accumulation dtype DeepSpeed's optimizer actually holds.
"""

from __future__ import annotations

import json
import subprocess
import sys

from ports import free_port
from trainer_fixtures import ROOT, pretrain_env

SCRIPT = r"""
import json, torch
from deepspeed.runtime.bf16_optimizer import BF16_Optimizer
from pipeline.model.clip import ModelConfig, build_clip
from pipeline.train.engine import Engine, EngineConfig, init_distributed
from pipeline.train.optim import OptimConfig

init_distributed()
out = {}
for stage in (1, 2, 3):
    model, _, tokenizer = build_clip(ModelConfig(name="debug"))
    engine = Engine(model, EngineConfig(zero_stage=stage, precision="bf16"), OptimConfig(), 10, 4, 2)
    opt = engine.engine.optimizer
    dtype = opt.grad_acc_dtype if isinstance(opt, BF16_Optimizer) else opt.gradient_accumulation_dtype
    text = tokenizer(["a red circle"] * 4)
    for _ in range(2):
        o = engine(image=torch.randn(4, 3, 64, 64), text=text)
        engine.backward((o["image_features"].float() * o["text_features"].float()).sum())
        stepped = engine.micro_step()
    weights = engine.full_state_dict()
    out[stage] = {"optimizer": type(opt).__name__, "grad_accum": str(dtype), "stepped": stepped,
                  "steps": engine.global_steps, "grad_norm": engine.grad_norm(),
                  "weights_fp32": all(v.dtype == torch.float32 for v in weights.values() if v.is_floating_point()),
                  "comm": str(engine.engine.communication_data_type)}
print("RESULT " + json.dumps(out))
"""


def test_bf16_engines_accumulate_and_reduce_gradients_in_fp32_at_zero_1_2_3():
    proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, env=pretrain_env(0, 1, free_port()),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    assert proc.returncode == 0 and lines, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(lines[0][len("RESULT ") :])
    assert result["1"]["optimizer"] == "BF16_Optimizer"  # DeepSpeed's ZeRO-1 path for fp32 accumulation
    for stage in ("1", "2", "3"):
        got = result[stage]
        assert got["grad_accum"] == "torch.float32" and got["comm"] == "torch.float32", (stage, got)
        assert got["stepped"] and got["steps"] == 1 and got["grad_norm"] > 0 and got["weights_fp32"], (
            stage,
            got,
        )
