#!/usr/bin/env python
"""The GPU check: the real trainer over a matrix of short runs on full-size random-weight models.

    PYTHONUNBUFFERED=1 python bench/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu_check.log"
    python bench/gpu_check.py --tiny --out /tmp/gpu_check   # the same matrix on the CPU: tiny models, fp32

(The checkout installed, `pip install -e .`, or on PYTHONPATH; docs/training.md has the GPU machine's command.)

It builds SD1.5 and SDXL with random weights from the shipped configs (nothing is downloaded),
writes a small synthetic dataset and runs `train_apt_lora.py` as users run it (`accelerate
launch`, a TOML config per run), one subprocess per run:

  sd15-{plain,apt}-{bf16,fp16}   512 px, batch 4, rank 16, AdamW, SDPA, cached latents
  sdxl-{plain,apt}-bf16          1024 px, batch 1, rank 16, AdamW8bit, gradient checkpointing,
                                 cached latents and text-encoder outputs
  sdxl-{plain,apt}-bf16-fp8      the same with fp8_base (presets/sdxl_8gb.toml's UNet in float8)
  sdxl-{plain,apt}-bf16-xformers the same with attention = "xformers" (only when xformers imports)
  sample-sdxl                    one image from the trained SDXL LoRA with tools/sample_lora.py
  reread-sdxl                    that LoRA read by the project's reader and by diffusers'
                                 load_lora_weights: the same layers and the same weight changes

Per run: seconds per step after the warm-up steps (median of 4-step means), peak GPU memory (the trainer's own
per-step `peak_memory_gib`, read from its tensorboard log), whether every loss was finite, the
mean loss (xformers and SDPA runs share seeds) and, for a failure, its one-line error. A failed
run does not stop the check. gpu_check.json and gpu_check.md (the table, also printed) are
rewritten after every run, so even a killed check leaves its results in --out.

--budget_s (default 480, start-up included) keeps the check within a time limit: with the
estimated cost of every run, runs are dropped in DROP_ORDER (least important first) until the
plan fits, and a run is also dropped when the time left no longer covers its estimate.
--tiny runs the matrix on the CPU with tiny models in fp32, so the test suite exercises the script
between GPU runs; there the fp16 rows (fp32 on a CPU, the same runs as the bf16 ones) and the
xformers rows (CUDA only) are skipped.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

IMPORTED = time.monotonic()
ROOT = Path(__file__).resolve().parents[1]

from library.devkit import make_images, write_config  # noqa: E402
INTERPRETER_START_S = 5  # before IMPORTED: the interpreter and this module's imports


@dataclass(frozen=True)
class Run:
    name: str
    kind: str                 # "train", "sample" or "reread"
    arch: str                 # "sd15" or "sdxl"
    apt: bool = False
    precision: str = "bf16"
    attention: str = "sdpa"
    fp8: bool = False         # fp8_base: the frozen UNet (and text encoders) stored in float8


# Most important first; the check runs them in this order.
MATRIX = [
    Run("sdxl-plain-bf16", "train", "sdxl"),
    Run("sdxl-apt-bf16", "train", "sdxl", apt=True),
    Run("sd15-apt-bf16", "train", "sd15", apt=True),
    Run("sd15-plain-bf16", "train", "sd15"),
    Run("sdxl-apt-bf16-fp8", "train", "sdxl", apt=True, fp8=True),
    Run("sdxl-plain-bf16-fp8", "train", "sdxl", fp8=True),
    Run("sample-sdxl", "sample", "sdxl"),
    Run("sd15-apt-fp16", "train", "sd15", apt=True, precision="fp16"),
    Run("sd15-plain-fp16", "train", "sd15", precision="fp16"),
    Run("reread-sdxl", "reread", "sdxl"),
    Run("sdxl-plain-bf16-xformers", "train", "sdxl", attention="xformers"),
    Run("sdxl-apt-bf16-xformers", "train", "sdxl", apt=True, attention="xformers"),
]
DROP_ORDER = [r.name for r in reversed(MATRIX)]

# Per architecture: the shipped config tree (full size, tiny), resolution (full, tiny) and the settings.
ARCHS = {
    "sd15": {"trees": ("sd15", "tiny_sd15"), "resolution": (512, 64), "batch": 4, "optimizer": "AdamW",
             "checkpointing": False, "cache_text": False},
    "sdxl": {"trees": ("sdxl", "tiny_sdxl"), "resolution": (1024, 64), "batch": 1, "optimizer": "AdamW8bit",
             "checkpointing": True, "cache_text": True},
}
RANK = 16

# Estimated seconds (GPU: an H200 with a warm page cache; tiny: 2 busy CPU cores). A training run's
# estimate covers the process start, model load, caching, warm-up and measured steps and the save.
ESTIMATES = {
    False: {"start": 15, "build-sd15": 15, "build-sdxl": 35, "train-sd15": 30, "train-sdxl": 45,
            "apt": 1.4, "sample": 40, "reread": 30},
    True: {"start": 5, "build-sd15": 3, "build-sdxl": 3, "train-sd15": 15, "train-sdxl": 15,
           "apt": 1.5, "sample": 15, "reread": 5},
}


def estimate(run: Run, tiny: bool) -> float:
    e = ESTIMATES[tiny]
    if run.kind == "train":
        return e[f"train-{run.arch}"] * (e["apt"] if run.apt else 1.0)
    return e[run.kind]


def plan_cost(runs: list[Run], tiny: bool) -> float:
    """Estimated seconds for these runs, the start-up and the models they need."""
    e = ESTIMATES[tiny]
    return e["start"] + sum(e[f"build-{a}"] for a in sorted({r.arch for r in runs})) + \
        sum(estimate(r, tiny) for r in runs)


def plan(runs: list[Run], budget_s: float, tiny: bool) -> tuple[list[Run], list[Run]]:
    """(kept, dropped): runs leave in DROP_ORDER until the estimated total fits the budget; a sample
    or re-read goes with the last training run of its architecture (it has no LoRA to use)."""
    kept = list(runs)

    def orphans(keep: list[Run]) -> list[Run]:
        trained = {r.arch for r in keep if r.kind == "train"}
        return [r for r in keep if r.kind == "train" or r.arch in trained]

    kept = orphans(kept)
    for name in DROP_ORDER:
        if plan_cost(kept, tiny) <= budget_s:
            break
        kept = orphans([r for r in kept if r.name != name])
    if plan_cost(kept, tiny) > budget_s:
        kept = []
    return kept, [r for r in runs if r not in kept]


# --- models and data --------------------------------------------------------------------------
def build_model(arch: str, tiny: bool, folder: Path) -> None:
    """A random-weight model of the shipped config as a diffusers folder (fp16 on disk when full
    size: half the bytes to write and to read in every run)."""
    import torch

    from library.models.tiny import build_random_pipeline, save_diffusers

    from library.utils.runtime import setup_logging

    setup_logging()  # no progress bars from save_pretrained
    device = "cuda" if torch.cuda.is_available() and not tiny else "cpu"
    pipe = build_random_pipeline(ARCHS[arch]["trees"][tiny], seed=0, device=device)
    pipe.to("cpu", torch.float32 if tiny else torch.float16)
    save_diffusers(pipe, folder)
    del pipe
    if device == "cuda":
        torch.cuda.empty_cache()


def write_train_config(run: Run, folder: Path, model: Path, images: Path, tiny: bool, steps: int) -> Path:
    a = ARCHS[run.arch]
    tables = {
        "model": {"pretrained_model_name_or_path": model},
        "network": {"network_dim": RANK, "network_alpha": float(RANK)},
        "optimizer": {"optimizer_type": a["optimizer"], "learning_rate": 1e-4},
        "training": {"max_train_steps": steps, "train_batch_size": a["batch"],
                     "mixed_precision": "no" if tiny else run.precision, "attention": run.attention,
                     "gradient_checkpointing": a["checkpointing"], "apt": run.apt, "fp8_base": run.fp8,
                     "seed": 42},
        "data": {"cache_latents": True, "cache_text_encoder_outputs": a["cache_text"]},
        "saving": {"output_dir": folder / "output", "output_name": run.name, "save_precision": "fp16"},
        "logging": {"log_with": "tensorboard", "logging_dir": folder / "logs"},
    }
    dataset = {"resolution": a["resolution"][tiny], "subsets": [{"image_dir": images}]}
    return write_config(folder / "config.toml", tables, [dataset])


# --- results ----------------------------------------------------------------------------------
@dataclass
class Result:
    name: str
    status: str = "pending"   # ok, failed, timeout, dropped, skipped
    s_per_step: float | None = None
    peak_gib: float | None = None
    losses_finite: bool | None = None
    mean_loss: float | None = None
    steps: int = 0
    wall_s: float | None = None
    error: str = ""
    extra: dict = field(default_factory=dict)


def read_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar of the tensorboard event files under `logdir`: tag -> [(step, value)] by step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(logdir.rglob("events.out.tfevents.*")) if logdir.is_dir() else []:
        acc = EventAccumulator(str(path), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags().get("scalars", []):
            out.setdefault(tag, []).extend((e.step, float(e.value)) for e in acc.Scalars(tag))
    return {tag: sorted(values) for tag, values in out.items()}


# APT's default reference_every = 4 makes every 4th step dearer: step times are averaged over
# windows of 4 consecutive steps (one reference pass each) before the median is taken.
CYCLE = 4


def train_metrics(scalars: dict, warmup: int, expected_steps: int) -> dict:
    """s/step after the warm-up (median of 4-step means), the highest per-step peak memory, finite
    losses, mean loss."""
    losses = [v for _, v in scalars.get("loss", [])]
    times = [v for step, v in scalars.get("s_per_it", []) if step > warmup]
    timed = [statistics.fmean(times[i:i + CYCLE]) for i in range(0, len(times) - CYCLE + 1, CYCLE)] or times
    peaks = [v for _, v in scalars.get("peak_memory_gib", [])]
    finite = [v for v in losses if math.isfinite(v)]
    finite_all = len(losses) == expected_steps and len(finite) == len(losses) if losses else None
    # GPU runs also log what the per-step allocated peak leaves out (library.train.tracking.RunMemory)
    memory = {key: max(v for _, v in scalars[tag]) for key, tag in MEMORY_TAGS.items() if scalars.get(tag)}
    return {"steps": len(losses), "losses_finite": finite_all,
            "s_per_step": statistics.median(timed) if timed else None, "peak_gib": max(peaks) if peaks else None,
            "mean_loss": statistics.fmean(finite) if finite else None, "extra": memory}


MEMORY_TAGS = {"reserved_gib": "peak_reserved_gib", "whole_run_gib": "peak_memory_whole_run_gib",
               "whole_run_reserved_gib": "peak_reserved_whole_run_gib", "device_used_gib": "device_memory_used_gib"}


EXCEPTION = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Interrupt|Exit)\b.*")


def error_line(log: str, code: int | None = None) -> str:
    """The one-line error of a failed process: the trainer's `error: ...` line, else the last
    exception line of a traceback (not accelerate launch's own CalledProcessError about the child),
    else the last line."""
    lines = [line.strip() for line in log.replace("\r", "\n").splitlines() if line.strip()]
    for line in reversed(lines):
        if line.startswith("error:"):
            return line[:300]
    for line in reversed(lines):
        if EXCEPTION.match(line) and not line.startswith("subprocess.CalledProcessError"):
            return line[:300]
    if code is not None and code < 0:
        return f"killed by signal {-code} (out of host memory?)"
    return (lines[-1] if lines else "no output")[:300]


def run_process(cmd: list[str], log_path: Path, timeout: float) -> tuple[int | None, str]:
    """(exit status or None on timeout, the output)."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    with open(log_path, "w") as log:
        try:
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                  timeout=max(timeout, 1)).returncode
        except subprocess.TimeoutExpired:
            code = None
    return code, log_path.read_text(errors="replace")


