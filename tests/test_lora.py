"""LoRA on SAM's image encoder: equal to Meta's `ImageEncoderViT` adapted by `peft` (and, for the q and v parts of
the fused qkv, to SAMed's formulation written in PyTorch here) with the same random base weights and random nonzero
factors; B = 0 leaves the encoder as it was; merged equals unmerged; the attention paths agree and the accelerator
one exports for CUDA without the CPU's query chunking."""

import copy
import re

import numpy as np
import pytest

from tests.conftest import TINY_CONFIGS

NAME = "dim64-win5-pad"


def _torch_linear(module):
  """A LoRA-wrapped Meta Linear's base (peft keeps it as `base_layer`)."""
  return getattr(module, "base_layer", module)


def _random_factors(encoder, seed: int) -> None:
  """Every LoRA factor of our encoder drawn at random (B too, so the update is not zero)."""
  import jax.numpy as jnp

  from autosam_jax.models.lora import lora_layers

  rng = np.random.default_rng(seed)
  for layer in lora_layers(encoder):
    for name, _, _ in layer.parts:
      for kind in ("a", "b"):
        factor = getattr(layer, f"{kind}_{name}")
        factor[...] = jnp.asarray(rng.normal(0, 0.2, factor.shape), jnp.float32)


def _ours(torch_sam, config, seed: int = 3):
  from flax import nnx

  from autosam_jax.models.lora import add_lora
  from weights_conversion.parity import sam_from_torch

  encoder = sam_from_torch(torch_sam).image_encoder
  add_lora(encoder, config, rngs=nnx.Rngs(seed))
  _random_factors(encoder, seed)
  return encoder


def _images(config, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).normal(size=(2, config.image_size, config.image_size, 3)).astype(np.float32)


def _torch_embeddings(torch_encoder, images: np.ndarray) -> np.ndarray:
  import torch

  with torch.no_grad():
    out = torch_encoder(torch.from_numpy(images).permute(0, 3, 1, 2))
  return out.permute(0, 2, 3, 1).numpy()


class _SamedQkv:
  """SAMed's LoRA of the fused qkv in PyTorch: qkv(x) plus scale * x A B added to the q part and to the v part, each
  with factors of its own (taken from our layer, transposed to PyTorch's (out, in) weights)."""

  @staticmethod
  def wrap(qkv, factors: dict, scale: float):
    import torch

    class Adapted(torch.nn.Module):
      def __init__(self):
        super().__init__()
        self.qkv = qkv
        self.down = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.from_numpy(np.asarray(a).T.copy()))
                                            for k, (a, _) in factors.items()})
        self.up = torch.nn.ParameterDict({k: torch.nn.Parameter(torch.from_numpy(np.asarray(b).T.copy()))
                                          for k, (_, b) in factors.items()})

      def forward(self, x):
        out = self.qkv(x)
        dim = out.shape[-1] // 3
        parts = list(out.split(dim, dim=-1))
        for i, part in enumerate("qkv"):
          if part in factors:
            parts[i] = parts[i] + scale * torch.nn.functional.linear(
                torch.nn.functional.linear(x, self.down[part]), self.up[part])
        return torch.cat(parts, dim=-1)

    return Adapted()


def _reference_with_our_factors(torch_sam, encoder, config):
  """Meta's encoder (a copy) adapted on the same targets, its factors set to ours: `peft` for whole linears,
  SAMed's formulation for parts of the fused qkv."""
  import torch
  from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

  from autosam_jax.models.lora import QKV_PARTS

  reference = copy.deepcopy(torch_sam.image_encoder).eval()
  whole = {"qkv": r"attn\.qkv", "proj": r"attn\.proj", "lin1": r"mlp\.lin1", "lin2": r"mlp\.lin2"}
  targets = [whole[t] for t in config.targets if t in whole]
  if targets:
    peft_config = PeftLoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                                 target_modules=rf"blocks\.\d+\.({'|'.join(targets)})")
    reference = inject_adapter_in_model(peft_config, reference)
  for index, block in enumerate(encoder.blocks):
    torch_block = reference.blocks[index]
    for owner, attribute, torch_owner in ((block.attn, "qkv", torch_block.attn), (block.attn, "proj", torch_block.attn),
                                          (block.mlp, "lin1", torch_block.mlp), (block.mlp, "lin2", torch_block.mlp)):
      layer = getattr(owner, attribute)
      if not hasattr(layer, "parts"):
        continue
      names = [name for name, _, _ in layer.parts]
      if set(names) <= set(QKV_PARTS):
        setattr(torch_owner, attribute, _SamedQkv.wrap(getattr(torch_owner, attribute),
                                                       {n: layer.factors(n) for n in names}, config.scale))
        continue
      (name,) = names
      a, b = layer.factors(name)
      module = getattr(torch_owner, attribute)
      with torch.no_grad():
        module.lora_A["default"].weight.copy_(torch.from_numpy(np.asarray(a).T.copy()))
        module.lora_B["default"].weight.copy_(torch.from_numpy(np.asarray(b).T.copy()))
      assert module.scaling["default"] == pytest.approx(config.scale)
  return reference


