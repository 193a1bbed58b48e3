"""Train a diffusion policy on a `generate_dataset` file: ``train_policy``.

Diffusion Policy's recipe for low-dimensional observations (squared-cosine schedule, AdamW with warm-up
and cosine decay, an exponential moving average of the weights, which is what gets exported), except
that the network predicts the clean sample by default, not the noise: few-step DDIM with trailing
timesteps starts at t=T-1, where sqrt(alpha_bar) is 0.0005 with 100 steps, so a noise-predicting
network's estimate of the clean chunk is divided by 0.0005 there. The shipped ant policy at K=2 tracked at
1.35x the expert predicting noise and 1.06x predicting the sample (docs/RESULTS.md); `--prediction-type
epsilon` gives Diffusion Policy's choice.

Samples follow DiffuseLoco's delayed inputs: conditioned on observation rows k-history+1..k, the target
chunk is action[k+first_offset .. k+first_offset+horizon-1], so the node has one control period for
inference. The card's first_offset counts from the sensors' stamp, the time the node conditions on: a
dataset whose rows hold sensors `obs_delay_s` old (sim/dataset.py --obs-delay) adds that many periods, so
the node's delay compensation runs each action at the time its label was executed, whatever the
observation's age at the robot (`sensor_delay_periods`). Windows are clamped to their episode (repeating
the first observation and the last action), as Diffusion Policy pads its sequences.

A run directory holds `state.pt` (everything needed to resume: weights, EMA, optimizer, step, RNG),
`checkpoint.pt` (the export format of training/checkpoint.py, EMA weights), `loss.png` and
`metrics.json`. Re-running the same command resumes; the same seed gives the same run.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.functional import mse_loss

from diffusion_controller.core.card_parser import layout_from_dict
from diffusion_controller.core.card_schema import ACTION_KINDS, CardError
from diffusion_controller.core.card_schema import FORMAT as CARD_FORMAT
from diffusion_controller.core.ddim import BETA_SCHEDULES, PREDICTION_TYPES, DDIMConfig
from diffusion_controller.training.checkpoint import save_checkpoint
from diffusion_controller.training.network import DiffusionTransformer, NetworkConfig

OBS_STD_FLOOR = 0.02  # keeps near-constant features (e.g. tilt of a flat base) from amplifying noise
ACTION_MARGIN = 0.05  # widen the action range by 5% each side so the data never sits on the clip


@dataclass(frozen=True)
class TrainConfig:
    data: str
    out: str
    name: str = "ant_locomotion"
    description: str = ""  # empty: a neutral one naming the data (neutral_description)
    action_kind: str = "position"
    action_units: str = "rad"
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "sample"  # well-conditioned at t=T-1, where trailing DDIM starts
    seed: int = 0
    iterations: int = 20000
    batch_size: int = 256
    lr: float = 3e-4
    weight_decay: float = 1e-3
    warmup: int = 500
    ema_decay: float = 0.999
    history: int = 8
    horizon: int = 16
    first_offset: int = 1
    layers: int = 4
    heads: int = 4
    width: int = 128
    train_timesteps: int = 100
    sampler_steps: int = 5
    val_fraction: float = 0.05
    threads: int = 1  # a 2nd OpenMP thread spin-waits whenever another process holds a core
    save_every: int = 1000


class WindowDataset:
    """Index arithmetic for (observation window, action chunk) samples, clamped to episodes."""

    def __init__(
        self, obs: np.ndarray, action: np.ndarray, episode_ends: np.ndarray, cfg: TrainConfig
    ) -> None:
        starts = np.concatenate([[0], episode_ends[:-1]])
        ep_start = np.repeat(starts, episode_ends - starts)
        ep_last = np.repeat(episode_ends - 1, episode_ends - starts)
        k = np.arange(len(obs))
        hist = k[:, None] + np.arange(-cfg.history + 1, 1)[None, :]
        self.obs_idx = np.maximum(hist, ep_start[:, None])
        fut = k[:, None] + cfg.first_offset + np.arange(cfg.horizon)[None, :]
        self.act_idx = np.minimum(fut, ep_last[:, None])
        self.episode = np.repeat(np.arange(len(episode_ends)), episode_ends - starts)


#: What a dataset file must hold (sim/dataset.py and training/bag_dataset.py write them).
REQUIRED_KEYS = ("obs", "action", "episode_ends", "layout", "period", "action_joints", "action_lower",
                 "action_upper")  # fmt: skip


def load_dataset(path: str) -> dict:
    """The arrays of a dataset file, checked before any training step: every required key, and shapes
    that agree with the layout (a bad file fails now, not after hours of training)."""
    with np.load(path, allow_pickle=False) as z:
        d = {k: z[k] for k in z.files}
    missing = [k for k in REQUIRED_KEYS if k not in d]
    if missing:
        raise ValueError(f"{path}: dataset has no {missing} (see sim/dataset.py for the format)")
    try:
        layout = layout_from_dict({
            "control_period_s": float(d["period"]),
            "observation": {"history": 1, "features": json.loads(str(d["layout"]))},
            "action": {"joints": [str(j) for j in d["action_joints"]], "lower": d["action_lower"].tolist(),
                       "upper": d["action_upper"].tolist()},
        }, path)  # fmt: skip
    except (CardError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: {exc}") from exc
    n, ends = len(d["obs"]), d["episode_ends"]
    problems = []
    if d["obs"].shape != (n, layout.obs_dim):
        problems.append(f"obs is {d['obs'].shape}, the layout needs (N, {layout.obs_dim})")
    if d["action"].shape != (n, len(layout.action_joints)):
        problems.append(f"action is {d['action'].shape}, expected ({n}, {len(layout.action_joints)})")
    if len(ends) == 0 or ends[-1] != n or np.any(np.diff(ends) <= 0):
        problems.append(f"episode_ends must increase and end at {n} rows")
    if not (np.all(np.isfinite(d["obs"])) and np.all(np.isfinite(d["action"]))):
        problems.append("obs/action contain NaN or Inf")
    if problems:
        raise ValueError(f"{path}: " + "; ".join(problems))
    return d


def sensor_delay_periods(data: dict) -> int:
    """How many control periods old the sensors in each row of `data` are (its `obs_delay_s`, absent = 0):
    the card's first_offset is the window offset plus this. A delay that is no whole number of periods
    cannot be written in the card, so it is refused before training."""
    delay, period = float(data.get("obs_delay_s", 0.0)), float(data["period"])
    n = round(delay / period)
    if not (delay >= 0 and abs(delay - n * period) <= 1e-6 + 1e-3 * period):
        raise ValueError(f"dataset obs_delay_s {delay} s: expected a whole number of control periods "
                         f"({period} s) >= 0, so the card can say when each action runs")
    return n


def normalization(obs: np.ndarray, action: np.ndarray) -> dict:
    mean, std = obs.mean(0), np.maximum(obs.std(0), OBS_STD_FLOOR)
    lo, hi = action.min(0), action.max(0)
    span = np.maximum(hi - lo, 1e-3)
    return {
        "observation": {"mean": mean.tolist(), "std": std.tolist()},
        "action": {"min": (lo - ACTION_MARGIN * span).tolist(), "max": (hi + ACTION_MARGIN * span).tolist()},
    }


def diffusion_section(cfg: TrainConfig) -> dict:
    """The card's diffusion section; training's noise schedule is built from the same dict.

    No timestep_spacing: training does not sample, so the checkpoint's card means "leading" and the
    export decides (export_policy --timestep-spacing, default trailing).
    """
    return {
        "train_timesteps": cfg.train_timesteps,
        "beta_schedule": cfg.beta_schedule,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "prediction_type": cfg.prediction_type,
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "set_alpha_to_one": True,
        "steps_offset": 0,
    }


def neutral_description(data: dict, cfg: TrainConfig) -> str:
    """The card's description when none is given: what was trained on what, nothing about any robot."""
    rows, episodes = len(data["obs"]), len(data["episode_ends"])
    return (f"Diffusion policy ({cfg.action_kind} actions, {1.0 / float(data['period']):g} Hz) trained by "
            f"train_policy on {Path(cfg.data).name} ({rows} rows, {episodes} episodes).")  # fmt: skip