# --- the check --------------------------------------------------------------------------------
class Check:
    def __init__(self, args, started: float):
        self.args = args
        self.started = started
        self.tiny = args.tiny
        self.out = args.out
        self.work = args.work
        self.warmup = args.warmup if args.warmup is not None else (1 if self.tiny else 3)
        self.steps = args.steps if args.steps is not None else (1 if self.tiny else 3 * CYCLE)
        self.models: dict[str, Path | str] = {}   # arch -> folder, or the error that stopped its build
        self.loras: dict[str, Path] = {}          # run name -> trained LoRA
        self.results = {r.name: Result(r.name) for r in MATRIX}
        self.info = environment(self.tiny)
        self.info.update(budget_s=args.budget_s, warmup_steps=self.warmup, measured_steps=self.steps,
                         mode="tiny (CPU, fp32)" if self.tiny else "gpu")

    def elapsed(self) -> float:
        return time.monotonic() - self.started + INTERPRETER_START_S

    def launcher(self) -> list[str]:
        if self.args.launcher == "python" or (self.args.launcher is None and self.tiny):
            return [sys.executable]
        return [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no"]

    def run(self) -> int:
        self.out.mkdir(parents=True, exist_ok=True)
        chosen = [r for r in MATRIX if not self.args.only or r.name in self.args.only]
        for r in MATRIX:
            if r not in chosen:
                self.finish(r, "skipped", error="not in --only")
        runnable = []
        for r in chosen:
            reason = self.unavailable(r)
            if reason:
                self.finish(r, "skipped", error=reason)
            else:
                runnable.append(r)
        kept, dropped = plan(runnable, self.args.budget_s, self.tiny)
        for r in dropped:
            self.finish(r, "dropped", error=f"budget: {self.args.budget_s:.0f} s does not cover it (estimates)")
        size = 64 if self.tiny else 1024
        self.images = make_images(self.work / "images", 4 if self.tiny else 8, (size, size))
        for r in kept:
            left = self.args.budget_s - self.elapsed()
            if estimate(r, self.tiny) + (0 if r.arch in self.models else ESTIMATES[self.tiny][f"build-{r.arch}"]) > left:
                self.finish(r, "dropped", error=f"budget: {left:.0f} s left, needs about {estimate(r, self.tiny):.0f} s")
                continue
            print(f"[{self.elapsed():5.0f} s] {r.name} ...", flush=True)
            started = time.monotonic()
            try:
                getattr(self, f"do_{r.kind}")(r)
            except Exception as exc:  # a broken run is a row of the table, never the end of the check
                self.finish(r, "failed", error=f"{type(exc).__name__}: {exc}"[:300])
            x = self.results[r.name]
            x.wall_s = round(time.monotonic() - started, 1)
            print(f"  {x.status}, {x.wall_s:.0f} s" + (f", {x.s_per_step:.3f} s/step" if x.s_per_step else "")
                  + (f", peak {x.peak_gib:.2f} GiB" if x.peak_gib else ""), flush=True)
            self.write()
        self.write()
        print(render(self.info, self.results, self.tiny), flush=True)
        return 0

    def unavailable(self, run: Run) -> str:
        if self.tiny and run.precision == "fp16":
            return f"on the CPU fp16 runs as fp32: the same run as {run.name.replace('fp16', 'bf16')}"
        if run.attention == "xformers":
            if self.tiny:
                return "xformers runs only on a CUDA GPU"
            return xformers_probe()
        return ""

    def model(self, arch: str) -> Path:
        if arch not in self.models:
            started = time.monotonic()
            folder = self.work / "models" / arch
            try:
                build_model(arch, self.tiny, folder)
                self.models[arch] = folder
            except Exception as exc:
                self.models[arch] = f"building the {arch} model failed: {type(exc).__name__}: {exc}"[:300]
            self.info.setdefault("build_s", {})[arch] = round(time.monotonic() - started, 1)
        found = self.models[arch]
        if isinstance(found, str):
            raise RuntimeError(found)
        return found

    def timeout(self) -> float:
        return self.args.budget_s - self.elapsed() - 5  # leaves time to write the results

    def finish(self, run: Run, status: str, error: str = "", **values) -> None:
        result = self.results[run.name]
        result.status = status
        result.error = error
        for k, v in values.items():
            setattr(result, k, v)
        if status not in ("ok", "skipped", "dropped", "pending"):
            print(f"  {run.name}: {status}: {error}", flush=True)

    def subprocess(self, run: Run, cmd: list[str], folder: Path) -> str | None:
        """Runs `cmd`; returns its output, or None after recording the failure (with the log's tail
        printed, so the tee'd log of the check shows it)."""
        code, log = run_process(cmd, folder / "log.txt", self.timeout())
        if code == 0:
            return log
        tail = "\n".join(log.replace("\r", "\n").splitlines()[-25:])
        print(f"--- last lines of {run.name}'s output ---\n{tail}\n---", flush=True)
        if code is None:
            self.finish(run, "timeout", error=f"stopped after {self.timeout() + 5:.0f} s: the budget ran out")
        else:
            self.finish(run, "failed", error=error_line(log, code))
        return None

    def do_train(self, run: Run) -> None:
        folder = self.work / "runs" / run.name
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        total = self.warmup + self.steps
        config = write_train_config(run, folder, self.model(run.arch), self.images, self.tiny, total)
        log = self.subprocess(run, [*self.launcher(), str(ROOT / "train_apt_lora.py"), "--config", str(config)],
                              folder)
        metrics = train_metrics(read_scalars(folder / "logs"), self.warmup, total)
        lora = folder / "output" / f"{run.name}.safetensors"
        if log is None:  # the failure is recorded; keep what the log says about the steps it made
            for k, v in metrics.items():
                setattr(self.results[run.name], k, v)
            return
        if not lora.is_file():
            return self.finish(run, "failed", error=f"no LoRA file written ({lora.name})", **metrics)
        self.loras[run.name] = lora
        status = "ok" if metrics["losses_finite"] else "failed"
        self.finish(run, status, error="" if status == "ok" else
                    f"{metrics['steps']}/{total} losses logged, not all finite", **metrics)

    def trained_lora(self, arch: str) -> tuple[str, Path]:
        for name, path in self.loras.items():
            if name.startswith(arch):
                return name, path
        raise RuntimeError(f"no {arch} run trained a LoRA to use")

    def do_sample(self, run: Run) -> None:
        source, lora = self.trained_lora(run.arch)
        folder = self.work / "runs" / run.name
        folder.mkdir(parents=True, exist_ok=True)
        steps = 2 if self.tiny else 12
        cmd = [sys.executable, str(ROOT / "tools" / "sample_lora.py"), "--model", str(self.model(run.arch)),
               "--lora", str(lora), "--prompts", f"a photo of a red ball, gradient background --d 1 --s {steps}",
               "--out", str(folder / "images"), "--name", "gpu_check_sample"]
        if self.subprocess(run, cmd, folder) is None:
            return
        image = folder / "images" / "gpu_check_sample_00_1.png"
        if not image.is_file():
            return self.finish(run, "failed", error=f"sample_lora wrote no {image.name}")
        shutil.copyfile(image, self.out / "gpu_check_sample.png")
        self.finish(run, "ok", extra={"lora": source, "image": "gpu_check_sample.png"})

    def do_reread(self, run: Run) -> None:
        source, lora = self.trained_lora(run.arch)
        found = {"lora": source, **reread(lora, self.model(run.arch))}
        same = found["project_modules"] == found["diffusers_layers"] > 0 and found["max_rel_diff"] < 1e-3
        self.finish(run, "ok" if same else "failed", extra=found, error="" if same else
                    f"readers disagree: {found['project_modules']} modules (ours) vs {found['diffusers_layers']} "
                    f"LoRA layers (diffusers), largest relative weight difference {found['max_rel_diff']:.3g}")

    def write(self) -> None:
        from library.utils.atomic import atomic_write_text

        self.info["elapsed_s"] = round(self.elapsed(), 1)
        doc = {**self.info, "runs": [asdict(self.results[r.name]) | asdict(r) for r in MATRIX],
               "comparisons": comparisons(self.results)}
        atomic_write_text(self.out / "gpu_check.json", json.dumps(doc, indent=1) + "\n")
        atomic_write_text(self.out / "gpu_check.md", render(self.info, self.results, self.tiny) + "\n")


def xformers_probe() -> str:
    """"" when xformers' attention kernel runs here: one real call on the GPU, before a row loads a
    model for it (an import can succeed and the kernel still fail for this GPU or torch)."""
    try:
        import torch
        import xformers.ops

        q = torch.randn(1, 64, 2, 64, device="cuda", dtype=torch.bfloat16)
        out = xformers.ops.memory_efficient_attention(q, q, q)
        torch.cuda.synchronize()
        if not torch.isfinite(out).all():
            return "xformers' attention gives non-finite values on this GPU"
    except Exception as exc:
        return f"xformers does not run here ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
    return ""


def environment(tiny: bool) -> dict:
    from importlib import metadata

    import torch

    versions = {}
    for name in ("torch", "diffusers", "transformers", "accelerate", "peft", "safetensors", "bitsandbytes",
                 "xformers"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() and not tiny else None
    return {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device": gpu or "CPU",
            "cuda": torch.version.cuda if gpu else None, "versions": versions}


APT_GAP_TARGET_GIB = 1.0  # issue 21: SDXL APT within 1 GiB of plain LoRA
# Reserved memory over the whole run (caching and sampling included) that each SDXL row must stay
# under: the lowvram settings on a 12 GB card with room to spare (issue 21), the fp8 rows on an 8 GB
# card that also drives a display (bench/memory_estimate.py expects about 3.5 GiB allocated).
RESERVED_TARGETS_GIB = {"sdxl-plain-bf16": 8.0, "sdxl-apt-bf16": 9.0,
                        "sdxl-plain-bf16-fp8": 6.5, "sdxl-apt-bf16-fp8": 6.5}


def comparisons(results: dict[str, Result]) -> list[str]:
    """APT against plain step time, and xformers against SDPA loss, where both runs finished."""
    def ok(name):
        r = results.get(name)
        return r if r is not None and r.status == "ok" else None

    lines = []
    for arch, precision in (("sd15", "bf16"), ("sd15", "fp16"), ("sdxl", "bf16")):
        plain, apt = ok(f"{arch}-plain-{precision}"), ok(f"{arch}-apt-{precision}")
        if plain and apt and plain.s_per_step and apt.s_per_step:
            memory = (f", peak memory {apt.peak_gib - plain.peak_gib:+.2f} GiB"
                      if apt.peak_gib is not None and plain.peak_gib is not None else "")
            lines.append(f"{arch} {precision}: APT/plain step time {apt.s_per_step / plain.s_per_step:.2f}x{memory}")
    for kind in ("plain", "apt"):
        sdpa, xf = ok(f"sdxl-{kind}-bf16"), ok(f"sdxl-{kind}-bf16-xformers")
        if sdpa and xf and sdpa.mean_loss and xf.mean_loss is not None and sdpa.s_per_step and xf.s_per_step:
            lines.append(f"sdxl {kind}: xformers/SDPA mean loss {100 * (xf.mean_loss / sdpa.mean_loss - 1):+.2f}%, "
                         f"step time {xf.s_per_step / sdpa.s_per_step:.2f}x")
    return lines


def memory_notes(results: dict[str, Result]) -> list[str]:
    """Reserved memory over the whole run, and the issue-21 target for APT's extra memory."""
    def ok(name):
        r = results.get(name)
        return r if r is not None and r.status == "ok" else None

    lines = []
    for arch, precision in (("sd15", "bf16"), ("sdxl", "bf16")):
        plain, apt = ok(f"{arch}-plain-{precision}"), ok(f"{arch}-apt-{precision}")
        reserved = [r.extra.get("whole_run_reserved_gib") if r else None for r in (plain, apt)]
        if None not in reserved:
            lines.append(f"{arch} {precision}: reserved over the whole run (caching and sampling included): plain "
                         f"{reserved[0]:.2f} GiB, APT {reserved[1]:.2f} GiB")
    for suffix in ("", "-fp8"):
        plain, apt = ok(f"sdxl-plain-bf16{suffix}"), ok(f"sdxl-apt-bf16{suffix}")
        if plain and apt and plain.peak_gib is not None and apt.peak_gib is not None:
            gap = apt.peak_gib - plain.peak_gib
            lines.append(f"target APT - plain <= {APT_GAP_TARGET_GIB:.0f} GiB (sdxl bf16{suffix}): {gap:+.2f} GiB, "
                         + ("met" if gap <= APT_GAP_TARGET_GIB else "NOT met"))
    for name, target in RESERVED_TARGETS_GIB.items():
        r = ok(name)
        reserved = r.extra.get("whole_run_reserved_gib") if r else None
        if reserved is not None:
            lines.append(f"target {name} reserved <= {target:.1f} GiB: {reserved:.2f} GiB, "
                         + ("met" if reserved <= target else "NOT met"))
    return lines


def render(info: dict, results: dict[str, Result], tiny: bool) -> str:
    def num(v, fmt):
        return "" if v is None else format(v, fmt)

    head = (f"GPU check, {info['date']}: {info['device']}, torch {info['versions']['torch']}"
            + (f" (CUDA {info['cuda']})" if info.get("cuda") else "") + f", mode {info['mode']}, "
            f"{info['warmup_steps']} warm-up + {info['measured_steps']} measured steps per run, "
            f"{info.get('elapsed_s', 0):.0f} s of {info['budget_s']:.0f} s")
    rows = ["| run | status | s/step (median of 4-step means) | peak GiB | losses finite | mean loss | wall s | error |",
            "|---|---|---|---|---|---|---|---|"]
    for r in MATRIX:
        x = results[r.name]
        finite = "" if x.losses_finite is None else ("yes" if x.losses_finite else "no")
        error = x.error.replace("|", "\\|")
        rows.append(f"| {r.name} | {x.status} | {num(x.s_per_step, '.3f')} | {num(x.peak_gib, '.2f')} | {finite} | "
                    f"{num(x.mean_loss, '.4f')} | {num(x.wall_s, '.0f')} | {error} |")
    notes = comparisons(results) + memory_notes(results)
    versions = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if v and k != "torch")
    if versions:
        notes.append(f"packages on this machine: {versions}")
    if tiny:
        notes.append("tiny models on the CPU in fp32: peak GiB is the process's peak RSS, and the figures say "
                     "nothing about a GPU")
    return "\n".join([head, "", *rows] + (["", *[f"- {n}" for n in notes]] if notes else []))


# --- the re-read ----------------------------------------------------------------------------------
def reread(lora: Path, model: Path) -> dict:
    """Read `lora` with the project's reader and with diffusers' load_lora_weights into the model in
    `model`; compare the UNet layers each finds and the weight change of every one."""
    import torch
    from diffusers import DiffusionPipeline

    from library.lora.index import NameIndex
    from library.lora.weights import load_weights
    from library.models.loader import detect_folder_arch

    arch = detect_folder_arch(model)
    ours = load_weights(lora, NameIndex.for_tree(arch, model))
    pipe = DiffusionPipeline.from_pretrained(str(model), dtype=torch.float32, local_files_only=True)
    pipe.load_lora_weights(str(lora))
    layers = {name: m for name, m in pipe.unet.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    worst = 0.0
    compared = 0
    for name, mod in ours.modules.items():
        target = ours.index.targets[name]
        layer = layers.get(target.path) if target.component == "unet" else None
        if layer is None:
            continue
        adapter = next(iter(layer.lora_A))
        down, up = layer.lora_A[adapter].weight.detach().float(), layer.lora_B[adapter].weight.detach().float()
        theirs = (up.flatten(1) @ down.flatten(1)) * layer.scaling[adapter]
        mine = mod.delta().flatten(1)
        worst = max(worst, float((theirs - mine).abs().max() / mine.abs().max().clamp_min(1e-12)))
        compared += 1
    unet_modules = sum(1 for n in ours.modules if ours.index.targets[n].component == "unet")
    return {"project_modules": unet_modules, "diffusers_layers": len(layers), "compared": compared,
            "max_rel_diff": worst if compared == unet_modules else float("inf")}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json, gpu_check.md and the sample image")
    ap.add_argument("--work", type=Path, help="folder for models, data and runs (default: a temporary folder, "
                                              "removed at the end)")
    ap.add_argument("--tiny", action="store_true", help="tiny models on the CPU in fp32 (tests the script)")
    ap.add_argument("--budget_s", type=float, default=480, help="end within this many seconds, start-up included")
    ap.add_argument("--steps", type=int, help="measured steps per run after the warm-up (default 12; tiny 1)")
    ap.add_argument("--warmup", type=int, help="warm-up steps per run, not timed (default 3; tiny 1)")
    ap.add_argument("--only", nargs="+", choices=[r.name for r in MATRIX], help="run only these rows")
    ap.add_argument("--launcher", choices=["accelerate", "python"],
                    help="how the trainer starts (default: accelerate launch; tiny: python)")
    args = ap.parse_args(argv)

    from library.utils.runtime import offline_and_quiet

    offline_and_quiet()
    temporary = args.work is None
    if temporary:
        args.work = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    try:
        # Run as a script, the clock started with the process; called from a test, with this call.
        return Check(args, IMPORTED if __name__ == "__main__" else time.monotonic()).run()
    finally:
        if temporary:
            shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
