"""Distil the embedded toy model into a few-step student (one command, seeded, resumable)::

    python -m nagkit.toy.distill --out runs/student            # a few minutes on 2 idle CPU cores
    python -m nagkit.toy.distill --out runs/student --install  # ... and copy the student into the package

Method: **rectified-flow reflow followed by few-step fine-tuning** (Liu, Gong & Liu, "Flow Straight and Fast:
Learning to Generate and Transfer Data with Rectified Flow", ICLR 2023, arXiv 2209.03003, §2.3 "reflow" and
"distillation"; the recipe InstaFlow applies to Stable Diffusion, Liu et al., arXiv 2309.06380), with the timestep
weighting of Lee, Lin & Ye, "Improving the Training of Rectified Flows", NeurIPS 2024, arXiv 2405.20320 (sample σ
more often where sampling evaluates the model):

1. **Pairs** (``--pairs``, default 1,536, in chunks of ``--chunk``): for a caption ``c`` (the teacher's own training
   mixture: :class:`nagkit.toy.data.ToyDataset` captions at every level of detail, 10 % empty, data seed
   ``seed + 10``) and Gaussian noise ``z`` (generator seeded with ``(seed, chunk)``), the teacher (the embedded
   model, no CFG) integrates its probability-flow ODE with ``--teacher-steps`` (default 25) Euler steps exactly as
   ``FluxPipeline`` does (σ = linspace(1, 1/N, N), then 0), giving the latent ``x = T(z, c)``: what the teacher draws
   at 25 steps from that noise. The text states of the (frozen) teacher encoders are stored with each pair.
2. **Reflow + few-step fine-tune** (``--steps``, default 1,000, batch ``--batch-size``): the student transformer,
   initialised from the teacher's, regresses the straight-line velocity of the coupling, ``z − x``, at
   ``x_σ = (1 − σ)·x + σ·z`` (MSE). σ is drawn, for ``--discrete-prob`` (75 %) of the batch, from the σ values at
   which 1-, 2- and 4-step sampling evaluate the model ({1, 3/4, 1/2, 1/4}, 1 twice as often: every step count
   starts there), and uniformly from (0, 1) for the rest (so 8+ step sampling keeps working). Because each pair is a
   deterministic function of its noise, a perfect student's flow is straight and one Euler step from ``z`` lands on
   ``T(z, c)``: the student draws at 1–4 steps what the teacher draws at 25. Only the transformer is trained (the
   text encoders and the autoencoder are the teacher's, frozen), AdamW, warm-up then cosine decay, weights are an
   exponential moving average (decay 0.998, warm-up ``(1 + n) / (10 + n)``).

No CFG: like FLUX.1-schnell, the student is meant to be sampled without classifier-free guidance (10 % of the pairs
have empty captions, so it still has an unconditional prediction; CFG on it is outside its training regime).

Resumable: pair chunks are files (``pairs/chunk_XXXX.pt``, an existing chunk is never regenerated), and the training
state is checkpointed every ``--checkpoint-every`` steps (``checkpoint.pt``); batch ``n`` is drawn with a generator
seeded with ``(seed, n)``, so a resumed run continues exactly as an uninterrupted one would.

Outputs in ``--out``: ``pairs/``, ``checkpoint.pt``, ``log.csv`` (step, loss, lr, seconds), ``student.safetensors``
(the EMA transformer weights in float16, keys ``transformer.*``: the rest of the pipeline is the teacher's, so the
package ships only this, 4.6 MB) and ``student.json`` (training record with pair-generation and training times).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import torch
from diffusers import FluxPipeline

from nagkit.toy.data import ToyDataset
from nagkit.toy.model import (
    IMAGE_SIZE,
    STUDENT_RECORD,
    STUDENT_WEIGHTS,
    TEXT_LENGTH,
    TRAIN_KINDS,
    load_embedded_pipeline,
)

__all__ = ["DISTILL_SIGMAS", "euler_sample", "generate_pairs", "main", "train_student"]

_GRID = IMAGE_SIZE // 8
#: σ values at which 1-, 2- and 4-step Euler sampling evaluate the model (1 listed thrice: all three start there).
DISTILL_SIGMAS: tuple[float, ...] = (1.0, 1.0, 0.75, 0.5, 0.5, 0.25)


def _img_ids() -> torch.Tensor:
    return FluxPipeline._prepare_latent_image_ids(1, _GRID, _GRID, torch.device("cpu"), torch.float32)


@torch.no_grad()
def encode_captions(pipe: FluxPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(text (B, 24, 64), pooled (B, 64))`` exactly as ``FluxPipeline.encode_prompt`` computes them."""
    options = {"padding": "max_length", "max_length": TEXT_LENGTH, "truncation": True, "return_tensors": "pt"}
    pooled = pipe.text_encoder(pipe.tokenizer(captions, **options).input_ids, output_hidden_states=False).pooler_output
    text = pipe.text_encoder_2(pipe.tokenizer_2(captions, **options).input_ids, output_hidden_states=False)[0]
    return text, pooled


