"""One-step policy by distillation of a trained diffusion policy: ``distill_policy``.

The teacher, sampled with K-step DDIM at eta 0, is a deterministic map from (initial noise, observation
history) to an action chunk. The student is the same network, initialized from the teacher, trained by
regression to give that chunk in one pass from the same noise and history: knowledge distillation of the
sampler (Luhman & Luhman 2021, "Knowledge Distillation in Iterative Generative Models"; One-Step Diffusion
Policy and Consistency Policy distil the same map with other losses). Regressing on the teacher's samples,
not on the dataset's actions, is what keeps it from averaging modes: for one noise there is one target.

Why this and not consistency distillation: the chunk here is 16 x 8 numbers and the teacher's map is
smooth, so plain regression on precomputed teacher pairs learns it in minutes on a CPU, needs no
ODE-solver pairs per training step and no target network, and leaves nothing to tune at run time.

The student's card is a DDIM card with `sampler.kind: distilled`, prediction type `sample`, one step and
trailing spacing: DDIM with K=1 at t=T-1 and sample prediction returns the clipped network output, so the
fused and denoiser graphs, the runtime and the node run it with no special case. The student never saw an
inpainting prefix, so its card says `sampler.inpainting: false` and the node refuses `blend: inpaint`.
The teacher may predict noise or the clean sample; a sample-prediction teacher (what train_policy writes
by default) already is a one-step sampler at t=T-1, so the student starts from a working policy and
distillation sharpens it towards the teacher's K-step chunk.

A run directory holds `teacher_pairs.npz` (the precomputed teacher chunks, reused on resume),
`state.pt`, `checkpoint.pt` (export it with export_policy) and `metrics.json`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from torch.nn.functional import mse_loss

from diffusion_controller.core.card import ModelCard
from diffusion_controller.core.ddim import DDIMConfig
from diffusion_controller.training import ddim_torch
from diffusion_controller.training.checkpoint import load_checkpoint, save_checkpoint
from diffusion_controller.training.network import DiffusionTransformer
from diffusion_controller.training.train import (
    WindowDataset,
    add_config_options,
    load_dataset,
    lr_at,
    optimizer_step,
)


@dataclass(frozen=True)
class DistillConfig:
    teacher: str
    data: str
    out: str
    teacher_steps: int = 10
    teacher_spacing: str = "trailing"
    pairs: int = 100_000
    val_pairs: int = 4096
    iterations: int = 6000
    batch_size: int = 256
    lr: float = 1e-4
    weight_decay: float = 1e-3
    warmup: int = 200
    ema_decay: float = 0.999
    seed: int = 0
    threads: int = 1
    save_every: int = 500


def student_card(teacher: ModelCard, cfg: DistillConfig, extra: dict) -> ModelCard:
    """The teacher's card, sampling in one step: sample prediction at t = T-1, sampler kind distilled."""
    diffusion = dataclasses.replace(teacher.diffusion, prediction_type="sample", timestep_spacing="trailing")
    training = {
        **teacher.training,
        "distilled_from": f"{teacher.name} {teacher.version}",
        "teacher_sampler": f"ddim K={cfg.teacher_steps} {cfg.teacher_spacing}, eta 0",
        **extra,
    }
    return teacher.replace(
        diffusion=diffusion,
        sampler_kind="distilled",
        steps=1,
        eta=0.0,
        sampler_inpainting=False,
        graph=None,
        training=training,
    )


class Teacher:
    """The teacher network and its deterministic K-step DDIM in normalized action space."""

    def __init__(self, net: DiffusionTransformer, card: ModelCard, steps: int, spacing: str) -> None:
        self.net = net.eval().requires_grad_(False)
        self.config = dataclasses.replace(card.diffusion, timestep_spacing=spacing)
        self.plan = self.config.plan(steps, 0.0)

    @torch.no_grad()
    def sample(self, noise: torch.Tensor, obs_n: torch.Tensor) -> torch.Tensor:
        def denoise(x, c):
            t = torch.full((x.shape[0],), c.timestep, dtype=torch.int64)
            return self.net(x, t, obs_n)

        return ddim_torch.sample_loop(denoise, noise, self.plan, self.config)