def card_dict(data: dict, cfg: TrainConfig, norm: dict, net: DiffusionTransformer, extra: dict) -> dict:
    """The model card without its graph section; export adds the graph."""
    joints = [str(j) for j in data["action_joints"]]
    return {
        "format": CARD_FORMAT,
        "name": cfg.name,
        "version": "1.0.0",
        "description": cfg.description or neutral_description(data, cfg),
        "control_period_s": float(data["period"]),
        "observation": {"history": cfg.history, "features": json.loads(str(data["layout"]))},
        "action": {
            "joints": joints,
            "kind": cfg.action_kind,
            "units": cfg.action_units,
            "lower": [float(v) for v in data["action_lower"]],
            "upper": [float(v) for v in data["action_upper"]],
            "horizon": cfg.horizon,
            "first_offset": cfg.first_offset + sensor_delay_periods(data),
        },
        "normalization": norm,
        "diffusion": diffusion_section(cfg),
        "sampler": {"kind": "ddim", "steps": cfg.sampler_steps, "eta": 0.0},
        "network": {**net.cfg.to_dict(), "parameters": net.parameter_count()},
        "training": extra,
    }


def command_slice(layout: list[dict]) -> tuple[int, int] | None:
    start = 0
    for f in layout:
        if f["kind"] == "velocity_command":
            return (start, start + int(f["size"]))
        start += int(f["size"])
    return None


