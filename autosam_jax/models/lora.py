"""LoRA (low-rank adaptation) of SAM's image encoder: trainable low-rank factors beside frozen base weights.

A targeted linear layer y = x W + b becomes y = x W + b + (alpha / rank) * dropout(x) A B, with A (in, rank)
drawn as PyTorch's `kaiming_uniform_(a=sqrt(5))` draws a Linear's weight (as `peft` does) and B (rank, out) zero,
so an adapted encoder equals the frozen one until B is trained. Targets:
  - "q", "k", "v": a part of the fused qkv projection, each with its own factors (SAMed adapts q and v this way;
    the default);
  - "qkv": the whole fused projection with one pair of factors (what `peft` does with target_modules=["qkv"]);
  - "proj": the attention's output projection; "lin1", "lin2": the MLP's two linears.

The factors are `LoraParam`s (a kind of nnx.Param), so `nnx.state(model, LoraParam)` is exactly what a LoRA run
trains and saves; the base weights stay nnx.Param of the converted checkpoint and are never updated. `merge_lora`
folds the factors into the base kernels (export); inference runs the adapted encoder as validation did (see
`merge_lora` for why).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from autosam_jax.errors import DataError
from autosam_jax.models.encoders import adaptable_blocks
from autosam_jax.models.layers import Linear, matmul
from autosam_jax.typed_config import TypedConfig, option

Array = jax.Array

QKV_PARTS = ("q", "k", "v")
TARGETS = (*QKV_PARTS, "qkv", "proj", "lin1", "lin2")


@dataclasses.dataclass(frozen=True)
class LoraConfig(TypedConfig):
  """Which of the encoder's linears get factors, and their rank, scaling and dropout."""
  OPTIONS = "LoRA"

  rank: int = option(4, at_least=1)
  alpha: float = option(4.0, above=0, finite=True)  # the update is scaled by alpha / rank
  dropout: float = option(0.0, at_least=0, below=1)  # on the factors' input, in training only
  targets: tuple[str, ...] = option(("q", "v"), choices=TARGETS)

  def check(self) -> None:
    if not self.targets:
      raise self.refusal(f"lora targets must name at least one of {', '.join(TARGETS)}")
    if len(set(self.targets)) != len(self.targets):
      raise self.refusal(f"lora targets {list(self.targets)} name a layer twice; name each once")
    if "qkv" in self.targets and set(QKV_PARTS) & set(self.targets):
      raise self.refusal("lora targets: 'qkv' adapts the whole fused projection; leave out 'q', 'k' and 'v' with it")

  @property
  def scale(self) -> float:
    return self.alpha / self.rank


class LoraParam(nnx.Param):
  """A LoRA factor: trained (and saved) while the base weights stay frozen."""


def _torch_linear_uniform(key, shape: tuple[int, int]) -> Array:
  """PyTorch's default Linear weight draw, kaiming_uniform_(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / math.sqrt(shape[0])
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


class LoraLinear(nnx.Module):
  """A frozen `Linear` plus low-rank updates of some of its output columns.

  `parts` is a list of (name, first column, last column): one pair of factors (a_NAME, b_NAME) per part."""

  def __init__(self, base: Linear, parts: list[tuple[str, int, int]], config: LoraConfig, *, rngs: nnx.Rngs):
    self.base = base
    self.parts = tuple(parts)
    self.scale = config.scale
    self.dropout_rate = config.dropout
    self.dropout_key = None  # set around a training call (`dropout_keys`)
    in_features = base.kernel.shape[0]
    for name, lo, hi in self.parts:
      setattr(self, f"a_{name}", LoraParam(_torch_linear_uniform(rngs.params(), (in_features, config.rank))))
      setattr(self, f"b_{name}", LoraParam(jnp.zeros((config.rank, hi - lo))))

  def factors(self, name: str) -> tuple[Array, Array]:
    return getattr(self, f"a_{name}")[...], getattr(self, f"b_{name}")[...]

  def delta_kernel(self) -> Array:
    """The update of the base kernel the factors make: scale * A B in each part's columns."""
    kernel = jnp.zeros_like(self.base.kernel[...])
    for name, lo, hi in self.parts:
      a, b = self.factors(name)
      kernel = kernel.at[:, lo:hi].add(self.scale * (a @ b))
    return kernel

  def __call__(self, x: Array) -> Array:
    y = self.base(x)
    h = x
    if self.dropout_key is not None and self.dropout_rate > 0:
      keep = jax.random.bernoulli(self.dropout_key, 1.0 - self.dropout_rate, x.shape)
      h = jnp.where(keep, x / (1.0 - self.dropout_rate), 0.0).astype(x.dtype)
    dtype = self.base.dtype
    for name, lo, hi in self.parts:
      a, b = self.factors(name)
      delta = matmul(matmul(h, a, dtype), b, dtype) * self.scale
      y = y.at[..., lo:hi].add(delta.astype(y.dtype)) if (lo, hi) != (0, y.shape[-1]) else y + delta
    return y


