"""Meta's SAM 2 (the `sam2` package) for parity tests and benchmarks: a model of any release's architecture with
every tensor random, saved as Meta's checkpoints are, and its image predictor.

`sam2`'s image predictor imports torchvision's Resize, Normalize and ToTensor; this project never installs
torchvision. Where it is absent, `import_sam2_predictor` stands in tensor versions of exactly those three (what
torchvision does to a tensor: bilinear resize with antialiasing, per-channel normalisation, HWC uint8 -> CHW [0, 1]).
`sam2` itself installs as `SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0` with hydra-core,
omegaconf, antlr4-python3-runtime==4.9.3, iopath and portalocker (each --no-deps).
"""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from pathlib import Path

# Meta's configs (inside the sam2 package) by release.
CONFIGS = {"tiny": "configs/sam2.1/sam2.1_hiera_t.yaml", "small": "configs/sam2.1/sam2.1_hiera_s.yaml",
           "base_plus": "configs/sam2.1/sam2.1_hiera_b+.yaml", "large": "configs/sam2.1/sam2.1_hiera_l.yaml"}
INSTALL = ("SAM2_BUILD_CUDA=0 pip install --no-deps --no-build-isolation sam2==1.1.0 and, each with --no-deps, "
           "hydra-core omegaconf antlr4-python3-runtime==4.9.3 iopath portalocker")


def _torchvision_transforms() -> types.ModuleType:
  import torch
  import torch.nn.functional as F
  from torch import nn

  class Resize(nn.Module):
    def __init__(self, size):
      super().__init__()
      self.size = [int(s) for s in size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return F.interpolate(x[None], size=self.size, mode="bilinear", align_corners=False, antialias=True)[0]

  class Normalize(nn.Module):
    def __init__(self, mean, std):
      super().__init__()
      self.mean = [float(m) for m in mean]
      self.std = [float(s) for s in std]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
      mean = torch.tensor(self.mean, dtype=x.dtype)[:, None, None]
      std = torch.tensor(self.std, dtype=x.dtype)[:, None, None]
      return (x - mean) / std

  class ToTensor:
    def __call__(self, picture):
      import numpy as np

      array = np.asarray(picture)
      tensor = torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
      return tensor.float().div(255) if array.dtype == np.uint8 else tensor.float()

  module = types.ModuleType("torchvision.transforms")
  module.__dict__.update(Resize=Resize, Normalize=Normalize, ToTensor=ToTensor)
  return module


def import_sam2():
  """`sam2.build_sam` (ImportError naming the install command where the package is missing)."""
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      return importlib.import_module("sam2.build_sam")
  except ImportError as err:
    raise ImportError(f"Meta's sam2 package is needed here: {INSTALL}") from err


def import_sam2_predictor():
  """`sam2.sam2_image_predictor.SAM2ImagePredictor`, torchvision's three transforms stood in where it is absent."""
  import_sam2()
  try:
    importlib.import_module("torchvision.transforms")
    stubbed = False
  except Exception:
    for name in [n for n in sys.modules if n == "torchvision" or n.startswith("torchvision.")]:
      del sys.modules[name]
    sys.modules["torchvision"] = types.ModuleType("torchvision")
    sys.modules["torchvision.transforms"] = _torchvision_transforms()
    stubbed = True
  try:
    return importlib.import_module("sam2.sam2_image_predictor").SAM2ImagePredictor
  finally:
    if stubbed:
      for name in ("torchvision", "torchvision.transforms"):
        sys.modules.pop(name, None)


def build_sam2_model(release: str = "tiny", image_size: int = 1024, seed: int = 0, overrides: tuple[str, ...] = ()):
  """Meta's `SAM2Base` for a release's architecture at `image_size` (eval mode, float32, CPU), every tensor random
  and non-zero: parameters the builder leaves at zero or one (biases, norms, position embeddings, tokens) are drawn
  around those values."""
  import torch

  build_sam = import_sam2()
  config = CONFIGS.get(release, release)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    model = build_sam.build_sam2(config, ckpt_path=None, device="cpu",
                                 hydra_overrides_extra=[f"++model.image_size={image_size}", *overrides])
  generator = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, tensor in model.state_dict().items():
      if not tensor.is_floating_point():
        continue
      if torch.all(tensor == 1):
        tensor.copy_(1 + 0.1 * torch.randn(tensor.shape, generator=generator))
      elif torch.all(tensor == 0) or name.endswith("pos_embed") or name.endswith("pos_embed_window"):
        tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))
  return model.eval()


def save_meta_checkpoint(model, path: str | Path) -> Path:
  """`{"model": state_dict}`, the layout of Meta's released SAM 2 files."""
  import torch

  path = Path(path)
  torch.save({"model": model.state_dict()}, path)
  return path


def predictor(model):
  """Meta's image predictor on `model`, its feature sizes set for the model's image size (the released predictor
  assumes 1024 px, which MedSAM2's own code changes the same way)."""
  predictor = import_sam2_predictor()(model)
  size = model.image_size // 4
  predictor._bb_feat_sizes = [(size // 2 ** k, size // 2 ** k) for k in range(3)]
  return predictor