def _velocity(transformer: torch.nn.Module, xt: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor,
              pooled: torch.Tensor) -> torch.Tensor:
    return transformer(hidden_states=xt, timestep=sigma, pooled_projections=pooled, encoder_hidden_states=text,
                       txt_ids=torch.zeros(TEXT_LENGTH, 3), img_ids=_img_ids(), return_dict=False)[0]


@torch.no_grad()
def euler_sample(transformer: torch.nn.Module, noise: torch.Tensor, text: torch.Tensor, pooled: torch.Tensor,
                 steps: int) -> torch.Tensor:
    """Integrate the flow from packed noise ``(B, 16, 16)`` with ``steps`` Euler steps, as ``FluxPipeline`` with
    ``FlowMatchEulerDiscreteScheduler(shift=1)`` does (no CFG). Returns packed latents."""
    sigmas = torch.linspace(1.0, 1.0 / steps, steps).tolist() + [0.0]
    x = noise
    for s, s_next in zip(sigmas[:-1], sigmas[1:], strict=True):
        v = _velocity(transformer, x, torch.full((x.shape[0],), s), text, pooled)
        x = x + (s_next - s) * v
    return x


def generate_pairs(out: str | Path, pairs: int = 1536, chunk: int = 256, seed: int = 0, teacher_steps: int = 25,
                   empty_prob: float = 0.1) -> float:
    """Stage 1: write the teacher's (noise, caption) -> latent pairs as chunk files (existing chunks are kept).

    Returns:
        Seconds spent generating in this call.
    """
    folder = Path(out) / "pairs"
    folder.mkdir(parents=True, exist_ok=True)
    teacher = load_embedded_pipeline()
    data = ToyDataset(length=10**9, seed=seed + 10, kinds=TRAIN_KINDS, empty_prob=empty_prob)
    t0 = time.perf_counter()
    for c in range(math.ceil(pairs / chunk)):
        path = folder / f"chunk_{c:04d}.pt"
        if path.is_file():
            continue
        started = time.perf_counter()
        captions = [data.item(i)[2] for i in range(c * chunk, (c + 1) * chunk)]
        text, pooled = encode_captions(teacher, captions)
        noise = torch.randn(chunk, _GRID * _GRID, 16, generator=torch.Generator().manual_seed(seed * 1_000_003 + c))
        x = euler_sample(teacher.transformer, noise, text, pooled, teacher_steps)
        seconds = time.perf_counter() - started
        torch.save({"noise": noise, "latent": x, "text": text, "pooled": pooled, "captions": captions,
                    "seconds": seconds}, folder / "chunk.tmp")
        (folder / "chunk.tmp").replace(path)
        print(f"pairs chunk {c + 1}/{math.ceil(pairs / chunk)}  {(time.perf_counter() - t0) / 60:6.1f} min",
              flush=True)
    return time.perf_counter() - t0