@pytest.mark.parametrize("targets,rank,alpha", [(("q", "v"), 4, 4.0), (("qkv",), 2, 8.0),
                                                (("q", "k", "v", "proj", "lin1", "lin2"), 3, 1.5)],
                         ids=["samed-q-v", "peft-qkv", "everything"])
def test_lora_encoder_matches_meta_adapted_by_peft(meta_checkpoints, targets, rank, alpha):
  import jax

  from autosam_jax.models.lora import LoraConfig

  config = LoraConfig(rank=rank, alpha=alpha, targets=targets)
  torch_sam, _ = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  encoder = _ours(torch_sam, config)
  reference = _reference_with_our_factors(torch_sam, encoder, config)
  images = _images(TINY_CONFIGS[NAME])
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(encoder(images))
  expected = _torch_embeddings(reference, images)
  frozen = _torch_embeddings(torch_sam.image_encoder, images)
  assert np.max(np.abs(expected - frozen)) > 1e-2, "the factors must change the embeddings for the test to mean much"
  np.testing.assert_allclose(ours, expected, atol=1e-4, rtol=0)


def test_zero_b_leaves_the_encoder_unchanged_and_merge_equals_unmerged(meta_checkpoints):
  import jax
  from flax import nnx

  from autosam_jax.models.lora import LoraConfig, LoraParam, add_lora, lora_layers, merge_lora
  from weights_conversion.parity import sam_from_torch

  torch_sam, _ = meta_checkpoints(NAME, TINY_CONFIGS[NAME])
  images = _images(TINY_CONFIGS[NAME], seed=1)
  encoder = sam_from_torch(torch_sam).image_encoder
  frozen = np.asarray(encoder(images))
  config = LoraConfig(rank=4, alpha=8.0, targets=("q", "v", "lin2"))
  add_lora(encoder, config, rngs=nnx.Rngs(0))
  # a factors drawn as PyTorch draws a Linear's weight, b factors zero: the adapted encoder is the frozen one
  layers = lora_layers(encoder)
  assert len(layers) == 2 * TINY_CONFIGS[NAME].encoder_depth
  for layer in layers:
    for name, lo, hi in layer.parts:
      a, b = layer.factors(name)
      bound = 1 / np.sqrt(a.shape[0])
      assert a.shape == (layer.base.kernel.shape[0], 4) and 0 < np.abs(a).max() <= bound and b.shape == (4, hi - lo) and not np.any(b)
  np.testing.assert_array_equal(np.asarray(encoder(images)), frozen)
  # only the factors are LoraParam: 2 per adapted part (q and v in each block's qkv, and lin2)
  factors = jax.tree.leaves(nnx.state(encoder, LoraParam))
  assert len(factors) == 2 * 3 * TINY_CONFIGS[NAME].encoder_depth
  _random_factors(encoder, 5)
  adapted = np.asarray(encoder(images))
  assert np.max(np.abs(adapted - frozen)) > 1e-2
  merge_lora(encoder)
  assert not lora_layers(encoder) and not jax.tree.leaves(nnx.state(encoder, LoraParam))
  np.testing.assert_allclose(np.asarray(encoder(images)), adapted, atol=1e-4, rtol=0)
  with pytest.raises(Exception, match="already has LoRA factors"):
    add_lora(add_lora(encoder, config, rngs=nnx.Rngs(1)), config, rngs=nnx.Rngs(1))


