"""Train the embedded toy model (one command, seeded, resumable)::

    python -m nagkit.toy.train --out runs/embedded            # ~40 min on 2 CPU cores
    python -m nagkit.toy.train --out runs/embedded --install  # ... and copy the weights into the package

Two stages, one command, one checkpoint:

1. **Autoencoder** (``--ae-steps``, default 1,500): :func:`nagkit.toy.model.toy_autoencoder`, a diffusers
   ``AutoencoderKL`` (factor 4, 4 latent channels), on rendered scenes (seed ``seed + 2``). Loss: MSE + L1 +
   1e-3·KL per pixel. Its latent mean and standard deviation are then measured on 512 held-out scenes (seed
   ``seed + 1``) and stored as ``shift_factor`` / ``scaling_factor`` (as FLUX.1's VAE has them).
2. **Diffusion** (``--steps``, default 5,200): rectified flow, the FLUX.1 objective, on the standardised latents. For
   a clean latent ``x0`` (:func:`nagkit.toy.model.pack_images`), noise ``ε`` and ``σ ~ U(0, 1)``:
   ``x_σ = (1 − σ)·x0 + σ·ε``; the transformer (called exactly as ``FluxPipeline`` calls it, timestep ``σ``)
   regresses the velocity ``ε − x0`` (MSE). The text encoders (CLIP pooled + T5 sequence, both padded to 24 tokens
   without masks, as the pipeline encodes) are trained jointly; the autoencoder is frozen. 10 % of captions are
   empty, so the model also learns the unconditional distribution (CFG works). Curriculum: the first
   ``--simple-steps`` (default 2,000) steps draw one-shape scenes with fully specified captions only (seed
   ``seed + 3``); without it the text does not bind to position, colour or kind in this budget. Weights are an
   exponential moving average (decay 0.999, warm-up ``(1 + n) / (10 + n)``).

Data: :class:`nagkit.toy.data.ToyDataset` (kinds :data:`~nagkit.toy.model.TRAIN_KINDS`, 8 colours, 1–2 shapes,
captions at every level of detail). Batch ``n`` is items ``[n·B, (n+1)·B)`` and its noise comes from a generator
seeded with ``(seed, n)``, so a run resumed from a checkpoint (written every ``--checkpoint-every`` steps, in either
stage) continues exactly as an uninterrupted run would.

Outputs in ``--out``: ``checkpoint.pt`` (resume state of both stages), ``autoencoder_log.csv`` (step, mse, seconds),
``log.csv`` (step, loss, lr, seconds), ``embedded.safetensors`` (EMA weights of ``transformer``, ``text_encoder``,
``text_encoder_2``, and the autoencoder's final ``vae`` weights; latent scale and shift in its metadata) and
``embedded.json`` (training record).
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
    EMBEDDED_RECORD,
    EMBEDDED_WEIGHTS,
    IMAGE_SIZE,
    TEXT_LENGTH,
    TRAIN_KINDS,
    build_toy_pipeline,
    pack_images,
)

__all__ = ["held_out_loss", "main", "median_step_seconds", "train"]

_TRAINED = ("transformer", "text_encoder", "text_encoder_2")
_GRID = IMAGE_SIZE // 8  # token grid side: autoencoder factor 4, then the pipeline's 2×2 packing


def _encode(pipe: FluxPipeline, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Text states exactly as ``FluxPipeline.encode_prompt`` computes them, but with gradients."""
    options = {"padding": "max_length", "max_length": TEXT_LENGTH, "truncation": True, "return_tensors": "pt"}
    pooled = pipe.text_encoder(pipe.tokenizer(captions, **options).input_ids, output_hidden_states=False).pooler_output
    text = pipe.text_encoder_2(pipe.tokenizer_2(captions, **options).input_ids, output_hidden_states=False)[0]
    return text, pooled


def _velocity(pipe: FluxPipeline, xt: torch.Tensor, sigma: torch.Tensor, captions: list[str]) -> torch.Tensor:
    """The transformer's velocity for packed noisy latents ``xt`` at noise levels ``sigma``, called exactly as
    ``FluxPipeline`` calls it (zero text ids, the 4×4 image-id grid, timestep ``σ``)."""
    text, pooled = _encode(pipe, captions)
    return pipe.transformer(
        hidden_states=xt,
        timestep=sigma,
        pooled_projections=pooled,
        encoder_hidden_states=text,
        txt_ids=torch.zeros(TEXT_LENGTH, 3),
        img_ids=FluxPipeline._prepare_latent_image_ids(1, _GRID, _GRID, xt.device, xt.dtype),
        return_dict=False,
    )[0]


