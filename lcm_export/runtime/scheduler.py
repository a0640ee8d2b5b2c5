"""The LCM scheduler in numpy: one self-contained file mirroring diffusers' ``LCMScheduler``.

Latent Consistency Models (Luo et al., 2023), multistep sampling (Algorithm 1): at each selected
timestep the consistency function f(x_t, t) = c_skip(t)·x_t + c_out(t)·x̂_0 gives a denoised
sample, which is re-noised to the next timestep — except after the last one.

``step`` is a pure function of its arguments: the caller passes the noise, so another
implementation's randomness can be reproduced exactly. Arithmetic is float32, as in diffusers.
"""

from __future__ import annotations

import numpy as np

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


class LCMScheduler:
    order = 1

    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        original_inference_steps: int = 50,
        clip_sample: bool = False,
        clip_sample_range: float = 1.0,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        prediction_type: str = "epsilon",
        timestep_scaling: float = 10.0,
        rescale_betas_zero_snr: bool = False,
        thresholding: bool = False,
        **_ignored,
    ):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type {prediction_type!r}: must be one of {', '.join(PREDICTION_TYPES)}")
        if thresholding:
            raise ValueError("dynamic thresholding is not supported by the lean LCM scheduler")
        self.num_train_timesteps = int(num_train_timesteps)
        self.original_inference_steps = int(original_inference_steps)
        self.prediction_type = prediction_type
        self.timestep_scaling = float(timestep_scaling)
        self.clip_sample = bool(clip_sample)
        self.clip_sample_range = float(clip_sample_range)

        # 1. Noise schedule (float32, like diffusers' torch tensors)
        n = self.num_train_timesteps
        if trained_betas is not None:
            betas = np.asarray(trained_betas, dtype=np.float32)
        elif beta_schedule == "linear":
            betas = np.linspace(beta_start, beta_end, n, dtype=np.float32)
        elif beta_schedule == "scaled_linear":
            betas = np.linspace(beta_start**0.5, beta_end**0.5, n, dtype=np.float32) ** 2
        else:
            raise ValueError(f"beta_schedule {beta_schedule!r}: only 'linear' and 'scaled_linear' are supported")
        if rescale_betas_zero_snr:
            betas = _rescale_zero_terminal_snr(betas)
        self.betas = betas.astype(np.float32)
        self.alphas_cumprod = np.cumprod(1.0 - self.betas, dtype=np.float32)
        # At the last step there is no previous alpha: 1.0, or the first alpha.
        self.final_alpha_cumprod = np.float32(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self.init_noise_sigma = 1.0
        self.sigma_data = 0.5
        self.timesteps = np.zeros(0, dtype=np.int64)
        self.num_inference_steps = None

    @classmethod
    def from_config(cls, config: dict) -> "LCMScheduler":
        """Build from diffusers' ``scheduler_config.json`` contents; unknown keys are ignored."""
        return cls(**{k: v for k, v in config.items() if not k.startswith("_")})

    def set_timesteps(self, num_inference_steps: int, original_inference_steps: int | None = None) -> np.ndarray:
        """Select ``num_inference_steps`` timesteps from the LCM training schedule (descending).

        The training (distillation) schedule has ``original_inference_steps`` evenly spaced
        timesteps k-1, 2k-1, … (k = T / original steps); inference takes evenly spaced indices
        into it, from the noisiest: 4 of 50 over T=1000 -> [999, 759, 499, 259].
        """
        original = int(original_inference_steps or self.original_inference_steps)
        if original > self.num_train_timesteps:
            raise ValueError(f"original_inference_steps {original} exceeds num_train_timesteps {self.num_train_timesteps}")
        if not 1 <= num_inference_steps <= original:
            raise ValueError(f"num_inference_steps must be between 1 and original_inference_steps ({original}), got {num_inference_steps}")
        k = self.num_train_timesteps // original
        origin = (np.arange(1, original + 1) * k - 1)[::-1]
        idx = np.floor(np.linspace(0, len(origin), num=num_inference_steps, endpoint=False)).astype(np.int64)
        self.timesteps = origin[idx].astype(np.int64)
        self.num_inference_steps = num_inference_steps
        return self.timesteps

    def scalings(self, timestep: int) -> tuple[float, float]:
        """Boundary-condition scalings c_skip, c_out (consistency: f(x, ε) = x at t -> 0)."""
        t = timestep * self.timestep_scaling
        c_skip = self.sigma_data**2 / (t**2 + self.sigma_data**2)
        c_out = t / (t**2 + self.sigma_data**2) ** 0.5
        return c_skip, c_out

    def _alphas(self, timestep: int):
        """(steps left including this one, ᾱ_t, ᾱ_prev, 1 − ᾱ_t, 1 − ᾱ_prev) at ``timestep``, in float32;
        1 step left: the last step."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps() before step()")
        matches = np.nonzero(self.timesteps == timestep)[0]
        if len(matches) == 0:
            raise ValueError(f"timestep {timestep} is not in the schedule {self.timesteps.tolist()}")
        index = int(matches[0])
        steps_left = len(self.timesteps) - index
        prev_t = timestep if steps_left == 1 else int(self.timesteps[index + 1])
        a_t = self.alphas_cumprod[timestep]
        a_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        return steps_left, a_t, a_prev, np.float32(1) - a_t, np.float32(1) - a_prev

    def step(self, model_output: np.ndarray, timestep: int, sample: np.ndarray, noise: np.ndarray | None = None):
        """One LCM step; returns (prev_sample, denoised). ``noise`` is required unless this is the last step."""
        # 1.-2. Previous timestep (the last step maps onto itself), alphas and betas
        steps_left, a_t, a_prev, b_t, b_prev = self._alphas(timestep)
        last = steps_left == 1

        # 3. Scalings for the boundary condition
        c_skip, c_out = self.scalings(timestep)

        # 4. Predicted original sample x̂_0 from the model's parameterization
        if self.prediction_type == "epsilon":
            x0 = (sample - np.sqrt(b_t) * model_output) / np.sqrt(a_t)
        elif self.prediction_type == "sample":
            x0 = model_output
        else:  # v_prediction
            x0 = np.sqrt(a_t) * sample - np.sqrt(b_t) * model_output

        # 5. Optional clipping of x̂_0
        if self.clip_sample:
            x0 = np.clip(x0, -self.clip_sample_range, self.clip_sample_range)

        # 6. Denoise with the boundary-condition scalings: f(x_t, t) = c_skip·x_t + c_out·x̂_0
        denoised = (np.float32(c_out) * x0 + np.float32(c_skip) * sample).astype(np.float32, copy=False)

        # 7. Re-noise to the next timestep (multistep sampling); never after the last step
        if last:
            return denoised, denoised
        if noise is None:
            raise ValueError(f"step at timestep {timestep} needs noise (every step but the last)")
        prev = np.sqrt(a_prev) * denoised + np.sqrt(b_prev) * noise.astype(np.float32, copy=False)
        return prev.astype(np.float32, copy=False), denoised

    def step_coefficients(self, timestep: int, guidance: float = 1.0) -> np.ndarray:
        """Every number ``step`` uses at ``timestep``, as the float32 vector the step graph takes
        (``lcm_export/core/step_graph.py``, layout ``COEF``): x̂_0 = (k_sample·x − k_eps·ε) / k_div clipped
        to [clip_lo, clip_hi], the boundary scalings, the re-noising factors (1 and 0 at the last
        step, where ``step`` returns the denoised sample), the guidance scale, and the steps left
        including this one (n − i at step i of n: the graph's NaN/inf flag names the first bad step)."""
        steps_left, a_t, a_prev, b_t, b_prev = self._alphas(timestep)
        c_skip, c_out = self.scalings(timestep)
        one, zero = np.float32(1), np.float32(0)
        k = {"epsilon": (one, np.sqrt(b_t), np.sqrt(a_t)),
             "v_prediction": (np.sqrt(a_t), np.sqrt(b_t), one),
             "sample": (zero, -one, one)}[self.prediction_type]
        lo, hi = (-self.clip_sample_range, self.clip_sample_range) if self.clip_sample else (-np.inf, np.inf)
        renoise = (one, zero) if steps_left == 1 else (np.sqrt(a_prev), np.sqrt(b_prev))
        return np.array([*k, lo, hi, c_out, c_skip, *renoise, guidance, steps_left], dtype=np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Rescale betas to zero terminal SNR (Lin et al., 2023, Algorithm 1)."""
    alphas_bar_sqrt = np.sqrt(np.cumprod(1.0 - betas, dtype=np.float32))
    first, last = alphas_bar_sqrt[0].copy(), alphas_bar_sqrt[-1].copy()
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * first / (first - last)
    alphas_bar = alphas_bar_sqrt**2
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return (1 - alphas).astype(np.float32)
