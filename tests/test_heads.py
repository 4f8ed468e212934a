"""Segmentation heads (AutoSAM, CNN, Linear) and the UNet baseline: sizes, SAM initialisation, forward, gradients."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from autosam_jax import load_sam
from autosam_jax.models.heads import CnnHead, Frozen, LinearHead, build_head, count_params, split_trainable
from autosam_jax.models.mask_decoder import MaskDecoder
from autosam_jax.models.unet import UNet
from tests.conftest import TINY_CONFIGS
from weights_conversion import convert

SAM_NAME = "dim64-win5-pad"  # tiny encoder, SAM-sized decoder (256 wide, 4 mask tokens)
NUM_CLASSES = 4


@pytest.fixture(scope="module")
def sam(meta_checkpoints, tmp_path_factory):
  config = TINY_CONFIGS[SAM_NAME]
  _, path = meta_checkpoints(SAM_NAME, config)
  out_dir, _ = convert(path, tmp_path_factory.mktemp("heads") / "converted", decoder_num_heads=config.decoder_num_heads)
  return load_sam(out_dir)


@pytest.fixture(scope="module")
def image_embeddings():
  return jax.random.normal(jax.random.key(7), (2, 8, 8, 256))


@functools.partial(nnx.jit, static_argnames=("options",))
def _apply(module, args, options):
  return module(*args, **dict(options))


def apply(module, *args, **kwargs):
  """Compiled forward, cached per module structure: op-by-op eager execution would compile every primitive."""
  return _apply(module, args, tuple(sorted(kwargs.items())))


def tree_equal(a, b) -> bool:
  leaves_a, leaves_b = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
  return len(leaves_a) == len(leaves_b) and all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def paths(state) -> list[str]:
  return [".".join(str(k) for k in path) for path, _ in nnx.to_flat_state(state)]


# --- sizes (abstract construction: no weights drawn) -------------------------------------------------------------

def test_param_counts():
  def abstract(make):
    return nnx.eval_shape(make)

  faithful = abstract(lambda: build_head("autosam", NUM_CLASSES, variant="faithful", rngs=nnx.Rngs(0)))
  assert count_params(faithful) == 3_646_880
  # The official freeze rule: everything with "iou" in its name; iou tokens 4 x 256 and the IoU head.
  assert count_params(faithful, Frozen) == 1_024 + 132_098
  assert not [p for p in paths(nnx.state(faithful, nnx.Param)) if "iou" in p]
  assert all("iou" in p for p in paths(nnx.state(faithful, Frozen)))

  improved = abstract(lambda: build_head("autosam", NUM_CLASSES, variant="improved", rngs=nnx.Rngs(0)))
  # transformer + upscaling + one hypernetwork MLP and one token per class + no_mask_embed; nothing frozen.
  assert count_params(improved) == 3_291_264 + 73_952 + NUM_CLASSES * (139_808 + 256) + 256 == 3_925_728
  assert count_params(improved, Frozen) == 0

  for variant in ("faithful", "improved"):
    assert count_params(abstract(lambda: build_head("cnn", NUM_CLASSES, variant=variant, rngs=nnx.Rngs(0)))) \
        == 20_686_340
    assert count_params(abstract(lambda: build_head("linear", NUM_CLASSES, variant=variant, rngs=nnx.Rngs(0)))) \
        == 75_140

  unet = abstract(lambda: UNet(NUM_CLASSES, rngs=nnx.Rngs(0)))
  assert count_params(unet) == 31_031_940
  assert count_params(unet.encoder) == 20_940_864


def test_bad_arguments():
  with pytest.raises(ValueError, match="unknown head kind"):
    build_head("vit", 4, variant="faithful", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="unknown head variant"):
    build_head("linear", 4, variant="better", rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="improved-variant option"):
    nnx.eval_shape(lambda: build_head("autosam", 4, variant="faithful", joint=True, rngs=nnx.Rngs(0)))
  with pytest.raises(ValueError, match="multiples of 16"):
    nnx.eval_shape(lambda: UNet(4, rngs=nnx.Rngs(0)).encoder.contract(jnp.zeros((1, 40, 48, 3))))


# --- AutoSAM against SAM's own decoder ---------------------------------------------------------------------------

def grid_positional_encoding(gaussian_matrix: np.ndarray, h: int, w: int) -> np.ndarray:
  """SAM's dense PE in numpy: sin/cos(2 pi (2 xy - 1) G) at the cell centres, (h, w, 2 * num_feats)."""
  x, y = np.meshgrid((np.arange(w) + 0.5) / w, (np.arange(h) + 0.5) / h)
  projected = 2 * np.pi * (np.stack([x, y], axis=-1) * 2 - 1) @ gaussian_matrix
  return np.concatenate([np.sin(projected), np.cos(projected)], axis=-1).astype(np.float32)