def _targets_of(block, config: LoraConfig) -> list[tuple[object, str, list[tuple[str, int, int]]]]:
  """(owner module, attribute, parts) of each linear of one encoder block that `config` adapts."""
  dim = block.attn.proj.kernel.shape[1]
  found = []
  qkv_parts = [(p, i * dim, (i + 1) * dim) for i, p in enumerate(QKV_PARTS) if p in config.targets]
  if "qkv" in config.targets:
    qkv_parts = [("qkv", 0, 3 * dim)]
  if qkv_parts:
    found.append((block.attn, "qkv", qkv_parts))
  if "proj" in config.targets:
    found.append((block.attn, "proj", [("proj", 0, dim)]))
  for name in ("lin1", "lin2"):
    if name in config.targets:
      width = getattr(block.mlp, name).kernel.shape[1]
      found.append((block.mlp, name, [(name, 0, width)]))
  return found


def add_lora(encoder, config: LoraConfig, *, rngs: nnx.Rngs):
  """Wraps the targeted linears of every block of `encoder` (any family's: `encoders.adaptable_blocks`) in
  `LoraLinear`, in place;
  returns the encoder. Factors are drawn block by block, target by target, from `rngs`."""
  if lora_layers(encoder):
    raise DataError("the encoder already has LoRA factors; add them to a frozen encoder once")
  for block in adaptable_blocks(encoder):
    for owner, attribute, parts in _targets_of(block, config):
      setattr(owner, attribute, LoraLinear(getattr(owner, attribute), parts, config, rngs=rngs))
  return encoder


def lora_layers(module) -> list[LoraLinear]:
  return [m for _, m in nnx.iter_graph(module) if isinstance(m, LoraLinear)]


def merge_lora(encoder):
  """Folds every LoraLinear's factors into its base kernel (W + scale A B, summed in float32) and puts the plain
  Linear back, in place; returns the encoder.

  The merged encoder computes what the adapted one did only where its matmuls are exact enough to keep the update:
  in float32 at full precision. An encoder computing in bf16 (or TF32, GPUs' default float32 matmuls) rounds the
  merged kernel, whose update is small beside W, while the adapted encoder computes bf16(W) x + ((x A) B): the
  rounding of W + dW then changes the update by a sizeable fraction of itself (`merge_rounding`), another network
  than the one validated. Evaluate and predict therefore run a LoRA model unmerged; export (float32 weights) records
  the difference."""
  for block in adaptable_blocks(encoder):
    for owner in (block.attn, block.mlp):
      for attribute in ("qkv", "proj", "lin1", "lin2"):
        layer = getattr(owner, attribute, None)
        if isinstance(layer, LoraLinear):
          base = layer.base
          base.kernel = nnx.Param(base.kernel[...] + layer.delta_kernel())
          setattr(owner, attribute, base)
  return encoder


def merge_rounding(encoder, dtype) -> float:
  """What merging costs an adapted `encoder` (before `merge_lora`) used with its matmuls in `dtype`: the largest, over
  its adapted linears, of |round(W + dW) - (round(W) + dW)| / |dW| (Frobenius norms, `round` to `dtype`), the merged
  kernel's rounding as a fraction of the update. 0 for float32 (None); linears whose update is zero are left out."""
  if dtype is None or jnp.dtype(dtype) == jnp.float32:
    return 0.0
  rounded = lambda a: a.astype(dtype).astype(jnp.float32)
  worst = 0.0
  for layer in lora_layers(encoder):
    kernel, delta = layer.base.kernel[...], layer.delta_kernel()
    size = float(jnp.linalg.norm(delta))
    if size > 0:
      worst = max(worst, float(jnp.linalg.norm(rounded(kernel + delta) - (rounded(kernel) + delta))) / size)
  return worst


def set_dropout_key(module, key) -> None:
  """Gives every LoraLinear under `module` its own dropout key from `key` (None: no dropout, as in inference).
  Call on a module built inside the traced function that uses it (a merged copy), never on a stored one."""
  for i, layer in enumerate(lora_layers(module)):
    layer.dropout_key = None if key is None else jax.random.fold_in(key, i)


class AdaptedSam(nnx.Module):
  """SAM's image encoder with LoRA factors and a prompt-free head on its embeddings: (B, S, S, 3) encoder inputs ->
  the head's logits. What a LoRA run trains (`TRAINABLE`: the factors and the head's parameters) and saves."""

  def __init__(self, encoder, head):
    self.encoder = encoder
    self.head = head

  def __call__(self, images: Array, feature_scale: Array | None = None) -> Array:
    """`feature_scale` (broadcast to the embedding, e.g. a (B, 1, 1, C) dropout mask) multiplies the embedding
    before the head (semi-supervised training's feature perturbation)."""
    from autosam_jax.models.encoders import encoder_features

    features = encoder_features(self.encoder, images)
    embedding = features["embedding"].astype(jnp.float32)
    if feature_scale is not None:
      embedding = embedding * feature_scale
    if getattr(self.head, "uses_high_res", False):  # SAM 2's decoder as the head: its high-resolution skips
      return self.head(embedding, [m.astype(jnp.float32) for m in features["high_res"]])
    return self.head(embedding)


def _trainable(path, value) -> bool:
  return isinstance(value, LoraParam) or (bool(path) and path[0] == "head" and isinstance(value, nnx.Param))


# The nnx filter of what an AdaptedSam trains: its LoRA factors and its head's parameters, never the base weights.
TRAINABLE = _trainable
