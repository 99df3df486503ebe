"""launchers/pretrain_large.py with faults injected from the environment (tests only).

XFM_FAULT_NAN_STEPS="3,4"     one objective's loss (the first by name) is NaN at these steps (1-based, as logged)
XFM_FAULT_KILL_IN_SAVE=4      rank 1 SIGKILLs itself after writing its part of checkpoint 4
XFM_FAULT_DISK_FULL_AT=4      files stop growing (RLIMIT_FSIZE = 0) from the save of step 4 on
XFM_FAULT_KILL_AT_OPTIMIZER_STEP=8  rank 1 SIGKILLs itself right after its 8th optimizer step of this
                              process (inside a training step when a step takes several: the
                              per-modality schedule)
"""
import os
import resource
import runpy
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _install() -> None:
    import torch

    from xfm_scale.checkpoint import writer as checkpoint
    from xfm_scale.model.xfm import XFM
    from xfm_scale.train.trainer import Trainer

    state = {"step": 0}
    train_step = Trainer.train_step

    def tracked(self, batches):
        state["step"] = self.step + 1  # the step being computed, as metrics.jsonl numbers it
        return train_step(self, batches)

    Trainer.train_step = tracked
    kill_after = int(os.environ.get("XFM_FAULT_KILL_AT_OPTIMIZER_STEP", "0"))
    if kill_after:
        from xfm_scale.engine.build import Engine

        engine_step, taken = Engine.step, [0]

        def step_then_die(self, *args, **kwargs):
            out = engine_step(self, *args, **kwargs)
            taken[0] += 1
            if taken[0] == kill_after and int(os.environ["RANK"]) == 1:
                os.kill(os.getpid(), signal.SIGKILL)
            return out

        Engine.step = step_then_die
    nan_steps = {int(s) for s in os.environ.get("XFM_FAULT_NAN_STEPS", "").split(",") if s}
    if nan_steps:
        forward = XFM.forward

        def poisoned(self, batch, *args, **kwargs):
            out = forward(self, batch, *args, **kwargs)
            if state["step"] in nan_steps and out.losses:
                name = sorted(out.losses)[0]
                out.losses[name] = out.losses[name] * torch.tensor(float("nan"))
            return out

        XFM.forward = poisoned
    kill_at = int(os.environ.get("XFM_FAULT_KILL_IN_SAVE", "0"))
    full_at = int(os.environ.get("XFM_FAULT_DISK_FULL_AT", "0"))
    if kill_at or full_at:
        save = checkpoint.save

        def faulty_save(engine, ckpt_dir, step, client_state, keep_last):
            if full_at and step >= full_at:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes then fail with EFBIG, like ENOSPC
                resource.setrlimit(resource.RLIMIT_FSIZE, (0, resource.RLIM_INFINITY))
            if kill_at and step == kill_at:
                engine_save = engine.deepspeed.save_checkpoint

                def save_then_die(*a, **k):
                    engine_save(*a, **k)
                    if int(os.environ["RANK"]) == 1:
                        os.kill(os.getpid(), signal.SIGKILL)

                engine.deepspeed.save_checkpoint = save_then_die
            return save(engine, ckpt_dir, step, client_state, keep_last)

        checkpoint.save = faulty_save


if __name__ == "__main__":
    _install()
    sys.argv[0] = str(ROOT / "launchers/pretrain_large.py")
    sys.path.insert(0, str(ROOT / "launchers"))  # as `python launchers/pretrain_large.py` has it
    runpy.run_path(sys.argv[0], run_name="__main__")