def test_faithful_autosam_matches_per_class_sam_mask_decoder(sam, image_embeddings):
  """One class at a time through our MaskDecoder built as the official one (2 mask tokens), with the head's tokens."""
  head = build_head("autosam", NUM_CLASSES, variant="faithful", sam=sam, rngs=nnx.Rngs(1))
  logits, iou = apply(head, image_embeddings, return_iou=True)

  b, h, w, dim = image_embeddings.shape
  image_pe = jnp.asarray(grid_positional_encoding(
      np.asarray(head.pe_layer.positional_encoding_gaussian_matrix[...]), h, w))[None]
  decoder_config = dataclasses.replace(sam.config, num_multimask_outputs=1)
  expected_logits, expected_iou = [], []
  for c in range(NUM_CLASSES):
    decoder = nnx.eval_shape(lambda: MaskDecoder(decoder_config, rngs=nnx.Rngs(0)))
    decoder.transformer = sam.mask_decoder.transformer
    decoder.output_upscaling = sam.mask_decoder.output_upscaling
    decoder.output_hypernetworks_mlps = nnx.List(list(sam.mask_decoder.output_hypernetworks_mlps)[:2])
    decoder.iou_token.embedding = nnx.Param(head.iou_tokens[...][c:c + 1])
    decoder.mask_tokens.embedding = nnx.Param(head.mask_tokens[...][c])
    decoder.iou_prediction_head = head.iou_prediction_head
    masks, iou_pred = apply(decoder, image_embeddings, image_pe, jnp.zeros((b, 0, dim)), jnp.zeros((b, h, w, dim)),
                            multimask_output=False)
    expected_logits.append(masks[..., 0])
    expected_iou.append(iou_pred[:, 0])

  assert logits.shape == (b, 4 * h, 4 * w, NUM_CLASSES) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, np.stack(expected_logits, axis=-1), atol=1e-4, rtol=0)
  np.testing.assert_allclose(iou, np.stack(expected_iou, axis=-1), atol=1e-4, rtol=0)
  # Classes differ only by their tokens, so identical maps would mean the tokens were mixed up.
  assert np.abs(np.asarray(logits[..., 0] - logits[..., 1])).max() > 1e-2


def test_autosam_weights_come_from_sam(sam):
  decoder, prompt_encoder = sam.mask_decoder, sam.prompt_encoder
  faithful = build_head("autosam", NUM_CLASSES, variant="faithful", sam=sam, rngs=nnx.Rngs(1))
  num_classes = 6  # more classes than SAM's 4 mask tokens: the pairing wraps around
  improved = build_head("autosam", num_classes, variant="improved", sam=sam, rngs=nnx.Rngs(1))
  for head in (faithful, improved):
    assert tree_equal(head.transformer, decoder.transformer)
    assert tree_equal(head.output_upscaling, decoder.output_upscaling)

  assert [tree_equal(m, decoder.output_hypernetworks_mlps[i])
          for i, m in enumerate(faithful.output_hypernetworks_mlps)] == [True, True]
  sam_pe = np.asarray(prompt_encoder.pe_layer.positional_encoding_gaussian_matrix[...])
  assert not np.allclose(faithful.pe_layer.positional_encoding_gaussian_matrix[...], sam_pe)
  assert "pe_layer.positional_encoding_gaussian_matrix" not in paths(nnx.state(faithful, nnx.Param))

  np.testing.assert_array_equal(improved.pe_layer.positional_encoding_gaussian_matrix[...], sam_pe)
  np.testing.assert_array_equal(improved.no_mask_embed[...], prompt_encoder.no_mask_embed.embedding[...][0])
  sam_tokens = np.asarray(decoder.mask_tokens.embedding[...])
  for c in range(num_classes):
    np.testing.assert_array_equal(improved.class_tokens[...][c], sam_tokens[c % 4])
    assert tree_equal(improved.output_hypernetworks_mlps[c], decoder.output_hypernetworks_mlps[c % 4])
  assert not hasattr(improved, "iou_tokens") and not hasattr(improved, "iou_prediction_head")

  linear = build_head("linear", NUM_CLASSES, variant="faithful", sam=sam, rngs=nnx.Rngs(1))
  assert tree_equal(linear.output_upscaling, decoder.output_upscaling)