def median_step_seconds(log_rows: list[dict[str, float]]) -> float | None:
    """Median wall time of one step between consecutive log lines: the pace of the run without the stretches where
    other jobs shared the CPU (the total ``minutes`` includes them).

    Args:
        log_rows: ``{"step", "seconds"}`` rows of the training log.

    Returns:
        Seconds per step, or ``None`` with fewer than two rows.
    """
    import statistics

    pairs = zip(log_rows[:-1], log_rows[1:], strict=True)
    paces = [(b["seconds"] - a["seconds"]) / (b["step"] - a["step"]) for a, b in pairs]
    return statistics.median(paces) if paces else None


def _lr(step: int, base: float, warmup: int, total: int) -> float:
    """Linear warm-up, then cosine decay to 10 % of ``base``."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress))))


def _ae_loss(vae: torch.nn.Module, x: torch.Tensor, kl_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Autoencoder objective: MSE + L1 reconstruction of the posterior mean's decoding, plus a small KL term (per
    pixel) that keeps the latents bounded and smooth enough to diffuse. Returns ``(loss, mse)``."""
    posterior = vae.encode(x).latent_dist
    rec = vae.decode(posterior.mean).sample
    mse = (rec - x).square().mean()
    loss = mse + (rec - x).abs().mean() + kl_weight * posterior.kl().mean() / x[0].numel()
    return loss, mse


@torch.no_grad()
def _latent_stats(vae: torch.nn.Module, seed: int, n: int = 512) -> tuple[float, float]:
    """``(scaling_factor, shift_factor)`` that standardise the autoencoder's latents of ``n`` held-out scenes."""
    data = ToyDataset(length=n, seed=seed + 1, kinds=TRAIN_KINDS)
    z = torch.cat([vae.encode(torch.stack([data[i][0] for i in range(j, min(n, j + 128))])).latent_dist.mean
                   for j in range(0, n, 128)])
    return 1.0 / z.std().item(), z.mean().item()


