"""The trainer's jitted step: one per program, built once per run, so that a step's call does not hash the program
(a vit_b graph definition's hash took milliseconds every step when the program was a static argument)."""

import dataclasses

from autosam_jax.train.loop import TrainConfig, train

CONFIG = TrainConfig(head="linear", variant="faithful", epochs=1, batch_size=1, learning_rate=5e-3,
                     plateau_start_epoch=1, checkpoint_every_steps=0)


def test_a_run_hashes_its_program_a_few_times_not_at_every_step(tiny_world, tmp_path, monkeypatch):
  from flax import nnx

  from autosam_jax import load_sam
  from autosam_jax.data.splits import Split
  from autosam_jax.models.heads import build_head
  from autosam_jax.train import core
  from autosam_jax.train.loop import HeadProgram

  hashes = []
  plain_hash = HeadProgram.__hash__
  monkeypatch.setattr(HeadProgram, "__hash__", lambda self: hashes.append(1) or plain_hash(self))

  def make(config):
    return build_head(config.head, config.num_classes, variant=config.variant, sam=load_sam(tiny_world.weights),
                      rngs=nnx.Rngs(config.seed))

  split = Split.from_json(tiny_world.split)
  result = train(CONFIG, tiny_world.cache, make, tmp_path / "run", list(split.labeled(1)), [], progress=False)
  assert result["steps"] >= 8
  assert len(hashes) <= 2, f"{len(hashes)} hashes of the program in {result['steps']} steps"
  # equal programs (a second run of the same architecture) share one jitted step and its compilation
  graphdef = nnx.graphdef(make(dataclasses.replace(CONFIG, num_classes=4)))
  assert core._compiled_step(HeadProgram(graphdef)) is core._compiled_step(HeadProgram(graphdef))