def test_improved_joint_equals_per_class_for_one_class(sam, image_embeddings):
  # With a single class there is nothing to attend to across classes, so both decodings must agree.
  per_class = build_head("autosam", 1, variant="improved", sam=sam, rngs=nnx.Rngs(1))
  joint = build_head("autosam", 1, variant="improved", sam=sam, joint=True, rngs=nnx.Rngs(1))
  np.testing.assert_allclose(apply(joint, image_embeddings), apply(per_class, image_embeddings), atol=1e-4, rtol=0)


# --- every head: shapes and gradients ----------------------------------------------------------------------------

HEADS = {
    "autosam-faithful": lambda sam: build_head("autosam", NUM_CLASSES, variant="faithful", sam=sam, rngs=nnx.Rngs(2)),
    "autosam-improved": lambda sam: build_head("autosam", NUM_CLASSES, variant="improved", sam=sam, rngs=nnx.Rngs(2)),
    "autosam-improved-joint": lambda sam: build_head("autosam", NUM_CLASSES, variant="improved", sam=sam, joint=True,
                                                     rngs=nnx.Rngs(2)),
    # The full CNN head (20.7M weights) is only counted above; a narrow one keeps the test fast.
    "cnn": lambda sam: CnnHead(NUM_CLASSES, variant="faithful", top_channels=8, rngs=nnx.Rngs(2)),
    "linear-faithful": lambda sam: build_head("linear", NUM_CLASSES, variant="faithful", sam=sam, rngs=nnx.Rngs(2)),
    "linear-improved": lambda sam: LinearHead(NUM_CLASSES, variant="improved", rngs=nnx.Rngs(2)),
}


@pytest.mark.parametrize("name", sorted(HEADS))
def test_head_forward_and_gradients(sam, image_embeddings, name):
  head = HEADS[name](sam)
  # Weights built abstractly and then replaced must all be real arrays by now.
  assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(nnx.state(head)))
  graphdef, trainable, rest = split_trainable(head)
  targets = jax.random.normal(jax.random.key(3), (2, 32, 32, NUM_CLASSES))

  def loss(trainable):
    logits = nnx.merge(graphdef, trainable, rest)(image_embeddings)
    return jnp.mean(logits * targets), logits

  grads, logits = jax.jit(jax.grad(loss, has_aux=True))(trainable)
  assert logits.shape == (2, 32, 32, NUM_CLASSES) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  if name == "linear-faithful":
    assert logits.min() >= 0  # the official ReLU on the logits
  if name == "linear-improved":
    assert logits.min() < 0

  zero_gradient = []
  for path, grad in nnx.to_flat_state(grads):
    grad = np.asarray(grad[...])
    assert np.isfinite(grad).all(), path
    if not np.any(grad):
      zero_gradient.append(".".join(str(k) for k in path))
  if name == "autosam-faithful":
    # The second mask token's MLP is optimised but its output is discarded, as in the official code.
    assert zero_gradient == [f"output_hypernetworks_mlps.1.layers.{i}.{p}" for i in range(3)
                             for p in ("bias", "kernel")]
  elif name == "autosam-improved":
    # One token per batch row: attention over that single token is softmax([x]) = 1 whatever the query and key, so
    # the query/key projections of token self-attention and image->token attention get no gradient.
    assert zero_gradient == [f"transformer.layers.{layer}.{attention}.{proj}.{p}" for layer in range(2)
                             for attention in ("cross_attn_image_to_token", "self_attn")
                             for proj in ("k_proj", "q_proj") for p in ("bias", "kernel")]
  else:
    assert zero_gradient == []


# --- UNet --------------------------------------------------------------------------------------------------------

def test_unet_forward_shapes():
  unet = UNet(NUM_CLASSES, rngs=nnx.Rngs(0))
  images = jax.random.uniform(jax.random.key(4), (1, 64, 64, 3))
  logits = apply(unet, images)
  assert logits.shape == (1, 64, 64, NUM_CLASSES) and logits.dtype == jnp.float32
  assert np.isfinite(np.asarray(logits)).all()
  center = apply(unet.encoder, images)
  assert center.shape == (1, 8, 8, 512)  # SimCLR's features: 512 channels at 1/8 resolution