def _lr(step: int, base: float, warmup: int, total: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def train_student(
    out: str | Path,
    pairs: int = 1536,
    chunk: int = 256,
    steps: int = 1000,
    batch_size: int = 32,
    lr: float = 4e-4,
    warmup: int = 50,
    seed: int = 0,
    teacher_steps: int = 25,
    discrete_prob: float = 0.75,
    checkpoint_every: int = 100,
    log_every: int = 25,
    stop_at: int | None = None,
) -> dict:
    """Run both stages (pairs, then reflow fine-tuning); see the module docstring.

    Args:
        out: Output folder (resumed if it holds pair chunks or a checkpoint).
        pairs: Teacher pairs (rounded up to whole chunks).
        chunk: Pairs per chunk file (one batched teacher sampling).
        steps: Student optimiser steps.
        batch_size: Pairs per step.
        lr: Peak learning rate.
        warmup: Warm-up steps.
        seed: Seed of captions, noise and batches.
        teacher_steps: Euler steps of the teacher's sampling.
        discrete_prob: Fraction of a batch whose σ is drawn from :data:`DISTILL_SIGMAS`.
        checkpoint_every: Steps between checkpoints.
        log_every: Steps between log lines.
        stop_at: Stop after this training step (checkpoint written, no weights); rerun to resume.

    Returns:
        The training record (also written to ``student.json``), or ``{"stopped_at": ...}``.
    """
    from safetensors.torch import save_file

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    ckpt_path = out / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=False) if ckpt_path.is_file() else None
    pair_seconds = ckpt["pair_seconds"] if ckpt else 0.0
    if ckpt is None:
        pair_seconds += generate_pairs(out, pairs, chunk, seed, teacher_steps)
    n_chunks = math.ceil(pairs / chunk)
    parts = [torch.load(out / "pairs" / f"chunk_{c:04d}.pt", weights_only=False) for c in range(n_chunks)]
    noise, latent, text, pooled = (torch.cat([p[k] for p in parts]) for k in ("noise", "latent", "text", "pooled"))
    timed = [p["seconds"] for p in parts if "seconds" in p]
    if len(timed) == len(parts):  # every chunk records its own generation time (resumed runs included)
        pair_seconds = sum(timed)
    n = noise.shape[0]

    student = load_embedded_pipeline().transformer
    student.train().requires_grad_(True)
    params = list(student.parameters())
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ema = {k: v.detach().clone() for k, v in student.state_dict().items()}
    start, elapsed, log_rows = 0, 0.0, []
    if ckpt is not None:
        student.load_state_dict(ckpt["student"])
        opt.load_state_dict(ckpt["opt"])
        ema, start, elapsed, log_rows = ckpt["ema"], ckpt["step"], ckpt["elapsed"], ckpt["log"]
        print(f"resumed at step {start} ({elapsed / 60:.1f} min of training so far)", flush=True)
    t0 = time.perf_counter() - elapsed
    end = steps if stop_at is None else min(stop_at, steps)
    discrete = torch.tensor(DISTILL_SIGMAS)

    def checkpoint() -> None:
        state = {"step": start, "elapsed": time.perf_counter() - t0, "student": student.state_dict(),
                 "opt": opt.state_dict(), "ema": ema, "log": log_rows, "pair_seconds": pair_seconds}
        torch.save(state, out / "checkpoint.tmp")
        (out / "checkpoint.tmp").replace(ckpt_path)

    running: list[float] = []
    while start < end:
        step = start
        gen = torch.Generator().manual_seed(seed * 1_000_003 + 500_000 + step)
        idx = torch.randint(n, (batch_size,), generator=gen)
        sigma = torch.rand(batch_size, generator=gen)
        pick = discrete[torch.randint(len(discrete), (batch_size,), generator=gen)]
        sigma = torch.where(torch.rand(batch_size, generator=gen) < discrete_prob, pick, sigma)
        z, x = noise[idx], latent[idx]
        s = sigma[:, None, None]
        xt = (1 - s) * x + s * z
        for group in opt.param_groups:
            group["lr"] = _lr(step, lr, warmup, steps)
        pred = _velocity(student, xt, sigma, text[idx], pooled[idx])
        loss = torch.nn.functional.mse_loss(pred, z - x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.998, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, v in student.state_dict().items():
                if ema[k].is_floating_point():
                    ema[k].lerp_(v, 1 - decay)
        running.append(loss.item())
        start = step + 1
        if start % log_every == 0 or start == steps:
            row = {"step": start, "loss": sum(running) / len(running), "lr": opt.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0}
            running = []
            log_rows.append(row)
            print(f"step {start:5d}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['seconds'] / 60:6.1f} min",
                  flush=True)
        if start % checkpoint_every == 0 or start == end:
            checkpoint()
    if end < steps:
        return {"stopped_at": end, "steps": steps}

    from nagkit.toy.train import median_step_seconds

    weights = {f"transformer.{k}": v.to(torch.float16).contiguous() for k, v in ema.items()}
    save_file(weights, str(out / STUDENT_WEIGHTS), metadata={"format": "pt", "method": "reflow", "seed": str(seed)})
    with open(out / "log.csv", "w") as f:
        f.write("step,loss,lr,seconds\n")
        for r in log_rows:
            f.write(f"{r['step']},{r['loss']:.6f},{r['lr']:.6g},{r['seconds']:.1f}\n")
    record = {
        "method": "rectified-flow reflow + few-step fine-tune (arXiv 2209.03003, 2309.06380, 2405.20320)",
        "pairs": n,
        "teacher_steps": teacher_steps,
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "seed": seed,
        "discrete_prob": discrete_prob,
        "distill_sigmas": list(DISTILL_SIGMAS),
        "pair_minutes": pair_seconds / 60,
        "train_minutes": log_rows[-1]["seconds"] / 60 if log_rows else None,
        "median_seconds_per_step": median_step_seconds(log_rows),
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "weights_bytes": (out / STUDENT_WEIGHTS).stat().st_size,
        "weights_dtype": "float16",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "log": [{"step": r["step"], "loss": round(r["loss"], 5)} for r in log_rows],
    }
    (out / STUDENT_RECORD).write_text(json.dumps(record, indent=1))
    return record


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m nagkit.toy.distill``).

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status.
    """
    p = argparse.ArgumentParser(prog="python -m nagkit.toy.distill", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/student", help="output folder (resumed if it has pairs or a checkpoint)")
    p.add_argument("--pairs", type=int, default=1536)
    p.add_argument("--chunk", type=int, default=256)
    p.add_argument("--teacher-steps", type=int, default=25)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4e-4)
    p.add_argument("--discrete-prob", type=float, default=0.75)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--stop-at", type=int, default=None, help="stop after this training step (rerun to resume)")
    p.add_argument("--install", action="store_true", help="copy the student weights and record into the package")
    args = p.parse_args(argv)
    record = train_student(args.out, pairs=args.pairs, chunk=args.chunk, steps=args.steps,
                           batch_size=args.batch_size, lr=args.lr, seed=args.seed, teacher_steps=args.teacher_steps,
                           discrete_prob=args.discrete_prob, checkpoint_every=args.checkpoint_every,
                           stop_at=args.stop_at)
    if "stopped_at" in record:
        print(f"stopped at step {record['stopped_at']} of {record['steps']}; rerun the same command to resume")
        return 0
    print(f"done: {record['pairs']} pairs in {record['pair_minutes']:.1f} min, {record['steps']} steps in "
          f"{record['train_minutes']:.1f} min, final loss {record['final_loss']:.4f}")
    if args.install:
        dest = Path(__file__).parent / "weights"
        dest.mkdir(exist_ok=True)
        for name in (STUDENT_WEIGHTS, STUDENT_RECORD):
            shutil.copyfile(Path(args.out) / name, dest / name)
        print(f"installed into {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
