"""The encoder's attention paths, named for what they run: the decision "auto" makes per platform, dtype, head dim
and call site (a frozen forward or a training step), the call sites that run the frozen encoder, the training
config's refusal of cuDNN, and the numerics of XLA's attention in bf16 beside the CPU's query chunks. The export of
each path for CUDA: tests/test_lora.py."""

import numpy as np
import pytest

BF16, FP16, FP32 = "bfloat16", "float16", "float32"


@pytest.mark.parametrize("platform, dtype, head_dim, frozen, expected", [
    ("cpu", BF16, 64, True, "chunked"),  # precompute on the CPU
    ("cpu", None, 64, False, "chunked"),  # a LoRA step on the CPU
    ("cuda", BF16, 64, True, "cudnn"),  # precompute / predict, vit_b in bf16
    ("cuda", BF16, 80, True, "cudnn"),  # vit_h's heads
    ("cuda", FP16, 128, True, "cudnn"),
    ("cuda", BF16, 64, False, "xla"),  # the LoRA step: the bias gradient over a batch of windows
    ("cuda", None, 64, True, "xla"),  # zero-shot (float32)
    ("cuda", FP32, 64, True, "xla"),
    ("cuda", BF16, 12, True, "xla"),  # not a multiple of 8
    ("cuda", BF16, 136, True, "xla"),  # past 128
    ("rocm", BF16, 64, True, "xla"),  # no cuDNN
    ("tpu", BF16, 64, True, "xla"),
])
def test_auto_attention_per_platform_dtype_head_dim_and_call_site(platform, dtype, head_dim, frozen, expected):
  from autosam_jax.models.image_encoder import attention_for, resolve_attention

  assert attention_for(platform, dtype, head_dim, frozen) == expected
  assert resolve_attention("auto", platform, dtype=dtype, head_dim=head_dim, frozen=frozen) == expected
  for named in ("chunked", "xla", "cudnn"):  # a path named is the path taken
    assert resolve_attention(named, platform, dtype=dtype, head_dim=head_dim, frozen=frozen) == named


def test_the_old_name_runs_what_it_ran_and_unknown_names_are_refused():
  from autosam_jax.models.image_encoder import ATTENTION_IMPLEMENTATIONS, resolve_attention
  from autosam_jax.models.trained import TrainConfig

  assert ATTENTION_IMPLEMENTATIONS == ("auto", "chunked", "xla", "cudnn")
  # "fused" (saved configs of earlier versions) was implementation=None: XLA's attention in this JAX, never cuDNN
  for platform in ("cpu", "cuda"):
    assert resolve_attention("fused", platform, dtype=BF16, head_dim=64, frozen=True) == "xla"
  assert TrainConfig.from_dict({"head": "linear", "lora_rank": 4, "attention": "fused"}).attention == "fused"
  with pytest.raises(ValueError, match="attention 'flash' is not one of auto, chunked, xla, cudnn"):
    resolve_attention("flash", "cuda")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a_lora_config_refuses_cudnn_attention_in_one_line(dtype):
  from autosam_jax.errors import DataError
  from autosam_jax.models.trained import TrainConfig

  with pytest.raises(DataError) as refused:
    TrainConfig.from_dict({"lora_rank": 4, "encoder_dtype": dtype, "attention": "cudnn"}, "lora.py")
  message = str(refused.value)
  assert message.startswith("lora.py: attention 'cudnn' cannot train LoRA") and "\n" not in message
  assert "bf16/fp16 only" in message and "set attention=xla" in message
  assert TrainConfig.from_dict({"lora_rank": 4, "encoder_dtype": dtype, "attention": "xla"}, "lora.py")


def _attention(dtype=None):
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.models.image_encoder import Attention

  attention = Attention(64, 4, qkv_bias=True, use_rel_pos=True, grid_size=8, dtype=dtype, attention="chunked",
                        rngs=nnx.Rngs(0))
  rng = np.random.default_rng(2)
  for table in (attention.rel_pos_h, attention.rel_pos_w):
    table[...] = jnp.asarray(rng.normal(0, 0.5, table.shape), jnp.float32)
  return attention