def one_step(net: DiffusionTransformer, noise: torch.Tensor, obs_n: torch.Tensor, config: DDIMConfig):
    """The student's chunk: the network output at t = T-1, clipped as the one DDIM step clips it."""
    t = torch.full((noise.shape[0],), config.train_timesteps - 1, dtype=torch.int64)
    out = net(noise, t, obs_n)
    return out.clamp(-config.clip_sample_range, config.clip_sample_range) if config.clip_sample else out


def make_pairs(teacher: Teacher, card: ModelCard, cfg: DistillConfig, path: Path) -> dict[str, np.ndarray]:
    """Observation windows of the dataset (train and held-out episodes), noise, and the teacher's chunks."""
    if path.exists():
        with np.load(path) as z:
            pairs = {k: z[k] for k in z.files}
        if int(pairs["teacher_steps"]) == cfg.teacher_steps and len(pairs["x0"]) == cfg.pairs + cfg.val_pairs:
            return pairs
    data = load_dataset(cfg.data)
    obs = data["obs"].astype(np.float32)
    ends = data["episode_ends"].astype(np.int64)
    geometry = SimpleNamespace(history=card.history, horizon=card.horizon, first_offset=card.first_offset)
    windows = WindowDataset(obs, data["action"].astype(np.float32), ends, geometry)
    rng = np.random.default_rng(cfg.seed)
    n_ep = len(ends)
    val_eps = rng.choice(n_ep, max(1, round(0.05 * n_ep)), replace=False)
    is_val = np.isin(windows.episode, val_eps)
    rows = np.concatenate([
        rng.choice(np.flatnonzero(~is_val), cfg.pairs),
        rng.choice(np.flatnonzero(is_val), cfg.val_pairs),
    ])  # fmt: skip
    obs_n = ((obs[windows.obs_idx[rows]] - card.obs_mean) / card.obs_std).astype(np.float32)
    noise = rng.standard_normal((len(rows), card.horizon, card.action_dim)).astype(np.float32)
    x0 = np.empty_like(noise)
    t0 = time.monotonic()
    for i in range(0, len(rows), 1024):
        sl = slice(i, i + 1024)
        x0[sl] = teacher.sample(torch.from_numpy(noise[sl]), torch.from_numpy(obs_n[sl])).numpy()
    print(f"[distill] {len(rows)} teacher chunks (K={cfg.teacher_steps}) in {time.monotonic() - t0:.0f} s")
    pairs = {"obs_n": obs_n, "noise": noise, "x0": x0, "teacher_steps": np.array(cfg.teacher_steps)}
    np.savez(path, **pairs)
    return pairs


