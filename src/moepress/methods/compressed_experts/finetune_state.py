"""Resumable checkpoints of `finetune` runs (`finetune.py`): the trainable tensors, the optimizer,
the step, the loss histories and every RNG state, written atomically in a state folder."""

from __future__ import annotations

from pathlib import Path

import torch


class StateMismatch(ValueError):
    """A checkpoint that does not belong to this run."""


def state_snapshot(trainable, optimizer, step, losses, validation, rng) -> dict:
    """A resumable checkpoint after `step` finished steps; `rng` = (torch, batch) RNG states then."""
    return {
        "step": step,
        "losses": list(losses),
        "validation": list(validation),
        "trainable": {n: p.detach().clone() for n, p in trainable.items()},
        "optimizer": optimizer.state_dict(),
        "torch_rng": rng[0],
        "batch_rng": rng[1],
    }


def save_state(state_dir: Path, state: dict) -> Path:
    """Write `step-N.pt` atomically and point `latest` at it."""
    state_dir.mkdir(parents=True, exist_ok=True)
    path = state_dir / f"step-{state['step']:07d}.pt"
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    tmp.replace(path)
    (state_dir / "latest").write_text(path.name + "\n")
    return path


def load_state(state_dir: Path) -> dict | None:
    latest = state_dir / "latest"
    if not latest.exists():
        return None
    return torch.load(state_dir / latest.read_text().strip(), weights_only=False)


def remove_state(state_dir: str | Path | None) -> None:
    """Delete the checkpoints `save_state` wrote in `state_dir`, and the folder once empty (nothing else)."""
    if state_dir is None or not Path(state_dir).is_dir():
        return
    state_dir = Path(state_dir)
    for path in [*state_dir.glob("step-*.pt"), *state_dir.glob("step-*.tmp"), state_dir / "latest"]:
        path.unlink(missing_ok=True)
    try:
        state_dir.rmdir()
    except OSError:  # something else lives there: leave it
        pass


def restore_state(state, trainable, optimizer, generator) -> None:
    missing = sorted(set(trainable) ^ set(state["trainable"]))
    if missing:
        raise StateMismatch(f"checkpoint does not match this run's trainable parameters (e.g. {missing[:3]}); "
                            "resume with the same --train")
    with torch.no_grad():
        for name, p in trainable.items():
            p.copy_(state["trainable"][name])
    optimizer.load_state_dict(state["optimizer"])
    torch.set_rng_state(state["torch_rng"])
    generator.set_state(state["batch_rng"])