def test_xla_attention_in_bf16_agrees_with_the_chunked_path():
  """XLA's attention (the GPU's for training and float32) against the CPU's query chunks, both in bf16, over a whole
  8 x 8 grid (a global block) and for the top-left 5 x 3 queries of it (a windowed block's last window), and both
  against float32: the two bf16 paths round differently (XLA's takes the relative-position bias in bf16), but each is
  as close to float32 as bf16 allows, and to the other."""
  import jax
  import jax.numpy as jnp
  from flax import nnx

  x = np.random.default_rng(3).normal(size=(2, 8, 8, 64)).astype(np.float32)
  mix = nnx.jit(lambda attention, qkv, rows, cols: attention.mix(qkv, rows, cols), static_argnums=(2, 3))
  relative = lambda a, b: np.linalg.norm(a - b) / np.linalg.norm(b)
  fp32, chunked_bf16, xla_bf16 = _attention(), _attention(jnp.bfloat16), _attention(jnp.bfloat16)
  xla_bf16.attention = "xla"
  qkv_fp32, qkv_bf16 = fp32.qkv(x), chunked_bf16.qkv(x)
  for rows, cols in ((8, 8), (5, 3)):
    reference = np.asarray(mix(fp32, qkv_fp32, rows, cols), np.float64)
    chunked = np.asarray(mix(chunked_bf16, qkv_bf16, rows, cols), np.float64)
    xla = np.asarray(mix(xla_bf16, qkv_bf16, rows, cols), np.float64)
    assert reference.shape == (2, rows, cols, 64)
    # measured: 6.6e-3 and 6.8e-3 from float32, 1.7e-3 between them (without the bias: 0.94)
    assert 1e-4 < relative(chunked, reference) < 1.5e-2  # bf16 is bf16, not float32
    assert relative(xla, reference) < 1.5e-2 and relative(xla, chunked) < 5e-3
    np.testing.assert_allclose(xla, chunked, atol=0.01 * np.abs(reference).max(), rtol=0)
  assert jax.default_backend() == "cpu"  # "xla" is XLA's attention on any backend: here its CPU compilation


def test_the_frozen_encoder_call_sites_mark_it_frozen(tiny_world, tmp_path, monkeypatch):
  """precompute, zero-shot and predict run the frozen encoder with attention "auto" for a frozen forward (cuDNN's
  where it applies); a LoRA model's encoder keeps its training attention (what its validation ran)."""
  from autosam_jax.evaluation.predict import load_model
  from autosam_jax.evaluation.zero_shot import zero_shot
  from autosam_jax.features.precompute import PrecomputeOptions, precompute
  from autosam_jax.models import image_encoder

  class Marked(Exception):
    pass

  def marked(encoder, implementation, *, frozen=None):  # stops the command once its encoder is set up
    raise Marked(implementation, frozen, {b.attn.frozen for b in encoder.blocks})

  sam, _, _ = load_model(tiny_world.model, tiny_world.weights, encoder=True)
  assert {(b.attn.attention, b.attn.frozen) for b in sam.image_encoder.blocks} == {("auto", True)}
  monkeypatch.setattr(image_encoder, "set_attention", marked)
  with pytest.raises(Marked) as precomputed:
    precompute(tiny_world.acdc, tiny_world.weights, tmp_path / "cache", tfds_dir=tiny_world.tfds, progress=False,
               options=PrecomputeOptions(dtype="bfloat16"))
  assert precomputed.value.args[:2] == ("auto", True)
  with pytest.raises(Marked) as prompted:
    zero_shot(tiny_world.weights, tiny_world.acdc, tiny_world.tfds, tiny_world.split, tmp_path / "zero_shot",
              progress=False)
  assert prompted.value.args[:2] == ("auto", True)
  assert not (tmp_path / "cache").exists() and not (tmp_path / "zero_shot").exists()


@pytest.mark.parametrize("platform, dtype, head_dim, expected", [
    ("cuda", BF16, 96, "cudnn"),  # SAM 2 hiera tiny / small / large: 96 per head
    ("cuda", BF16, 56, "cudnn"),  # base_plus
    ("cuda", FP16, 72, "cudnn"),
    ("cuda", None, 96, "xla"),  # float32: cuDNN's fused attention takes bf16/fp16 only
    ("cuda", BF16, 12, "xla"),
    ("cuda", BF16, 136, "xla"),
    ("rocm", BF16, 96, "xla"),
    ("cpu", BF16, 96, "xla"),  # no query chunks: Hiera's windows and grids are small enough
])
def test_hiera_attention_takes_cudnn_wherever_it_can(platform, dtype, head_dim, expected):
  """Hiera's attention has no bias, so cuDNN serves its forward and its backward (a LoRA step) alike."""
  import jax.numpy as jnp

  from autosam_jax.models.encoders.hiera import attention_for

  assert attention_for(platform, None if dtype is None else jnp.dtype(dtype), head_dim) == expected


def test_hiera_blocks_take_the_named_path_and_their_real_head_dims():
  import jax.numpy as jnp
  from flax import nnx

  from autosam_jax.models.config import SamConfig
  from autosam_jax.models.encoders import build_encoder, set_attention
  from autosam_jax.models.encoders.hiera import PRESETS, attention_for

  for release, head_dim in (("tiny", 96), ("base_plus", 56), ("large", 72)):
    config = SamConfig(encoder_family="hiera", hiera=PRESETS[release], resize="square", use_high_res_features=True)
    encoder = nnx.eval_shape(lambda: build_encoder(config, dtype=jnp.bfloat16, rngs=nnx.Rngs(0)))
    assert {block.attn.head_dim for block in encoder.blocks} == {head_dim}
    assert {attention_for("cuda", jnp.bfloat16, block.attn.head_dim) for block in encoder.blocks} == {"cudnn"}
    set_attention(encoder, "chunked")  # SAM-ViT's CPU path is XLA's for Hiera
    assert {block.attn.attention for block in encoder.blocks} == {"xla"}
    with pytest.raises(ValueError, match="attention 'flash' is not one of"):
      set_attention(encoder, "flash")