def test_unet_matches_official_torch_architecture():
  """A narrow UNet against the official layer sequence written in torch, with our weights copied over."""
  torch = pytest.importorskip("torch")
  tnn = torch.nn
  f, num_classes = 4, 3
  unet = UNet(num_classes, in_channels=3, base_channels=f, rngs=nnx.Rngs(5))

  def conv(layer):
    kernel = np.asarray(layer.kernel[...])
    torch_layer = tnn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0], padding=kernel.shape[0] // 2)
    torch_layer.weight.data = torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy())
    torch_layer.bias.data = torch.from_numpy(np.array(layer.bias[...]))
    return torch_layer

  def conv_transpose(layer):
    kernel = np.asarray(layer.kernel[...])  # (in, 2, 2, out)
    torch_layer = tnn.ConvTranspose2d(kernel.shape[0], kernel.shape[3], 2, stride=2)
    torch_layer.weight.data = torch.from_numpy(kernel.transpose(0, 3, 1, 2).copy())
    torch_layer.bias.data = torch.from_numpy(np.array(layer.bias[...]))
    return torch_layer

  def contract(block):
    return tnn.Sequential(conv(block.conv), tnn.InstanceNorm2d(block.conv.out_features), tnn.LeakyReLU())

  def expand(block):
    return tnn.Sequential(conv(block.conv), tnn.LeakyReLU())

  enc = unet.encoder
  levels = [tnn.Sequential(contract(a), contract(b)) for a, b in
            [(enc.contr_1_1, enc.contr_1_2), (enc.contr_2_1, enc.contr_2_2), (enc.contr_3_1, enc.contr_3_2),
             (enc.contr_4_1, enc.contr_4_2)]]
  center = tnn.Sequential(conv(enc.center.conv1), tnn.ReLU(), conv(enc.center.conv2), tnn.ReLU(),
                          conv_transpose(enc.center.upscale), tnn.ReLU())
  ups = [tnn.Sequential(expand(unet.expand_4_1), expand(unet.expand_4_2), conv_transpose(unet.upscale4)),
         tnn.Sequential(expand(unet.expand_3_1), expand(unet.expand_3_2), conv_transpose(unet.upscale3)),
         tnn.Sequential(expand(unet.expand_2_1), expand(unet.expand_2_2), conv_transpose(unet.upscale2)),
         tnn.Sequential(expand(unet.expand_1_1), expand(unet.expand_1_2))]
  head = conv(unet.head)

  def torch_forward(x):
    skips = []
    for level in levels:
      x = level(x)
      skips.append(x)
      x = torch.nn.functional.max_pool2d(x, 2, 2)
    x = center(x)
    for up, skip in zip(ups, reversed(skips)):
      x = up(torch.cat([x, skip], 1))
    return head(x)

  images = np.random.default_rng(0).normal(size=(2, 32, 48, 3)).astype(np.float32)
  with torch.no_grad():
    expected = torch_forward(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy().transpose(0, 2, 3, 1)
  np.testing.assert_allclose(apply(unet, jnp.asarray(images)), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("in_features,kernel_size,lowered", [(64, 3, True), (40, 5, True), (16, 1, True),
                                                             (64, 3, False)])  # False: XLA's own convolution
def test_same_conv_equals_xla_convolution_with_gradients(in_features, kernel_size, lowered, monkeypatch):
  """The CPU matmul lowering of SameConv (im2col for wide inputs, a plain matmul for wide 1x1) against XLA's
  convolution with the same parameters: outputs and the gradients for input, kernel and bias."""
  from autosam_jax.models.init import torch_conv
  from autosam_jax.models.layers import SameConv

  monkeypatch.setattr(SameConv, "gemm_min_macs", 0 if lowered else float("inf"))
  conv = torch_conv(in_features, 24, kernel_size, rngs=nnx.Rngs(0))
  assert isinstance(conv, SameConv)
  x = jax.random.normal(jax.random.key(1), (2, 9, 7, in_features))
  pad = (kernel_size - 1) // 2

  def reference(x, kernel, bias):
    return jax.lax.conv_general_dilated(x, kernel, (1, 1), ((pad, pad), (pad, pad)),
                                        dimension_numbers=("NHWC", "HWIO", "NHWC")) + bias

  graphdef, state = nnx.split(conv)

  def ours(x, kernel, bias):
    params = nnx.State({"kernel": nnx.Param(kernel), "bias": nnx.Param(bias)})
    return nnx.merge(graphdef, params)(x)

  args = (x, state["kernel"].get_value(), state["bias"].get_value())
  weights = jax.random.normal(jax.random.key(2), (2, 9, 7, 24))
  loss = lambda f: (lambda *a: jnp.sum(jnp.tanh(f(*a)) * weights))
  np.testing.assert_allclose(jax.jit(ours)(*args), jax.jit(reference)(*args), rtol=1e-5, atol=1e-5)
  gradients = lambda f: jax.jit(jax.grad(loss(f), argnums=(0, 1, 2)))(*args)
  for got, want in zip(gradients(ours), gradients(reference)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
