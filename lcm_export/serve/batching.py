"""Merging concurrent requests into one engine call, each still getting exactly its solo image.

Pure functions over an ``LCMPipeline``: no Ray, no HTTP (the server calls ``run_jobs`` on its engine
thread; tests call it directly).

A solo call ``pipe(prompt, seed=s, batch=b, ...)`` draws from ``numpy.random.default_rng(s)``: first
the latents ``[b, C, H/8, W/8]``, then one noise array of that shape per step but the last. A merged
call gets the same arrays, drawn per request from its own seed and stacked along the batch axis, as
``latents=`` and ``step_noise=``, with one prompt per image. Requests merge only when everything else
that enters the math is equal: size, steps, guidance, negative prompt and style adapters (the ``key``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from ..errors import EngineError, UserError


@dataclass(frozen=True)
class Job:
    """One checked request (``LCMPipeline.check_args`` filled in the defaults)."""

    prompt: str
    negative_prompt: str | None
    steps: int
    guidance: float
    seed: int
    batch: int
    height: int
    width: int
    adapters: tuple = ()
    """The checked style adapters, ((name, weight), ...) sorted, weight 0 left out (``Adapters.check``)."""

    @property
    def key(self) -> tuple:
        """Requests with equal keys may share one engine call (equal adapters: the same branch inputs)."""
        return (self.height, self.width, self.steps, self.guidance, self.negative_prompt, self.adapters)


def make_job(pipe, prompt, negative_prompt=None, steps=4, guidance=1.0, seed=0, batch=1, height=None, width=None,
             adapters=None) -> Job:
    """Check a request against the pipeline's entry (``UserError`` on bad input) before it is queued."""
    if isinstance(prompt, list):
        raise UserError("prompt must be a string (it may be empty), not list")
    steps, guidance, seed, batch, h, w = pipe.check_args(prompt, negative_prompt, steps, guidance, seed, batch, height, width)
    return Job(prompt, negative_prompt, steps, guidance, seed, batch, h, w, pipe.adapters.check(adapters))


def solo_noise(job: Job, latent_channels: int) -> tuple[np.ndarray, list[np.ndarray]]:
    """The latents and per-step noise the solo call for ``job`` draws from its seed, in its order."""
    shape = (job.batch, latent_channels, job.height // 8, job.width // 8)
    rng = np.random.default_rng(job.seed)
    latents = rng.standard_normal(shape, dtype=np.float32)
    return latents, [rng.standard_normal(shape, dtype=np.float32) for _ in range(job.steps - 1)]


def pack(jobs: list[Job], cap: int) -> list[list[int]]:
    """Indices of ``jobs`` grouped by key (first-come order), in chunks of at most ``cap`` images; a
    job larger than ``cap`` runs alone."""
    groups: dict[tuple, list[int]] = {}
    for i, j in enumerate(jobs):
        groups.setdefault(j.key, []).append(i)
    chunks: list[list[int]] = []
    for idx in groups.values():
        cur, n = [], 0
        for i in idx:
            b = jobs[i].batch
            if cur and n + b > cap:
                chunks.append(cur)
                cur, n = [], 0
            cur.append(i)
            n += b
        if cur:
            chunks.append(cur)
    return chunks


def run_solo(pipe, job: Job) -> list:
    """Exactly what ``lcm-export generate`` runs for these arguments."""
    return pipe(job.prompt, negative_prompt=job.negative_prompt, steps=job.steps, guidance=job.guidance, seed=job.seed,
                batch=job.batch, height=job.height, width=job.width, adapters=dict(job.adapters))


def run_merged(pipe, jobs: list[Job]) -> list[list]:
    """One engine call for ``jobs`` (equal keys); the images of each job, in order."""
    first = jobs[0]
    drawn = [solo_noise(j, pipe.latent_channels) for j in jobs]
    latents = np.concatenate([d[0] for d in drawn])
    step_noise = [np.concatenate([d[1][s] for d in drawn]) for s in range(first.steps - 1)]
    prompts = [j.prompt for j in jobs for _ in range(j.batch)]
    images = pipe(prompts, negative_prompt=first.negative_prompt, steps=first.steps, guidance=first.guidance,
                  batch=len(prompts), height=first.height, width=first.width, latents=latents, step_noise=step_noise,
                  adapters=dict(first.adapters))
    out, at = [], 0
    for j in jobs:
        out.append(images[at:at + j.batch])
        at += j.batch
    return out


@dataclass
class Done:
    """A job's images, the seconds its engine call took (wall clock, shared by a merged chunk), how
    many images that call made, and the runtime's seconds per stage of that call (``Timings.as_dict``)."""

    images: list
    seconds: float
    call_batch: int
    timings: dict | None = None


def _timings(pipe) -> dict | None:
    t = getattr(pipe, "last_timings", None)
    return t.as_dict() if hasattr(t, "as_dict") else None


def run_jobs(pipe, jobs: list[Job], cap: int) -> list:
    """Each job's ``Done`` or the exception it ended with, in order. Chunks run one after another: the
    caller owns the pipeline for the whole call (one engine thread per replica)."""
    results: list = [None] * len(jobs)
    for chunk in pack(jobs, cap):
        t0 = time.perf_counter()
        n = sum(jobs[i].batch for i in chunk)
        try:
            if len(chunk) == 1:
                outs = [run_solo(pipe, jobs[chunk[0]])]
            else:
                outs = run_merged(pipe, [jobs[i] for i in chunk])
            dt = time.perf_counter() - t0
            for i, imgs in zip(chunk, outs):
                results[i] = Done(imgs, dt, n, _timings(pipe))
        except Exception as exc:
            if len(chunk) == 1:
                results[chunk[0]] = _as_error(exc)
            else:  # a merged call failed: run each alone so that each gets its own outcome
                for i in chunk:
                    t0 = time.perf_counter()
                    try:
                        results[i] = Done(run_solo(pipe, jobs[i]), time.perf_counter() - t0, jobs[i].batch, _timings(pipe))
                    except Exception as exc2:
                        results[i] = _as_error(exc2)
    return results


def _as_error(exc: Exception) -> Exception:
    """UserError / EngineError as they are; anything else (a bug in the runtime or an engine library)
    becomes a one-line EngineError: a 500 for that request, not a dead replica."""
    if isinstance(exc, (UserError, EngineError)):
        return exc
    first = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ""
    return EngineError(f"internal error: {type(exc).__name__}{': ' + first if first else ''}")