def train(
    out: str | Path,
    steps: int = 5200,
    batch_size: int = 32,
    lr: float = 1.6e-3,
    warmup: int = 100,
    seed: int = 0,
    empty_prob: float = 0.1,
    checkpoint_every: int = 100,
    log_every: int = 25,
    stop_at: int | None = None,
    max_shapes: int = 2,
    sigma_sampling: str = "uniform",
    ae_steps: int = 1500,
    ae_lr: float = 2e-3,
    ae_kl_weight: float = 1e-3,
    simple_steps: int = 2000,
) -> dict[str, object]:
    """Train (or resume training) the embedded model: first the autoencoder, then the transformer and text encoders
    on its latents.

    Args:
        out: Output folder (created; an existing ``checkpoint.pt`` there is resumed).
        steps: Optimiser steps of the diffusion stage.
        batch_size: Images per step (both stages).
        lr: Peak learning rate of the diffusion stage (AdamW, betas (0.9, 0.99), no weight decay, gradient clipping
            at 1).
        warmup: Linear warm-up steps (both stages).
        seed: Seed of the initialisation, the data and the noise.
        empty_prob: Fraction of empty captions.
        checkpoint_every: Steps between checkpoints.
        log_every: Steps between log lines.
        max_shapes: Shapes per training scene (1 or 2).
        sigma_sampling: ``"uniform"`` or ``"logit-normal"`` (σ = sigmoid(N(0, 1)) for 90 % of a batch, uniform for
            the rest, so the pure-noise end that 1-step sampling starts from is still trained).
        ae_steps: Optimiser steps of the autoencoder stage (same batch size, data of seed ``seed + 2``).
        ae_lr: Peak learning rate of the autoencoder stage.
        ae_kl_weight: Weight of the autoencoder's per-pixel KL term.
        simple_steps: Curriculum: the first ``simple_steps`` diffusion steps draw one-shape scenes with fully specified
            captions only (every word names something in the image), the rest the full mixture.
        stop_at: Stop after this many steps of both stages together (a planned interruption: the checkpoint is
            written, no weights); calling again without it resumes.

    Returns:
        The training record (also written to ``embedded.json``).
    """
    from safetensors.torch import save_file

    if sigma_sampling not in ("uniform", "logit-normal"):
        raise ValueError(f"sigma_sampling must be 'uniform' or 'logit-normal', got {sigma_sampling!r}")
    if steps < 1 or ae_steps < 1:
        raise ValueError(f"steps and ae_steps must be >= 1, got {steps} and {ae_steps}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    pipe = build_toy_pipeline(seed=seed)
    vae = pipe.vae
    modules = {name: getattr(pipe, name) for name in _TRAINED}
    params = [p for m in modules.values() for p in m.parameters()]
    ema = {f"{name}.{k}": v.detach().clone() for name, m in modules.items() for k, v in m.state_dict().items()}
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    ae_opt = torch.optim.AdamW(vae.parameters(), lr=ae_lr, betas=(0.9, 0.99), weight_decay=0.0)
    data = ToyDataset(length=10**9, seed=seed, kinds=TRAIN_KINDS, empty_prob=empty_prob, max_shapes=max_shapes)
    simple = ToyDataset(length=10**9, seed=seed + 3, kinds=TRAIN_KINDS, empty_prob=empty_prob, max_shapes=1,
                        levels=("full",))
    ae_data = ToyDataset(length=10**9, seed=seed + 2, kinds=TRAIN_KINDS, max_shapes=max_shapes)

    ae_start, start, elapsed, log_rows, ae_log = 0, 0, 0.0, [], []
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.is_file():
        ckpt = torch.load(ckpt_path, weights_only=False)
        vae.load_state_dict(ckpt["vae"])
        vae.register_to_config(**ckpt["vae_config"])
        ae_opt.load_state_dict(ckpt["ae_opt"])
        for name, m in modules.items():
            m.load_state_dict(ckpt["modules"][name])
        opt.load_state_dict(ckpt["opt"])
        ema = ckpt["ema"]
        ae_start, start, elapsed = ckpt["ae_step"], ckpt["step"], ckpt["elapsed"]
        log_rows, ae_log = ckpt["log"], ckpt["ae_log"]
        print(f"resumed at autoencoder step {ae_start}, diffusion step {start} ({elapsed / 60:.1f} min so far)")

    t0 = time.perf_counter() - elapsed
    end = ae_steps + steps if stop_at is None else min(stop_at, ae_steps + steps)

    def checkpoint() -> None:
        state = {
            "ae_step": ae_start,
            "step": start,
            "elapsed": time.perf_counter() - t0,
            "vae": vae.state_dict(),
            "vae_config": {"scaling_factor": vae.config.scaling_factor, "shift_factor": vae.config.shift_factor},
            "ae_opt": ae_opt.state_dict(),
            "modules": {n: m.state_dict() for n, m in modules.items()},
            "opt": opt.state_dict(),
            "ema": ema,
            "log": log_rows,
            "ae_log": ae_log,
        }
        torch.save(state, out / "checkpoint.tmp")
        (out / "checkpoint.tmp").replace(ckpt_path)

    # Stage 1: the autoencoder.
    vae.train().requires_grad_(True)
    running: list[float] = []
    while ae_start < min(ae_steps, end):
        step = ae_start
        x = torch.stack([ae_data[i][0] for i in range(step * batch_size, (step + 1) * batch_size)])
        for group in ae_opt.param_groups:
            group["lr"] = _lr(step, ae_lr, warmup, ae_steps)
        loss, mse = _ae_loss(vae, x, ae_kl_weight)
        ae_opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        ae_opt.step()
        running.append(mse.item())
        ae_start = step + 1
        if ae_start % log_every == 0 or ae_start == ae_steps:
            row = {"step": ae_start, "mse": sum(running) / len(running), "seconds": time.perf_counter() - t0}
            running = []
            ae_log.append(row)
            print(f"autoencoder step {ae_start:5d}  mse {row['mse']:.4f}  {row['seconds'] / 60:6.1f} min", flush=True)
        if ae_start == ae_steps:
            vae.eval().requires_grad_(False)
            scaling, shift = _latent_stats(vae, seed)
            vae.register_to_config(scaling_factor=scaling, shift_factor=shift)
            ema.update({f"vae.{k}": v.detach().clone() for k, v in vae.state_dict().items()})
        if ae_start % checkpoint_every == 0 or ae_start in (ae_steps, end):
            checkpoint()
    vae.eval().requires_grad_(False)

    # Stage 2: transformer and text encoders on the autoencoder's latents.
    for m in modules.values():
        m.train().requires_grad_(True)
    while start < end - ae_steps:
        step = start
        source = simple if step < simple_steps else data
        items = [source[i] for i in range(step * batch_size, (step + 1) * batch_size)]
        with torch.no_grad():
            x0 = pack_images(vae, torch.stack([it[0] for it in items]))
        captions = [it[1] for it in items]
        gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
        sigma = torch.rand(batch_size, generator=gen)
        if sigma_sampling == "logit-normal":
            normal = torch.sigmoid(torch.randn(batch_size, generator=gen))
            sigma = torch.where(torch.rand(batch_size, generator=gen) < 0.9, normal, sigma)
        noise = torch.randn(x0.shape, generator=gen)
        s = sigma[:, None, None]
        xt = (1 - s) * x0 + s * noise
        for group in opt.param_groups:
            group["lr"] = _lr(step, lr, warmup, steps)
        pred = _velocity(pipe, xt, sigma, captions)
        loss = torch.nn.functional.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(0.999, (1 + step) / (10 + step))
        with torch.no_grad():
            for name, m in modules.items():
                for k, v in m.state_dict().items():
                    e = ema[f"{name}.{k}"]
                    if e.is_floating_point():
                        e.lerp_(v, 1 - decay)
        running.append(loss.item())
        start = step + 1
        if start % log_every == 0 or start == steps:
            row = {"step": start, "loss": sum(running) / len(running), "lr": opt.param_groups[0]["lr"],
                   "seconds": time.perf_counter() - t0}
            running = []
            log_rows.append(row)
            minutes = row["seconds"] / 60
            print(f"step {row['step']:5d}  loss {row['loss']:.4f}  lr {row['lr']:.2e}  {minutes:6.1f} min", flush=True)
        if start % checkpoint_every == 0 or start + ae_steps == end:
            checkpoint()

    if end < ae_steps + steps:
        return {"stopped_at": end, "steps": ae_steps + steps}
    weights = {k: v.contiguous() for k, v in ema.items() if not k.endswith("position_ids")}
    meta = {"format": "pt", "steps": str(steps), "seed": str(seed),
            "vae_scaling_factor": repr(vae.config.scaling_factor), "vae_shift_factor": repr(vae.config.shift_factor)}
    save_file(weights, str(out / EMBEDDED_WEIGHTS), metadata=meta)
    with open(out / "log.csv", "w") as f:
        f.write("step,loss,lr,seconds\n")
        for r in log_rows:
            f.write(f"{r['step']},{r['loss']:.6f},{r['lr']:.6g},{r['seconds']:.1f}\n")
    with open(out / "autoencoder_log.csv", "w") as f:
        f.write("step,mse,seconds\n")
        for r in ae_log:
            f.write(f"{r['step']},{r['mse']:.6f},{r['seconds']:.1f}\n")
    record = {
        "steps": steps,
        "batch_size": batch_size,
        "lr": lr,
        "warmup": warmup,
        "seed": seed,
        "empty_prob": empty_prob,
        "kinds": list(TRAIN_KINDS),
        "max_shapes": max_shapes,
        "sigma_sampling": sigma_sampling,
        "simple_steps": simple_steps,
        "autoencoder": {
            "steps": ae_steps,
            "lr": ae_lr,
            "kl_weight": ae_kl_weight,
            "final_mse": ae_log[-1]["mse"] if ae_log else None,
            "minutes": (ae_log[-1]["seconds"] / 60) if ae_log else None,
            "scaling_factor": vae.config.scaling_factor,
            "shift_factor": vae.config.shift_factor,
        },
        "final_loss": log_rows[-1]["loss"] if log_rows else None,
        "minutes": (log_rows[-1]["seconds"] / 60) if log_rows else None,
        "median_seconds_per_step": median_step_seconds(log_rows),
        "parameters": {n: sum(p.numel() for p in m.parameters()) for n, m in modules.items()}
        | {"vae": sum(p.numel() for p in vae.parameters())},
        "weights_bytes": (out / EMBEDDED_WEIGHTS).stat().st_size,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "log": [{"step": r["step"], "loss": round(r["loss"], 5)} for r in log_rows],
    }
    (out / EMBEDDED_RECORD).write_text(json.dumps(record, indent=1))
    return record


@torch.no_grad()
def held_out_loss(pipe: FluxPipeline, n: int = 512, seed: int = 999, bands: int = 8,
                  batch_size: int = 128) -> tuple[float, list[float]]:
    """The training objective on fixed held-out data: ``n`` scenes of another seed, fixed noise, and σ spread evenly
    over ``bands`` equal bands of (0, 1) (the centre of each), so two weight files are compared on exactly the same
    noisy inputs. Used to pick the training recipe (the README quotes its numbers).

    Args:
        pipe: The embedded pipeline (e.g. :func:`nagkit.toy.model.build_toy_pipeline` with a weights file).
        n: Held-out images (a multiple of ``bands``).
        seed: Data and noise seed; any seed other than the training run's (0) gives scenes it did not train on.
        bands: σ bands.
        batch_size: Images per transformer call.

    Returns:
        ``(mean loss, [loss of each σ band, low σ first])``.

    Raises:
        ValueError: If ``n`` is not a positive multiple of ``bands``.
    """
    if n <= 0 or bands <= 0 or n % bands:
        raise ValueError(f"n must be a positive multiple of bands ({bands}), got {n}")
    data = ToyDataset(length=n, seed=seed, kinds=TRAIN_KINDS, empty_prob=0.0)
    items = [data[i] for i in range(n)]
    x0 = pack_images(pipe.vae, torch.stack([it[0] for it in items]))
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed))
    band = torch.arange(n) % bands
    sigma = (band + 0.5) / bands
    xt = (1 - sigma[:, None, None]) * x0 + sigma[:, None, None] * noise
    errors = []
    for i in range(0, n, batch_size):
        sl = slice(i, i + batch_size)
        pred = _velocity(pipe, xt[sl], sigma[sl], [it[1] for it in items[sl]])
        errors.append(((pred - (noise[sl] - x0[sl])) ** 2).mean(dim=(1, 2)))
    err = torch.cat(errors)
    return err.mean().item(), [err[band == b].mean().item() for b in range(bands)]


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point (``python -m nagkit.toy.train``).

    Args:
        argv: Arguments (default ``sys.argv[1:]``).

    Returns:
        Exit status.
    """
    p = argparse.ArgumentParser(prog="python -m nagkit.toy.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="runs/embedded", help="output folder (resumed if it has a checkpoint)")
    p.add_argument("--steps", type=int, default=5200, help="diffusion steps")
    p.add_argument("--ae-steps", type=int, default=1500, help="autoencoder steps (trained first)")
    p.add_argument("--simple-steps", type=int, default=2000,
                   help="curriculum: first diffusion steps on one-shape scenes with full captions")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1.6e-3)
    p.add_argument("--max-shapes", type=int, default=2, choices=(1, 2))
    p.add_argument("--sigma-sampling", default="uniform", choices=("uniform", "logit-normal"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=100)
    p.add_argument("--stop-at", type=int, default=None, help="stop after this step (resume later by rerunning)")
    p.add_argument("--install", action="store_true", help="copy the weights and record into the nagkit package")
    p.add_argument("--held-out", nargs="+", metavar="WEIGHTS", default=None,
                   help="train nothing; print the held-out loss (512 fixed noisy images, 8 σ bands) of these "
                        "weight files ('embedded': the shipped weights)")
    args = p.parse_args(argv)
    if args.held_out:
        from nagkit.toy.model import load_embedded_pipeline

        for path in args.held_out:
            mean, per_band = held_out_loss(load_embedded_pipeline() if path == "embedded" else build_toy_pipeline(path))
            print(f"{path}: held-out loss {mean:.4f}; by σ band (low first): "
                  + " ".join(f"{v:.3f}" for v in per_band), flush=True)
        return 0
    record = train(
        args.out,
        steps=args.steps,
        ae_steps=args.ae_steps,
        simple_steps=args.simple_steps,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every=args.checkpoint_every,
        stop_at=args.stop_at,
        max_shapes=args.max_shapes,
        sigma_sampling=args.sigma_sampling,
    )
    if "stopped_at" in record:
        print(f"stopped at step {record['stopped_at']} of {record['steps']}; rerun the same command to resume")
        return 0
    print(f"done: {record['steps']} steps, final loss {record['final_loss']:.4f}, {record['minutes']:.1f} min")
    if args.install:
        dest = Path(__file__).parent / "weights"
        dest.mkdir(exist_ok=True)
        for name in (EMBEDDED_WEIGHTS, EMBEDDED_RECORD):
            shutil.copyfile(Path(args.out) / name, dest / name)
        (dest / "log.csv").write_bytes((Path(args.out) / "log.csv").read_bytes())
        print(f"installed into {dest}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