def distill(cfg: DistillConfig, *, progress: bool = True) -> Path:
    """Run (or resume) distillation; returns the student checkpoint path."""
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = load_checkpoint(cfg.teacher)
    card = ckpt.card
    if card.sampler_kind != "ddim":
        raise SystemExit(f"{cfg.teacher}: the teacher must be a DDIM policy, not {card.sampler_kind}")
    teacher = Teacher(ckpt.network, card, cfg.teacher_steps, cfg.teacher_spacing)
    pairs = make_pairs(teacher, card, cfg, out / "teacher_pairs.npz")
    obs_n, noise, x0 = (torch.from_numpy(pairs[k]) for k in ("obs_n", "noise", "x0"))
    n_train = cfg.pairs
    val = slice(n_train, n_train + cfg.val_pairs)
    one = dataclasses.replace(card.diffusion, prediction_type="sample")

    student = copy.deepcopy(ckpt.network).train().requires_grad_(True)
    ema = copy.deepcopy(student).eval().requires_grad_(False)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    step, history = 0, []
    state_path = out / "state.pt"
    if state_path.exists():
        st = torch.load(state_path, weights_only=False)
        if st["config"] != cfg.__dict__:
            raise SystemExit(f"{state_path} was written with other settings; use a new --out")
        student.load_state_dict(st["net"])
        ema.load_state_dict(st["ema"])
        opt.load_state_dict(st["opt"])
        gen.set_state(st["gen"])
        step, history = st["step"], st["history"]
        print(f"[distill] resuming {out} at iteration {step}/{cfg.iterations}")

    @torch.no_grad()
    def validate(model: torch.nn.Module) -> float:
        errs = [
            mse_loss(one_step(model, noise[val][i : i + 1024], obs_n[val][i : i + 1024], one),
                     x0[val][i : i + 1024]).item()
            for i in range(0, cfg.val_pairs, 1024)
        ]  # fmt: skip
        return float(np.mean(errs))

    @torch.no_grad()
    def baseline(steps: int) -> float:
        """The teacher itself at `steps` trailing steps against its K-step chunks (held-out pairs)."""
        t = Teacher(ckpt.network, card, steps, "trailing")
        return float(mse_loss(t.sample(noise[val][:1024], obs_n[val][:1024]), x0[val][:1024]).item())

    baselines = {f"teacher_k{k}_mse": baseline(k) for k in (1, 2, 3)}
    print(f"[distill] held-out MSE to the teacher's K={cfg.teacher_steps} chunks: " +
          ", ".join(f"{k} {v:.4f}" for k, v in baselines.items()))  # fmt: skip

    def save_state() -> None:
        torch.save(
            {"config": cfg.__dict__, "net": student.state_dict(), "ema": ema.state_dict(),
             "opt": opt.state_dict(), "gen": gen.get_state(), "step": step, "history": history},
            state_path.with_suffix(".tmp"),
        )  # fmt: skip
        state_path.with_suffix(".tmp").replace(state_path)

    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=step, desc="distill", unit="it", dynamic_ncols=True)
    t0, window = time.monotonic(), []
    while step < cfg.iterations:
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        pick = torch.randint(0, n_train, (cfg.batch_size,), generator=gen)
        loss = mse_loss(one_step(student, noise[pick], obs_n[pick], one), x0[pick])
        optimizer_step(student, ema, opt, loss, step, cfg.ema_decay)
        step += 1
        window.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window[-50:]):.4f}")
        if step % cfg.save_every == 0 or step == cfg.iterations:
            history.append((step, float(np.mean(window)), validate(ema)))
            window = []
            save_state()
    if bar is not None:
        bar.close()
    final = validate(ema)
    extra = {
        "distill_iterations": cfg.iterations,
        "distill_pairs": cfg.pairs,
        "distill_val_mse": round(final, 6),
        **{k: round(v, 6) for k, v in baselines.items()},
    }
    path = save_checkpoint(out / "checkpoint.pt", ema.cpu(), student_card(card, cfg, extra))
    (out / "metrics.json").write_text(
        json.dumps({**extra, "seconds_this_session": time.monotonic() - t0, "history": history}, indent=1)
    )
    print(f"[distill] wrote {path}: held-out MSE to the teacher {final:.4f} (teacher K=1: "
          f"{baselines['teacher_k1_mse']:.4f}, K=2: {baselines['teacher_k2_mse']:.4f})")  # fmt: skip
    return path


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = DistillConfig(teacher="", data="", out="")
    p.add_argument("--teacher", required=True, help="teacher checkpoint.pt from train_policy")
    p.add_argument("--data", required=True, help="the teacher's dataset .npz (observation windows)")
    p.add_argument("--out", required=True, help="run directory (re-running resumes it)")
    add_config_options(p, defaults, skip=("teacher", "data", "out"))
    p.add_argument("--no-progress", action="store_true")
    args = vars(p.parse_args(argv))
    progress = not args.pop("no_progress")
    distill(DistillConfig(**args), progress=progress)


if __name__ == "__main__":
    main()