@pytest.mark.parametrize("values,message", [
    ({"targets": ["qkv", "q"]}, "'qkv' adapts the whole fused projection"),
    ({"targets": ["q", "q"]}, "name a layer twice"),
    ({"targets": []}, "at least one of"),
    ({"targets": ["attn"]}, "every item must be one of q, k, v, qkv, proj, lin1, lin2"),
    ({"rank": 0}, "rank must be a positive integer"),
    ({"rank": True}, "rank must be int, got bool True"),
    ({"dropout": 1.0}, "dropout must be a number, below 1, got 1.0"),
])
def test_lora_config_refusals(values, message):
  from autosam_jax.errors import DataError
  from autosam_jax.models.lora import LoraConfig

  with pytest.raises(DataError, match=re.escape(message)):
    LoraConfig.from_dict(values, "lora.py")


def _encoder(image_size: int, attention: str, dtype=None):
  from flax import nnx

  from autosam_jax import SamConfig
  from autosam_jax.models.image_encoder import ImageEncoderViT

  # one global block (a 36 x 36 grid at 576 pixels: past 1024 tokens, so chunked on CPU) and one windowed block
  config = SamConfig(image_size=image_size, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=2,
                     encoder_mlp_dim=64, encoder_global_attn_indexes=(1,), window_size=7)
  return ImageEncoderViT(config, dtype=dtype, attention=attention, rngs=nnx.Rngs(0))


def _random_rel_pos(encoder) -> None:
  import jax.numpy as jnp

  rng = np.random.default_rng(2)
  for block in encoder.blocks:
    for table in (block.attn.rel_pos_h, block.attn.rel_pos_w):
      table[...] = jnp.asarray(rng.normal(0, 0.5, table.shape), jnp.float32)


def test_attention_paths_agree_and_remat_changes_nothing():
  import jax
  from flax import nnx

  from autosam_jax.models.image_encoder import set_attention
  from autosam_jax.models.lora import LoraConfig, add_lora

  encoder = _encoder(576, "chunked")
  _random_rel_pos(encoder)
  images = _images(encoder.config, seed=3)[:1]
  chunked = np.asarray(nnx.jit(lambda m, x: m(x))(encoder, images))
  set_attention(encoder, "xla")
  fused = np.asarray(nnx.jit(lambda m, x: m(x))(encoder, images))
  np.testing.assert_allclose(fused, chunked, atol=2e-5, rtol=0)
  # rematerialised blocks: the same embeddings and the same LoRA gradients
  small = _encoder(128, "auto")
  _random_rel_pos(small)
  add_lora(small, LoraConfig(targets=("q", "v")), rngs=nnx.Rngs(1))
  images = _images(small.config, seed=4)

  def grads(remat: bool):
    from autosam_jax.models.lora import LoraParam

    # as the trainer runs it: a plain jax.grad of the split factors, the encoder merged inside the trace
    small.remat = remat
    graphdef, lora, rest = nnx.split(small, LoraParam, ...)
    loss = lambda lora: (nnx.merge(graphdef, lora, rest)(images) ** 2).mean()
    value, grad = jax.jit(jax.value_and_grad(loss))(lora)
    return float(value), jax.tree.leaves(grad)

  (plain, plain_grads), (remat, remat_grads) = grads(False), grads(True)
  assert remat == pytest.approx(plain, rel=1e-6)
  assert len(plain_grads) == len(remat_grads) == 8 and any(np.any(np.asarray(g)) for g in plain_grads)
  for a, b in zip(plain_grads, remat_grads):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=1e-6, rtol=1e-5)


def test_accelerator_attention_exports_for_cuda_without_the_cpu_chunking(monkeypatch):
  """The encoder's LoRA gradient lowered for CUDA on this CPU: with the attention "auto" takes there for a LoRA step
  (XLA's: the step differentiates the relative-position bias) the module holds no while loop and no cuDNN call; with
  the CPU's chunked attention it holds a while loop (so the check can fail)."""
  import jax
  from jax import export
  from flax import nnx

  from autosam_jax.models import image_encoder
  from autosam_jax.models.lora import LoraConfig, LoraParam, add_lora

  def exported_text(attention: str) -> str:
    encoder = _encoder(576, attention)
    add_lora(encoder, LoraConfig(targets=("q", "v")), rngs=nnx.Rngs(0))
    graphdef, lora, rest = nnx.split(encoder, LoraParam, ...)

    def loss(lora, rest, images):
      return (nnx.merge(graphdef, lora, rest)(images) ** 2).mean()

    step = jax.jit(jax.grad(loss))
    images = jax.ShapeDtypeStruct((1, 576, 576, 3), np.float32)
    return export.export(step, platforms=["cuda"])(lora, rest, images).mlir_module()

  assert "stablehlo.while" in exported_text("chunked")
  # "auto" is decided for the platform the encoder is traced on: here the CUDA one it is lowered for
  monkeypatch.setattr(image_encoder, "current_platform", lambda: "cuda")
  text = exported_text("auto")
  assert "stablehlo.while" not in text and "stablehlo.dot_general" in text and "cudnn" not in text.lower()