def _settings(d: dict) -> dict:
    """Settings that must match to resume a run (not where it runs, its threads or save cadence)."""
    return {k: v for k, v in d.items() if k not in ("out", "threads", "save_every")}


def lr_at(step: int, cfg: Any) -> float:
    """Linear warm-up over cfg.warmup steps, then cosine decay of cfg.lr to 0 at cfg.iterations (a
    TrainConfig or a DistillConfig)."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.iterations - cfg.warmup)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def plot_losses(path: Path, history: list[tuple[int, float, float | None]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h[0] for h in history]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(steps, [h[1] for h in history], label="train (mean over log interval)")
    val = [(h[0], h[2]) for h in history if h[2] is not None]
    if val:
        ax.plot(*zip(*val, strict=True), "o-", label="validation")
    ax.set_xlabel("iteration")
    ax.set_ylabel("denoising MSE (noise or sample, by prediction type)")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)



def optimizer_step(net: torch.nn.Module, ema: torch.nn.Module, opt: torch.optim.Optimizer,
                   loss: torch.Tensor, step: int, ema_decay: float) -> None:
    """One optimizer step on `loss` (gradients clipped to norm 1), then the EMA weights, whose decay
    warms up as (1 + step) / (10 + step) like diffusers' EMAModel."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
    opt.step()
    decay = min(ema_decay, (1 + step) / (10 + step))
    with torch.no_grad():
        for pe, p in zip(ema.parameters(), net.parameters(), strict=True):
            pe.lerp_(p, 1 - decay)


def split_episodes(windows: WindowDataset, n_ep: int, cfg: TrainConfig) -> tuple[np.ndarray, np.ndarray]:
    """(training rows, validation rows): whole episodes, val_fraction of them (at least one if there are
    two or more) drawn with the run's seed, so no validation window shares an episode with training."""
    n_val = max(1, round(cfg.val_fraction * n_ep)) if n_ep > 1 else 0
    val_eps = set(np.random.default_rng(cfg.seed).choice(n_ep, n_val, replace=False).tolist())
    is_val = np.isin(windows.episode, list(val_eps))
    return np.flatnonzero(~is_val), np.flatnonzero(is_val)


