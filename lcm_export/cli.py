"""``lcm-export`` — flags in, library calls out. No logic of its own beyond parsing."""

from __future__ import annotations

import argparse
import json
import os
import sys

from .backends import names as backend_names
from .errors import EXIT_ENGINE_ERROR, EXIT_USER_ERROR, EngineError, UserError


def _resolution(text: str) -> tuple[int, int]:
    """``HxW`` -> (H, W); the library checks sizes (multiples of the UNet's, max side) in one message."""
    try:
        h, w = text.lower().split("x")
        return int(h), int(w)
    except ValueError:
        raise argparse.ArgumentTypeError(f"resolution {text!r} is not HxW (e.g. 512x512)") from None


def _dynamic(text: str) -> tuple[tuple[int, int], tuple[int, int]]:
    try:
        lo, hi = text.split("-")
        return _resolution(lo), _resolution(hi)
    except (ValueError, argparse.ArgumentTypeError):
        raise argparse.ArgumentTypeError(f"--dynamic {text!r} is not HxW-HxW (e.g. 256x256-768x768)") from None


def _csv(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


_QUIET_HELP = ("no progress bars (drawn only on a terminal anyway), and no other library's messages on stderr "
               "(lcm-export's own warning: lines stay)")


def _lora_help() -> str:
    return ("LoRA file (.safetensors; diffusers/PEFT or kohya, LoCon convs included) with optional λ: PATH[:WEIGHT]; "
            "WEIGHT is any real number (default 1.0; the paper uses 1.0 for LCM-LoRA, 0.8 for style LoRAs). Repeatable.")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The epilog's example keeps its line breaks (raw); descriptions are wrapped as argparse wraps them."""

    def _fill_text(self, text, width, indent):
        if text.startswith("example:"):
            return super()._fill_text(text, width, indent)
        return argparse.HelpFormatter._fill_text(self, text, width, indent)


def _example(*lines: str) -> dict:
    """``add_parser`` / parser keywords: one example command, shown at the end of ``--help``."""
    return {"epilog": "example:\n" + "\n".join("  " + line for line in lines), "formatter_class": _HelpFormatter}


class _Parser(argparse.ArgumentParser):
    """A bad flag is bad input like any other: one ``error:`` line, exit 2 (argparse would print its
    usage block first)."""

    def error(self, message):
        raise UserError(f"{message}; see `{self.prog} --help`")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="lcm-export",
        description="Fuse LCM-LoRA + style LoRAs into Stable Diffusion, export to ONNX, build TensorRT / OpenVINO / "
                    "ONNX Runtime engines and run 4-step LCM generation with a lean numpy runtime.",
        **_example("lcm-export build-engine --engine-dir engines/demo-sd15"),
    )
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    f = sub.add_parser("fuse", help="merge LoRAs into a base model: W = W0 + Σ λ·(alpha/r)·B·A",
                       description="Fuse LoRAs into a base model and save a diffusers folder plus fusion.json.",
                       **_example("lcm-export fuse --base runwayml/stable-diffusion-v1-5 \\",
                                  "    --lora lcm-lora-sdv1-5.safetensors:1.0 --lora papercut.safetensors:0.8 --out out/sd15-papercut"))
    f.add_argument("--base", required=True, help="hub id, local diffusers folder, or demo:sd15 / demo:sd15-full / demo:sdxl / demo:ssd1b / demo:sdxl-full (random weights)")
    f.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]", help=_lora_help())
    f.add_argument("--out", required=True, help="output folder (refused if it exists, unless --force)")
    f.add_argument("--force", action="store_true", help="replace --out if it exists")
    f.add_argument("--quiet", action="store_true", help=_QUIET_HELP)

    e = sub.add_parser("export", help="export a fused model's text encoder, UNet and VAE decoder to ONNX",
                       description="Export text encoder, UNet and VAE decoder to ONNX and check each against PyTorch in ONNX Runtime.",
                       **_example("lcm-export export --model out/sd15-papercut --out out/sd15-papercut-onnx"))
    e.add_argument("--model", required=True, help="fused model folder (from `fuse`), a diffusers folder, hub id or demo:NAME")
    e.add_argument("--out", required=True, help="output folder for the ONNX files and export.json")
    e.add_argument("--resolution", type=_resolution, default=None, metavar="HxW", help="resolution of the parity check inputs (default: the family's: 512x512 for SD 1.5, 1024x1024 for SDXL / SSD-1B)")
    e.add_argument("--force", action="store_true", help="replace --out if it exists")
    e.add_argument("--quiet", action="store_true", help=_QUIET_HELP)

    b = sub.add_parser("build-engine", help="fuse → export → build an engine-store entry (the common case)",
                       description="Chain fuse, export and build. With no --base: the demo model and its two demo LoRAs. "
                                   "Every CPU engine is checked against the fused PyTorch model at each resolution: an fp32 "
                                   "engine against a float64 run of it, passing when its rel-L2 is within max(1e-4, 10 x PyTorch "
                                   "fp32's own); a bf16 entry by its 4-step image (at least 30 dB PSNR against PyTorch fp32), an int8 entry "
                                   "by PSNR and SSIM (at least 25 dB and 0.90). "
                                   "A failing build writes nothing.",
                       **_example("lcm-export build-engine --engine-dir engines/demo-sd15-fast --preset fast"))
    b.add_argument("--base", default=None, help="hub id, local diffusers folder or demo:NAME (default: demo:sd15 with the demo LoRAs)")
    b.add_argument("--lora", action="append", default=[], metavar="PATH[:WEIGHT]", help=_lora_help())
    b.add_argument("--resolution", action="append", type=_resolution, default=[], metavar="HxW",
                   help="image resolution to build for (repeatable). Sides must be multiples of 64 for SD 1.5 / SDXL "
                        "(16 for the tiny demos) and at most 4096. Default: the family's, 512x512 for SD 1.5, 1024x1024 "
                        "for SDXL / SSD-1B")
    b.add_argument("--dynamic", type=_dynamic, default=None, metavar="HxW-HxW",
                   help="one dynamic-shape engine over this range instead of static ones per resolution")
    b.add_argument("--batch", type=int, default=1, help="images per call, B, 1 to 64 (UNet runs at B, or 2B with guidance)")
    b.add_argument("--guidance", choices=("auto", "on", "off"), default="auto",
                   help="classifier-free guidance shapes: off = UNet batch B, on = 2B, auto = both (default)")
    b.add_argument("--backend", choices=("auto", *backend_names()), default="auto",
                   help="auto (default): TensorRT where it imports and a CUDA GPU exists; else ONNX Runtime on CUDA; "
                        "on CPUs the backend measured fastest for the precision (OpenVINO, for bf16 and fp32; ONNX Runtime "
                        "where OpenVINO is missing)")
    b.add_argument("--precision", choices=("auto", "fp32", "fp16", "bf16", "int8"), default="auto",
                   help="auto (default): fp16 on NVIDIA GPUs (TensorRT; ONNX Runtime's CUDA provider without it); on CPUs "
                        "bf16 where the CPU has native bf16 (AMX or AVX512_BF16), else fp32. bf16 needs --backend openvino "
                        "and such a CPU; fp16 needs a GPU: --backend tensorrt, or onnxruntime with onnxruntime-gpu (the "
                        "graph fused and converted as ONNX Runtime's own Stable Diffusion tooling does; refused where "
                        "ONNX Runtime has no CUDA provider: its CPU provider has no fast fp16 kernels). bf16 and ONNX "
                        "Runtime fp16 entries' 4-step images are checked against PyTorch fp32 and refused below 30 dB PSNR. "
                        "int8: the UNet quantized by NNCF (OpenVINO), calibrated on the entry's own 4-step LCM trajectories "
                        "of 8 built-in prompts; text encoder and VAE as in a bf16 entry (fp32 without native bf16); builds on "
                        "the CPU classes where int8 measured no slower than fp32 (AMX, AVX512_VNNI / AVX_VNNI, AVX2; not on "
                        "AVX-512 without VNNI, unmeasured) and needs the [build] extra's nncf; its "
                        "image is refused below 25 dB PSNR or SSIM 0.90")
    b.add_argument("--vae-fp32", action="store_true",
                   help="fp16 GPU entries (TensorRT, ONNX Runtime): keep the VAE decoder in fp32 (always done for VAEs "
                        "marked force_upcast, and on TensorRT when fp16 overflows)")
    b.add_argument("--int8-scheme", default="auto", metavar="SCHEME",
                   help="int8 only: what is quantized. w8a8 (auto: the fastest that passed, benchmarks/reports/cpu-fast): weights and activations of every "
                        "convolution and matrix product; w8a8-sq: the same with SmoothQuant; hybrid: int8 weights only "
                        "for the linear layers, full int8 for convolutions and attention; w8: int8 weights only (smaller, "
                        "barely faster). Recorded in the manifest")
    b.add_argument("--vae-decoder", default=None, metavar="SRC",
                   help="decode with a tiny VAE decoder (diffusers AutoencoderTiny, the TAESD family) instead of the "
                        "base's: a hub id (madebyollin/taesd for SD 1.5, madebyollin/taesdxl for SDXL / SSD-1B), a local "
                        "AutoencoderTiny folder, or demo:taesd / demo:taesdxl (random weights). About 1/18 of the SD 1.5 "
                        "decoder's FLOPs at 512² (141 vs 2515 GFLOP, benchmarks/decoder_flops.py); it approximates the full decoder: its image is compared with diffusers using the same decoder, and with the base's VAE "
                        "(manifest, inspect). A decoder for another family is refused")
    b.add_argument("--preset", choices=("quality", "fast"), default="quality",
                   help="quality (default): the entry described above. fast: an int8 UNet where int8 measured faster "
                        "on this CPU class (AMX, VNNI, AVX2; else the auto precision, said in one line) and a tiny VAE decoder (--vae-decoder, "
                        "default the family's TAESD: madebyollin/taesd(xl), demo:taesd(xl) for demo bases). Explicit "
                        "--precision / --vae-decoder win over the preset")
    b.add_argument("--refit", action="store_true",
                   help="TensorRT: build refittable engines (slightly slower), so a later change of LoRAs or λ is refit "
                        "into them instead of rebuilt. CPU entries are always refittable")
    b.add_argument("--no-refit", action="store_true",
                   help="never refit: when only LoRAs or λ changed, take the full fuse → export → build path anyway. "
                        "By default such a change patches the entry's exported ONNX weights and re-derives only the "
                        "changed components (no re-export), checked against PyTorch as a fresh build is")
    b.add_argument("--adapters", action="store_true",
                   help="build adapter branches into the UNet and text encoder(s), so style LoRAs added with `lcm-export "
                        "adapter add` apply per call (`generate --adapter NAME:WEIGHT`) without a rebuild (CPU entries: ONNX Runtime "
                        "and OpenVINO, not int8; Linear layers and 1x1 convolutions; a little slower per step, see docs/adapters-and-refit.md)")
    b.add_argument("--engine-dir", default=None, help="engine-store entry to write (default: engines/<name>)")
    b.add_argument("--name", default=None, help="entry name under engines/ (default: derived from the base)")
    b.add_argument("--threads", type=int, default=None,
                   help="CPU threads recorded as the entry's default (default: all cores; $LCM_EXPORT_THREADS overrides at run time; "
                        "any count is capped at the cores of the machine that runs the entry)")
    b.add_argument("--force", action="store_true", help="rebuild even when the entry is up to date; replace an entry that holds another model")
    b.add_argument("--dry-run", action="store_true",
                   help="print the build plan (source, preset, backend and precision, shapes, decoder, LoRAs, keys, and whether "
                        "the entry there is reused, refit or rebuilt) and stop before any fusion or export: the entry is not touched")
    b.add_argument("--quiet", action="store_true", help=_QUIET_HELP)

    i = sub.add_parser("inspect", help="show an engine-store entry's manifest", description="Print an engine-store entry's manifest.",
                       **_example("lcm-export inspect engines/demo-sd15"))
    i.add_argument("engine_dir", help="engine-store entry (folder with manifest.json); its schema and file sizes are checked")
    i.add_argument("--json", action="store_true", help="print the raw manifest JSON")

    g = sub.add_parser("generate", help="text → image with the lean runtime (numpy + engines; no torch)",
                       description="Generate images with the lean runtime around a built engine.",
                       **_example("lcm-export generate --engine-dir engines/demo-sd15 \\",
                                  "    --prompt \"a photo of an astronaut riding a horse\" --out out/demo.png"))
    g.add_argument("--engine-dir", required=True, help="engine-store entry built by build-engine")
    g.add_argument("--prompt", required=True, help="text prompt (may be empty: unconditional); UTF-8 text")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (used when --guidance > 1)")
    g.add_argument("--steps", type=int, default=4, help="LCM steps, 1-50 (default 4)")
    g.add_argument("--guidance", type=float, default=1.0,
                   help="classifier-free guidance scale, 0 to 30; > 1 runs the UNet at 2B (default 1.0; LCM-LoRA works best at 1-2)")
    g.add_argument("--seed", type=int, default=0, help="seed of numpy's Generator for latents and step noise (a whole number >= 0)")
    g.add_argument("--batch", type=int, default=1, help="images per call, 1 to 64 (default 1)")
    g.add_argument("--resolution", type=_resolution, default=None, metavar="HxW", help="one the engine was built for (default: its first)")
    g.add_argument("--adapter", action="append", default=[], metavar="NAME[:WEIGHT]",
                   help="apply a style adapter the entry holds (`lcm-export adapter list`) at WEIGHT (default 1.0; "
                        "-8 to 8, 0 = off); repeat to mix several")
    g.add_argument("--shapes", choices=("auto", "static", "dynamic"), default="auto",
                   help="auto (default): static where the entry's backend can (OpenVINO), else as built; static: each "
                        "engine compiled for this call's size and batch (images 7-15 %% faster at 256², 5-9 %% at 512² on an "
                        "AMX Xeon; with no --adapter, an --adapters entry runs without its branches; OpenVINO entries "
                        "only); dynamic: compiled once for every built size")
    g.add_argument("--out", required=True, help="output PNG; batch > 1 writes OUT-0.png, OUT-1.png, …")
    g.add_argument("--json", action="store_true", help="also print the timings as JSON")

    ad = sub.add_parser("adapter", help="style LoRAs as run-time adapters of an entry: add, list, remove",
                        description="Prepare style LoRAs once into an entry built with --adapters, then apply them per "
                                    "call (generate --adapter, serve's \"adapters\" field) without rebuilding.",
                        **_example("lcm-export adapter add --engine-dir engines/sd15-lcm papercut.safetensors"))
    asub = ad.add_subparsers(dest="adapter_cmd", required=True, metavar="ACTION")
    aa = asub.add_parser("add", help="prepare a LoRA file (kohya, PEFT, diffusers) as an adapter of the entry",
                         description="Read a LoRA .safetensors file as build-engine --lora does (every layer must match the "
                                     "entry's model) and store its factors in the entry's layout; needs the [build] extra.",
                         **_example("lcm-export adapter add --engine-dir engines/sd15-lcm pixel-art.safetensors --name pixel"))
    aa.add_argument("--engine-dir", required=True, help="engine-store entry built with --adapters")
    aa.add_argument("file", help="LoRA .safetensors file")
    aa.add_argument("--name", default=None, help="adapter name (default: the file's stem); letters, digits, . _ -")
    aa.add_argument("--force", action="store_true", help="replace an adapter of the same name")
    aa.add_argument("--quiet", action="store_true", help=_QUIET_HELP)
    al = asub.add_parser("list", help="the adapters an entry holds",
                         **_example("lcm-export adapter list --engine-dir engines/sd15-lcm"))
    al.add_argument("--engine-dir", required=True, help="engine-store entry")
    al.add_argument("--json", action="store_true", help="print the index as JSON")
    ar = asub.add_parser("remove", help="remove an adapter from the entry",
                         **_example("lcm-export adapter remove --engine-dir engines/sd15-lcm pixel"))
    ar.add_argument("--engine-dir", required=True, help="engine-store entry")
    ar.add_argument("name", help="adapter name")

    s = sub.add_parser("bench", help="latency of the engine vs PyTorch baselines; writes report.json/.md and charts",
                       description="Benchmark the engine path against diffusers eager / torch.compile and the paper's solver comparison.",
                       **_example("lcm-export bench --engine-dir engines/demo-sd15 --baselines eager,compile --runs 2 --warmup 1 \\",
                                  "    --out out/bench-demo"))
    s.add_argument("--engine-dir", required=True, help="engine-store entry built by build-engine")
    s.add_argument("--baselines", type=_csv, default=["eager"], help="comma list of eager,compile,reduce-overhead,bf16 (default: eager; empty string for none; reduce-overhead = torch.compile with CUDA graphs, GPU only; bf16 = modules cast to bf16, on CPUs only with native bf16 (AMX or AVX512_BF16)). A baseline that cannot run here is skipped: one warning line and the report say why")
    s.add_argument("--solvers", type=_csv, default=["lcm:4", "ddim:32", "dpm:16", "dpmpp:8"],
                   help="PyTorch solver comparison as NAME:STEPS, NAME in lcm,ddim,dpm,dpmpp (default: the paper's Table 2; empty for none)")
    s.add_argument("--resolution", type=_resolution, default=None, metavar="HxW", help="one the engine was built for (default: its first)")
    s.add_argument("--guidance", type=float, default=1.0, help="guidance scale for every path (default 1.0)")
    s.add_argument("--runs", type=int, default=5, help="timed runs per path (median and p90 reported)")
    s.add_argument("--warmup", type=int, default=1, help="untimed runs first")
    s.add_argument("--solver-runs", type=int, default=None, help="timed runs for the solver comparison (default: --runs)")
    s.add_argument("--threads", type=int, default=None, help="threads for ONNX Runtime and torch (default: all cores)")
    s.add_argument("--no-cold-start", action="store_true", help="skip the cold-start (fresh process) measurement")
    s.add_argument("--out", required=True, help="report folder (report.json, report.md, *.png)")
    s.add_argument("--quiet", action="store_true", help=_QUIET_HELP)

    v = sub.add_parser("serve", help="HTTP text → image on Ray Serve: replicas, batching, backpressure (needs [serve])",
                       description="Serve an engine-store entry over HTTP with Ray Serve: POST /generate, GET /health, "
                                   "docs at /docs. Starts a local Ray cluster unless --address names one. Ctrl-C stops.",
                       **_example("lcm-export serve --engine-dir engines/demo-sd15 --port 8000"))
    v.add_argument("--engine-dir", required=True, help="engine-store entry built by build-engine")
    v.add_argument("--replicas", type=int, default=1, help="replicas, each with its own copy of the engines (default 1)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it)")
    v.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    v.add_argument("--max-ongoing-requests", type=int, default=4,
                   help="requests one replica holds at once; more wait in the proxy's queue (default 4)")
    v.add_argument("--max-queued-requests", type=int, default=None,
                   help="requests the proxy queues when every replica is full; past it (after up to 1 s of waiting "
                        "for room): 503 + Retry-After (default: replicas × max ongoing)")
    v.add_argument("--max-batch-size", type=int, default=None,
                   help="images merged into one engine call, at most the entry's --batch (default: the entry's --batch on "
                        "ONNX Runtime CPU entries, where merged images were measured byte-equal to solo ones; 1 on others)")
    v.add_argument("--batch-wait-ms", type=float, default=5.0,
                   help="how long a replica waits for requests to merge, 0 to 1000 (default 5; only when merging is possible)")
    v.add_argument("--threads", type=int, default=None, help="engine threads per replica (default: cores / replicas; at most the cores)")
    v.add_argument("--address", default=None, help="join this Ray cluster (e.g. auto, or HOST:6379) instead of starting one")
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit codes: 0 done; 2 bad input (``UserError``); 1 an engine or the runtime failed
    (``EngineError``); 130 / 143 interrupted by SIGINT / SIGTERM (nothing half-written is kept).
    Each failure prints one line, ``error: <message>``, on stderr: what the libraries print meanwhile is
    spooled (``_stderr.py``) and shown only after a success."""
    from ._stderr import Spool, replayable
    from ._util import Terminated, no_space_left, termination_as_interrupt

    spool, quiet = Spool(), False
    try:
        with spool:
            args = build_parser().parse_args(argv)
            quiet = bool(getattr(args, "quiet", False))
            with termination_as_interrupt():
                code = _dispatch(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_ENGINE_ERROR
    except KeyboardInterrupt as exc:
        signum = exc.signum if isinstance(exc, Terminated) else 2
        print(f"error: {'terminated' if signum != 2 else 'interrupted'}; nothing half-written was kept", file=sys.stderr)
        return 128 + signum
    except BrokenPipeError:
        # the reader of our stdout went away (`lcm-export inspect DIR | head -1`): nothing left to say
        _silence_stdout()
        return 0
    except Exception as exc:
        if no_space_left(exc):  # a library's write failure that no writing() guard named: still one line
            print(f"error: no space left on device ({str(exc).strip().splitlines()[0][:200]}); free disk space or "
                  "choose another --out/--engine-dir", file=sys.stderr)
            return EXIT_USER_ERROR
        sys.stderr.write(replayable(spool.text, False))  # a bug: everything, then the traceback
        raise
    except BaseException:  # SystemExit (--help), ...
        sys.stderr.write(replayable(spool.text, False))
        raise
    sys.stderr.write(replayable(spool.text, quiet))
    return code


def _silence_stdout() -> None:
    """After EPIPE, point stdout at /dev/null so the interpreter's final flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def _quiet_libraries() -> None:
    """--quiet: silence diffusers' / transformers' own loading bars too."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        import diffusers.utils.logging as dl
        import transformers.utils.logging as tl

        dl.disable_progress_bar()
        tl.disable_progress_bar()
    except ImportError:
        pass


_NOISE = ("requires torchvision (not installed)",)
"""Library messages about nothing lcm-export does: transformers warns, when diffusers' pipelines import, that image
processors (safety checker, IP-Adapter) fall back to PIL without torchvision; lcm-export runs none of them."""


class _DropNoise:
    def filter(self, record) -> bool:
        return not any(n in record.getMessage() for n in _NOISE)


def _drop_library_noise() -> None:
    import logging

    logging.getLogger("transformers.utils.import_utils").addFilter(_DropNoise())


def _dispatch(a) -> int:
    _drop_library_noise()
    if getattr(a, "quiet", False):
        _quiet_libraries()
    if a.cmd == "fuse":
        from .builder.fuse import LoraSpec, fuse

        specs = [LoraSpec.parse(s) for s in a.lora]
        rec = fuse(a.base, specs, a.out, force=a.force, show_progress=not a.quiet)
        touched = ", ".join(f"{os.path.basename(l['path'])} λ={l['weight']:g} ({l['format']}, {sum(l['layers'].values())} layers)" for l in rec["loras"])
        print(f"fused {a.base} + [{touched or 'no LoRAs'}] -> {a.out}")
        if rec["base"]["kind"] == "demo":
            print("note: demo model with random weights: its images are noise")
        return 0
    if a.cmd == "export":
        from .builder.export import export_model

        res = export_model(a.model, a.out, resolution=a.resolution, force=a.force, show_progress=not a.quiet)
        from .store.manifest import describe_parity

        for comp, c in res["components"].items():
            print(f"{comp:13s} {c['file']}  {describe_parity(c['parity'])}")
        return 0
    if a.cmd == "build-engine":
        from .builder.build_engine import BuildOptions, build_engine

        opts = BuildOptions(
            base=a.base, loras=tuple(a.lora), resolutions=tuple(a.resolution), dynamic=a.dynamic, batch=a.batch,
            guidance=a.guidance, backend=a.backend, precision=a.precision, int8_scheme=a.int8_scheme, vae_decoder=a.vae_decoder,
            preset=a.preset, vae_fp32=a.vae_fp32, refit=a.refit, no_refit=a.no_refit,
            adapters=a.adapters, engine_dir=a.engine_dir, name=a.name, threads=a.threads, force=a.force, show_progress=not a.quiet,
        )
        if a.dry_run:
            from .builder.plan import format_plan, make_plan

            print(format_plan(make_plan(opts)))
            return 0
        result = build_engine(opts)
        print(result.summary())
        return 0
    if a.cmd == "inspect":
        from .store.manifest import format_manifest, read_manifest

        m = read_manifest(a.engine_dir)
        print(json.dumps(m, indent=2) if a.json else format_manifest(m, a.engine_dir))
        return 0
    if a.cmd == "generate":
        from .runtime.cli import generate_cmd

        return generate_cmd(a)
    if a.cmd == "adapter":
        from .adapters import index as ad

        if a.adapter_cmd == "add":
            rec = ad.add_adapter(a.engine_dir, a.file, a.name, a.force)
            print(f"added adapter {rec['name']} to {a.engine_dir}: rank {','.join(map(str, rec['ranks']))}, layers "
                  + ", ".join(f"{c} {n}" for c, n in rec["layers"].items()) + f", {rec['bytes'] / 1e6:.1f} MB")
        elif a.adapter_cmd == "list":
            index = ad.list_adapters(a.engine_dir)
            print(json.dumps(index, indent=2) if a.json else ad.format_adapters(index))
        else:
            ad.remove_adapter(a.engine_dir, a.name)
            print(f"removed adapter {a.name} from {a.engine_dir}")
        return 0
    if a.cmd == "bench":
        from .bench.harness import BenchOptions, run_bench

        opts = BenchOptions(
            engine_dir=a.engine_dir, baselines=tuple(a.baselines), solvers=tuple(a.solvers), resolution=a.resolution,
            guidance=a.guidance, runs=a.runs, warmup=a.warmup, solver_runs=a.solver_runs, threads=a.threads,
            cold_start=not a.no_cold_start, out=a.out, show_progress=not a.quiet,
        )
        report = run_bench(opts)
        print(report["summary_line"])
        print(f"report: {os.path.join(a.out, 'report.md')}")
        for name, p in report["paths"].items():  # a baseline asked for but not run here, and why (also in the report)
            if "skipped" in p:
                print(f"warning: {name} baseline skipped: {p['skipped']}", file=sys.stderr)
        for f in report["failures"]:  # recorded in the report; the run failed
            print(f"error: {f['row']} failed: {f['error']}", file=sys.stderr)
        return 1 if report["failures"] else 0
    if a.cmd == "serve":
        from .serve import ServeOptions, serve_forever

        return serve_forever(ServeOptions(
            engine_dir=a.engine_dir, replicas=a.replicas, host=a.host, port=a.port,
            max_ongoing_requests=a.max_ongoing_requests, max_queued_requests=a.max_queued_requests,
            max_batch_size=a.max_batch_size, batch_wait_ms=a.batch_wait_ms, threads=a.threads, address=a.address,
        ))
    raise AssertionError(a.cmd)


if __name__ == "__main__":
    sys.exit(main())
