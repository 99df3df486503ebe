"""Run configs and runners shared by the engine tests (real ranks, real Trainer, demo data)."""
from __future__ import annotations

import json
from pathlib import Path

NO_DROPOUT = {f"{enc}.{key}": 0.0 for enc in ("text", "vision", "fusion")
              for key in ("hidden_dropout", "attention_dropout")} | {"vision.drop_path_rate": 0.0}


def async_io_builds() -> bool:
    """Whether DeepSpeed's async_io op (NVMe offload) can be built here: it needs libaio."""
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().create_op_builder("AsyncIOBuilder").is_compatible(verbose=False)


NEEDS_ASYNC_IO = "DeepSpeed's async_io needs libaio (apt-get install libaio-dev)"


def run_config_dict(data, output_dir: Path, *, steps: int, micro_batch: int, global_batch: int, tp: int = 1,
                    save_every: int = 0, model_overrides: dict | None = None, grad_clip: float = 1.0) -> dict:
    return {
        "model": {"preset": "tiny", "overrides": {**NO_DROPOUT, **(model_overrides or {})}},
        "data": {"spec": str(data.spec), "tokenizer_dir": str(data.tokenizer_dir),
                 "eval_manifest": None, "cache_dir": str(output_dir.parent / "cache")},
        "batch": {"micro_batch_size": micro_batch, "global_batch_size": global_batch},
        "optim": {"lr": 2e-3, "warmup_steps": 3, "grad_clip": grad_clip},
        "train": {"steps": steps, "output_dir": str(output_dir), "log_every": 1, "save_every": save_every,
                  "progress_bar": False, "tensorboard": False},
        "parallel": {"tensor_parallel_size": tp},
    }


def train_rank(raw: dict) -> dict:
    """Body for tests/harness.run_ranks: one rank of a real training run."""
    import os

    from xfm_scale.config import run as run_config
    from xfm_scale.train.trainer import Trainer

    cfg = run_config.from_dict(raw, base_dir=os.getcwd())
    trainer = Trainer(cfg)
    final = trainer.run()
    offloaded = {"optimizer": trainer.engine.offloads_optimizer, "parameters": trainer.engine.offloads_parameters}
    return {"final": final, "layout": trainer.layout, "offloaded": offloaded,
            "length_group_size": trainer.loader.cfg.length_group_size}


def step_losses(output_dir: Path) -> dict[int, float]:
    """loss/total per step from metrics.jsonl (the last record wins: a resumed run appends)."""
    out = {}
    for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        if "loss/total" in record:
            out[record["step"]] = record["loss/total"]
    return out