class Samples:
    """The normalized dataset on the device and the denoising loss of a batch of its windows."""

    def __init__(
        self, obs: np.ndarray, action: np.ndarray, windows: WindowDataset, norm: dict, cfg: TrainConfig,
        device: torch.device,
    ) -> None:  # fmt: skip
        o_mean = torch.tensor(norm["observation"]["mean"], device=device)
        o_std = torch.tensor(norm["observation"]["std"], device=device)
        a_lo = torch.tensor(norm["action"]["min"], device=device)
        a_hi = torch.tensor(norm["action"]["max"], device=device)
        self.obs_n = ((torch.from_numpy(obs).to(device) - o_mean) / o_std).float()
        self.act_n = (2.0 * (torch.from_numpy(action).to(device) - a_lo) / (a_hi - a_lo) - 1.0).float()
        self.obs_idx = torch.from_numpy(windows.obs_idx).to(device)
        self.act_idx = torch.from_numpy(windows.act_idx).to(device)
        self.abar = torch.tensor(
            DDIMConfig(**diffusion_section(cfg)).alphas_cumprod(), dtype=torch.float32, device=device
        )
        self.cfg, self.device = cfg, device

    def loss(self, model: torch.nn.Module, rows: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        """MSE of `model`'s prediction (noise or clean sample, by prediction type) at random timesteps."""
        o = self.obs_n[self.obs_idx[rows]]
        x0 = self.act_n[self.act_idx[rows]]
        t = torch.randint(0, self.cfg.train_timesteps, (len(rows),), device=self.device, generator=g)
        eps = torch.randn(x0.shape, device=self.device, generator=g)
        ab = self.abar[t].view(-1, 1, 1)
        xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
        return mse_loss(model(xt, t, o), eps if self.cfg.prediction_type == "epsilon" else x0)

    def validate(self, ema: torch.nn.Module, val_rows: np.ndarray) -> float | None:
        """The EMA network's loss on (at most ~4096 of) the validation rows, with a fixed generator."""
        if len(val_rows) == 0:
            return None
        g = torch.Generator(device=self.device).manual_seed(12345)
        rows = torch.from_numpy(val_rows[:: max(1, len(val_rows) // 4096)]).to(self.device)
        with torch.no_grad():
            losses = [self.loss(ema, rows[i : i + 1024], g).item() for i in range(0, len(rows), 1024)]
        return float(np.mean(losses))


class RunState:
    """What a run saves and resumes (`state.pt`): networks, optimizer, generator, step, loss history."""

    def __init__(self, net_cfg: NetworkConfig, cfg: TrainConfig, device: torch.device) -> None:
        torch.manual_seed(cfg.seed)
        self.net = DiffusionTransformer(net_cfg).to(device)
        self.ema = copy.deepcopy(self.net).eval().requires_grad_(False)
        self.opt = torch.optim.AdamW(
            self.net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95)
        )
        self.gen = torch.Generator(device=device).manual_seed(cfg.seed)
        self.step, self.history = 0, []
        self.cfg, self.device = cfg, device

    def resume(self, state_path: Path) -> None:
        """Continue the run saved at `state_path`; it must have been written with the same settings."""
        cfg, device = self.cfg, self.device
        st = torch.load(state_path, map_location=device, weights_only=False)
        # A run saved before a setting existed ran with its default (then epsilon prediction).
        defaults = {**TrainConfig(data=cfg.data, out=cfg.out).__dict__, "prediction_type": "epsilon"}
        saved = {**defaults, **st["config"]}
        if saved != cfg.__dict__:
            raise SystemExit(f"{state_path} was written with other settings; use a new --out to start afresh")
        self.net.load_state_dict(st["net"])
        self.ema.load_state_dict(st["ema"])
        self.opt.load_state_dict(st["opt"])
        self.gen.set_state(st["gen"].cpu() if device.type == "cpu" else st["gen"])
        torch.set_rng_state(st["torch_rng"].cpu())  # dropout draws from the global generator
        if st["cuda_rng"] is not None:
            torch.cuda.set_rng_state_all(st["cuda_rng"])
        self.step, self.history = st["step"], st["history"]

    def save(self, state_path: Path) -> None:
        """Write state.pt atomically (a .tmp file renamed over it)."""
        torch.save(
            {
                "config": self.cfg.__dict__, "net": self.net.state_dict(), "ema": self.ema.state_dict(),
                "opt": self.opt.state_dict(), "gen": self.gen.get_state(), "torch_rng": torch.get_rng_state(),
                "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
                "step": self.step, "history": self.history,
            },
            state_path.with_suffix(".tmp"),
        )  # fmt: skip
        state_path.with_suffix(".tmp").replace(state_path)


def optimize(
    run: RunState, samples: Samples, train_rows: np.ndarray, val_rows: np.ndarray, out: Path,
    session_end: int, progress: bool,
) -> None:  # fmt: skip
    """Iterations up to `session_end`: a loss logged every 200, validated, saved and plotted every
    save_every (and at the last iteration)."""
    cfg, device = run.cfg, run.device
    train_rows_t = torch.from_numpy(train_rows).to(device)
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=cfg.iterations, initial=run.step, desc="train", unit="it", dynamic_ncols=True)
    window = []
    run.net.train()
    while run.step < session_end:
        for group in run.opt.param_groups:
            group["lr"] = lr_at(run.step, cfg)
        pick = torch.randint(0, len(train_rows_t), (cfg.batch_size,), device=device, generator=run.gen)
        loss = samples.loss(run.net, train_rows_t[pick], run.gen)
        optimizer_step(run.net, run.ema, run.opt, loss, run.step, cfg.ema_decay)
        run.step += 1
        window.append(loss.item())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{np.mean(window[-50:]):.4f}")
        at_save = run.step % cfg.save_every == 0 or run.step == cfg.iterations
        if run.step % 200 == 0 or run.step == cfg.iterations:
            val = samples.validate(run.ema, val_rows) if at_save else None
            run.history.append((run.step, float(np.mean(window)), val))
            window = []
        if at_save:
            run.save(out / "state.pt")
            plot_losses(out / "loss.png", run.history)
    if bar is not None:
        bar.close()


def train(cfg: TrainConfig, *, progress: bool = True, stop_after: int | None = None) -> Path | None:
    """Run (or resume) training; returns the checkpoint path, or None when stopped early by stop_after."""
    torch.set_num_threads(cfg.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    data = load_dataset(cfg.data)
    delay_periods = sensor_delay_periods(data)  # a delay the card cannot say fails before any step
    layout = json.loads(str(data["layout"]))
    obs, action = data["obs"].astype(np.float32), data["action"].astype(np.float32)
    windows = WindowDataset(obs, action, data["episode_ends"].astype(np.int64), cfg)
    n_ep = len(data["episode_ends"])
    train_rows, val_rows = split_episodes(windows, n_ep, cfg)
    norm = normalization(obs[train_rows], action[train_rows])  # statistics of the training split only
    samples = Samples(obs, action, windows, norm, cfg, device)
    net_cfg = NetworkConfig(
        obs_dim=obs.shape[1], action_dim=action.shape[1], horizon=cfg.horizon, history=cfg.history,
        command_slice=command_slice(layout), layers=cfg.layers, heads=cfg.heads, width=cfg.width,
    )  # fmt: skip
    run = RunState(net_cfg, cfg, device)
    state_path = out / "state.pt"
    if state_path.exists():
        run.resume(state_path)
        print(f"[train] resuming {out} at iteration {run.step}/{cfg.iterations}")
    t0 = time.monotonic()
    session_end = cfg.iterations if stop_after is None else min(cfg.iterations, run.step + stop_after)
    optimize(run, samples, train_rows, val_rows, out, session_end, progress)
    if run.step < cfg.iterations:
        run.save(state_path)
        print(f"[train] stopped at iteration {run.step}/{cfg.iterations}; run again to resume")
        return None
    history = run.history
    final_val = next((h[2] for h in reversed(history) if h[2] is not None), None)
    extra = {
        "dataset": Path(cfg.data).name,
        "rows": len(obs),
        "episodes": int(n_ep),
        "obs_delay_s": delay_periods * float(data["period"]),
        "seed": cfg.seed,
        "iterations": cfg.iterations,
        "batch_size": cfg.batch_size,
        "final_train_loss": history[-1][1] if history else None,
        "final_val_loss": final_val,
        "device": device.type,
    }
    ckpt = save_checkpoint(out / "checkpoint.pt", run.ema.cpu(), card_dict(data, cfg, norm, run.ema, extra))
    (out / "metrics.json").write_text(
        json.dumps({**extra, "seconds_this_session": time.monotonic() - t0, "history": history}, indent=1)
    )
    print(f"[train] wrote {ckpt} (train loss {extra['final_train_loss']}, val loss {final_val})")
    return ckpt


def add_config_options(parser: argparse.ArgumentParser, defaults: Any, skip: tuple[str, ...],
                       choices: dict[str, tuple[str, ...]] | None = None) -> None:
    """One --option per field of a config dataclass (its type and default), except `skip`."""
    for name, value in defaults.__dict__.items():
        if name not in skip:
            parser.add_argument("--" + name.replace("_", "-"), type=type(value), default=value,
                                choices=(choices or {}).get(name))  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = TrainConfig(data="", out="")
    p.add_argument("--data", required=True, help="dataset .npz from generate_dataset")
    p.add_argument("--out", required=True, help="run directory (re-running resumes it)")
    add_config_options(p, defaults, skip=("data", "out"),
                       choices={"action_kind": ACTION_KINDS, "beta_schedule": BETA_SCHEDULES,
                                "prediction_type": PREDICTION_TYPES})  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bar (logs only)")
    p.add_argument("--stop-after", type=int, default=None, help="stop after N iterations (resume later)")
    args = vars(p.parse_args(argv))
    progress = not args.pop("no_progress")
    stop_after = args.pop("stop_after")
    random.seed(args["seed"])
    np.random.seed(args["seed"])
    train(TrainConfig(**args), progress=progress, stop_after=stop_after)


if __name__ == "__main__":
    main()