def test_a_frozen_bf16_forward_takes_cudnn_attention_on_cuda(monkeypatch):
  """The frozen encoder's bf16 forward (precompute, zero-shot, predict) lowered for CUDA: "auto" takes cuDNN's fused
  attention in every block, windowed and global, and hands it what cuDNN's own checks accept.

  JAX 0.10.2 checks the cuDNN version while tracing a cuDNN attention, so on a machine without CUDA's jaxlib plugin
  the export stops there ("cuDNN is not detected"): the module itself cannot be made here. What can be checked here
  is checked: that every attention of the forward asks for implementation="cudnn", with queries, keys, values and
  bias that pass JAX's cuDNN layout and flash-attention checks (for inference); with CUDA's plugin installed, the
  exported module's cuDNN calls."""
  import jax
  import jax.numpy as jnp
  from jax import export
  from jax._src.cudnn import fused_attention_stablehlo as cudnn_attention
  from jax._src.lib import cuda_versions
  from flax import nnx

  from autosam_jax.models import image_encoder
  from autosam_jax.models.image_encoder import set_attention

  monkeypatch.setattr(image_encoder, "current_platform", lambda: "cuda")
  encoder = set_attention(_encoder(128, "auto", dtype=jnp.bfloat16), "auto", frozen=True)  # head dim 16
  graphdef, state = nnx.split(encoder)
  forward = jax.jit(lambda state, images: nnx.merge(graphdef, state)(images))
  images = jax.ShapeDtypeStruct((2, 128, 128, 3), np.float32)
  if cuda_versions is not None:
    text = export.export(forward, platforms=["cuda"])(state, images).mlir_module()
    assert text.count("__cudnn$fmha") >= len(encoder.blocks)
    return
  with pytest.raises(RuntimeError, match="cuDNN is not detected"):
    export.export(forward, platforms=["cuda"])(state, images)

  calls = []
  original = jax.nn.dot_product_attention

  def recorded(query, key, value, bias=None, *, implementation=None, **kwargs):
    calls.append((query, key, value, bias, implementation))
    return original(query, key, value, bias, implementation="xla", **kwargs)  # the shapes, computed by XLA here

  monkeypatch.setattr(jax.nn, "dot_product_attention", recorded)
  jax.eval_shape(forward, state, images)
  # one call per global block, one per group of equally sized windows of a windowed block (8 x 8 grid, window 7: 4)
  assert len(calls) == 1 + 4
  for query, key, value, bias, implementation in calls:
    assert implementation == "cudnn"
    assert query.dtype == key.dtype == value.dtype == bias.dtype == jnp.bfloat16
    cudnn_attention.check_layout(query, key, value, bias, None, None, None, None, None, None,
                                 cudnn_attention.AttentionLayout.BTNH)
    cudnn_attention.check_is_flash_attention(query, key, value, cudnn_attention.AttentionLayout.BTNH.value,
                                             cudnn_version=90000, has_bias=True, is_training=False)


def test_attention_refuses_cudnn_where_cudnn_cannot_run():
  """An explicit "cudnn" on float32 queries is one clear error when traced, not JAX's deeper one."""
  import jax
  from flax import nnx

  encoder = _encoder(128, "cudnn")
  graphdef, state = nnx.split(encoder)
  with pytest.raises(ValueError, match="takes bf16/fp16 queries .* not float32 .* use attention 'xla'"):
    jax.eval_shape(lambda state, x: nnx.merge(graphdef, state)(x), state, jax.ShapeDtypeStruct((1, 128, 128, 3),
                                                                                                np.float32))
