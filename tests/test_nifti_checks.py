"""NIfTI files that lie about themselves: a header claiming more voxels than the file holds, complex or RGB voxels,
zero, negative, non-finite or implausible spacings; preprocessing that would not fit in memory; and the warnings of
`validate` for constant, outlier-dominated and duplicated images."""

import gzip
import shutil
import struct
import tracemalloc

import nibabel as nib
import numpy as np
import pytest

from autosam_jax import cli, memory
from autosam_jax.data.errors import DataError
from autosam_jax.data.nifti import DEFAULT_SPACING_RANGE, SPACING_RANGE_VARIABLE, read_label, read_nifti, spacing_range
from autosam_jax.data.preprocess import PreprocessConfig, preprocess_volume
from autosam_jax.data.shapes import write_shapes_dataset
from autosam_jax.data.synthetic import save_nifti, write_synthetic_acdc
from autosam_jax.data.validate import validate

SHAPE = (8, 8, 3)
SPACING = (1.5, 1.5, 8.0)
DIM_OFFSET, PIXDIM_OFFSET = 40, 76  # NIfTI-1 header: dim is 8 int16 at byte 40, pixdim 8 float32 at byte 76
XYZT_UNITS_OFFSET, SFORM_CODE_OFFSET = 123, 254  # xyzt_units one byte, sform_code int16
LABELS = (0, 1, 2, 3)


@pytest.fixture(autouse=True)
def default_spacing_range(monkeypatch):
  monkeypatch.delenv(SPACING_RANGE_VARIABLE, raising=False)


def write(path, data=None, spacing=SPACING):
  data = np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 4 if data is None else data
  image = nib.Nifti1Image(data, np.diag([*spacing, 1.0]))
  image.header.set_zooms(spacing)
  nib.save(image, str(path))
  return path


def edit_header(path, offset, fmt, *values):
  """Overwrites header bytes on disk (after decompressing a .nii.gz), leaving the voxel data as it is."""
  compressed = path.name.endswith(".gz")
  content = bytearray(gzip.decompress(path.read_bytes()) if compressed else path.read_bytes())
  struct.pack_into(fmt, content, offset, *values)
  path.write_bytes(gzip.compress(bytes(content)) if compressed else bytes(content))
  return path


def refusal(read, path, *fragments):
  with pytest.raises(DataError) as caught:
    read(path)
  message = str(caught.value)
  assert "\n" not in message and message.startswith(f"{path}: "), message
  for fragment in fragments:
    assert fragment in message, message
  return message


def read_as_label(path):
  return read_label(path, LABELS)


# ---------------------------------------------------------------------------------------------------------------------
# 1. the header's shape against the data in the file


@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_header_claiming_more_voxels_than_stored_is_refused_before_allocating(tmp_path, suffix):
  path = edit_header(write(tmp_path / f"claims_more{suffix}"), DIM_OFFSET, "<4h", 3, 512, 512, 400)
  tracemalloc.start()
  try:
    refusal(read_nifti, path, "header says 512x512x400 int16 (200.0 MiB)", "holds 384 B of voxel data",
            "truncated or its header is wrong")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 8 << 20, f"{peak} bytes allocated to refuse a {path.stat().st_size}-byte file"


def test_header_claiming_gigabytes_is_refused_quickly(tmp_path):
  path = edit_header(write(tmp_path / "claims_2gb.nii.gz"), DIM_OFFSET, "<4h", 3, 512, 512, 4000)
  refusal(read_nifti, path, "header says 512x512x4000 int16 (2.0 GiB)", "384 B of voxel data")
  refusal(read_as_label, path, "header says 512x512x4000 int16 (2.0 GiB)")


def test_gzip_trailer_promising_more_than_deflate_can_hold_is_not_trusted(tmp_path):
  path = edit_header(write(tmp_path / "lying_trailer.nii.gz"), DIM_OFFSET, "<4h", 3, 512, 512, 4000)
  content = bytearray(path.read_bytes())
  content[-4:] = struct.pack("<I", 2**32 - 1)  # ISIZE: the last member's uncompressed size, here larger than claimed
  path.write_bytes(bytes(content))
  tracemalloc.start()
  try:
    refusal(read_nifti, path)  # the stream's own length check or the size check: either way before allocating
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  assert peak < 8 << 20, peak


def test_gzip_with_several_members_is_counted_across_them(tmp_path):
  source = write(tmp_path / "one_member.nii")
  content = source.read_bytes()
  whole = tmp_path / "two_members.nii.gz"
  whole.write_bytes(gzip.compress(content[:500]) + gzip.compress(content[500:]))  # last member's ISIZE: 236 bytes
  np.testing.assert_array_equal(read_nifti(whole).data, read_nifti(source).data)
  short = tmp_path / "two_members_short.nii.gz"
  short.write_bytes(gzip.compress(content[:500]) + gzip.compress(content[500:-100]))
  refusal(read_nifti, short, "header says 8x8x3 int16 (384 B)", "holds 284 B of voxel data")


@pytest.mark.parametrize("size", [0, -5])
@pytest.mark.parametrize("read", [read_nifti, read_as_label])
def test_zero_or_negative_header_dims_are_refused(tmp_path, size, read):
  path = edit_header(write(tmp_path / "bad_dims.nii.gz"), DIM_OFFSET, "<4h", 3, 8, size, 3)
  refusal(read, path, f"header dims 8x{size}x3 include a zero or negative size")


# ---------------------------------------------------------------------------------------------------------------------
# 2. voxels that are not one real number


@pytest.mark.parametrize("dtype", [np.complex64, np.complex128])
@pytest.mark.parametrize("read", [read_nifti, read_as_label])
def test_complex_voxels_are_refused(tmp_path, dtype, read):
  path = write(tmp_path / "complex.nii.gz", (np.ones(SHAPE) * (1 + 2j)).astype(dtype))
  refusal(read, path, f"voxels are complex-valued ({np.dtype(dtype).name})", "real-valued")


@pytest.mark.parametrize("read", [read_nifti, read_as_label])
def test_rgb_voxels_are_refused(tmp_path, read):
  path = write(tmp_path / "rgb.nii.gz", np.zeros(SHAPE, dtype=[("R", "u1"), ("G", "u1"), ("B", "u1")]))
  refusal(read, path, "voxels are RGB (3 bytes each)", "single-channel")


# ---------------------------------------------------------------------------------------------------------------------
# 3. zero, negative and non-finite spacings, which nibabel reads as 1, as their absolute value or as they are


@pytest.mark.parametrize("value", [0.0, -1.5, float("nan"), float("inf")])
@pytest.mark.parametrize("axis", [0, 2])
@pytest.mark.parametrize("read", [read_nifti, read_as_label])
def test_spacing_that_is_not_positive_and_finite_is_refused(tmp_path, value, axis, read):
  path = write(tmp_path / "bad_spacing.nii.gz")
  if value == 0:  # a zero pixdim is only "unset" where the sform gives the voxel size: here there is no sform
    edit_header(path, SFORM_CODE_OFFSET, "<h", 0)
  edit_header(path, PIXDIM_OFFSET + 4 * (axis + 1), "<f", value)
  refusal(read, path, "voxel spacing", "is not three positive numbers", "pixdim")


def test_zero_spacing_without_an_sform_fails_validation(tmp_path):
  write_synthetic_acdc(tmp_path / "acdc", 1, 3)
  image = tmp_path / "acdc" / "patient001" / "patient001_frame01.nii.gz"
  for path in (image, image.with_name("patient001_frame01_gt.nii.gz")):
    edit_header(path, SFORM_CODE_OFFSET, "<h", 0)
    edit_header(path, PIXDIM_OFFSET + 4 * 3, "<f", 0.0)
  with pytest.raises(DataError, match=f"^{image}: voxel spacing \\(1\\.\\d+, 1\\.\\d+, 0\\) is not three positive"):
    validate(tmp_path / "acdc")


# ---------------------------------------------------------------------------------------------------------------------
# 3b. the spacing comes from the geometry nibabel uses, in the header's unit


def oblique_sform(spacing):
  """An sform whose columns are a rotation scaled by `spacing` (so pixdim cannot be read off its diagonal)."""
  angle = np.deg2rad(20.0)
  rotation = np.array([[np.cos(angle), -np.sin(angle), 0.0], [np.sin(angle), np.cos(angle), 0.0], [0.0, 0.0, 1.0]])
  affine = np.eye(4)
  affine[:3, :3] = rotation * np.asarray(spacing)[None, :]
  return affine


@pytest.mark.parametrize("read", [read_nifti, read_as_label])
def test_zero_pixdim_with_an_sform_takes_the_sform_voxel_size(tmp_path, read):
  """nibabel reads a zero pixdim as 1.0 mm; the sform nibabel uses for the geometry holds the real voxel size."""
  path = tmp_path / "zero_pixdim.nii.gz"
  image = nib.Nifti1Image(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 4, oblique_sform(SPACING))
  image.header.set_zooms(SPACING)
  nib.save(image, str(path))
  edit_header(path, PIXDIM_OFFSET + 4 * 1, "<f", 0.0)
  assert nib.load(str(path)).header.get_zooms()[0] == 1.0  # what the spacing was read as
  assert read(path).spacing == pytest.approx(SPACING, rel=1e-6)


@pytest.mark.parametrize("read", [read_nifti, read_as_label])
def test_pixdim_that_disagrees_with_the_sform_is_refused(tmp_path, read):
  path = tmp_path / "disagree.nii.gz"
  image = nib.Nifti1Image(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 4, oblique_sform(SPACING))
  image.header.set_zooms((1.5, 1.5, 5.0))  # the sform says 8 mm between slices
  nib.save(image, str(path))
  refusal(read, path, "pixdim (1.5, 1.5, 5) and the sform's voxel size (1.5, 1.5, 8) disagree", "fix pixdim or the sform")
  # rounding of the float32 copies is no disagreement: pixdim, the number as written, is the spacing
  image.header.set_zooms((1.5, 1.5, 8.0 * (1 + 1e-5)))
  nib.save(image, str(path))
  assert read(path).spacing == tuple(float(z) for z in nib.load(str(path)).header.get_zooms())


@pytest.mark.parametrize("unit, stored", [("micron", (1500.0, 1500.0, 8000.0)), ("meter", (0.0015, 0.0015, 0.008)),
                                          ("mm", SPACING), ("unknown", SPACING)])
@pytest.mark.parametrize("with_sform", [True, False])
@pytest.mark.parametrize("read", [read_nifti, read_as_label])
def test_spacing_is_converted_from_the_header_unit(tmp_path, unit, stored, with_sform, read):
  path = tmp_path / f"{unit}.nii.gz"
  image = nib.Nifti1Image(np.arange(np.prod(SHAPE), dtype=np.int16).reshape(SHAPE) % 4, oblique_sform(stored))
  image.header.set_zooms(stored)
  image.header.set_xyzt_units(unit, "sec")
  if not with_sform:
    image.set_sform(None, code=0)
    image.set_qform(oblique_sform(stored), code=1)
  nib.save(image, str(path))
  assert read(path).spacing == pytest.approx(SPACING, rel=1e-5)


def test_plausible_numbers_in_micrometres_are_not_read_as_millimetres(tmp_path):
  """5 x 5 x 20 micron voxels look like a coarse mm scan; read as mm they would be accepted with the wrong size."""
  path = write(tmp_path / "microscopy.nii.gz", spacing=(5.0, 5.0, 20.0))
  edit_header(path, XYZT_UNITS_OFFSET, "<B", 3 | 8)  # micron, seconds
  refusal(read_nifti, path, "voxel spacing (0.005, 0.005, 0.02) mm (from micron by xyzt_units)", "plausible")


@pytest.mark.parametrize("code", [4, 7])
def test_unknown_space_unit_code_is_refused(tmp_path, code):
  path = edit_header(write(tmp_path / "odd_unit.nii.gz"), XYZT_UNITS_OFFSET, "<B", code)
  refusal(read_nifti, path, f"spatial unit code {code}", "fix xyzt_units")


# ---------------------------------------------------------------------------------------------------------------------
# 4. implausible spacings and the range's override


@pytest.mark.parametrize("spacing", [(1680.5, 1680.5, 8.0), (1e-6, 1e-6, 1e-6), (1.5, 1.5, 60.0)])
@pytest.mark.parametrize("read", [read_nifti, read_as_label])
def test_implausible_spacing_is_refused(tmp_path, spacing, read):
  path = write(tmp_path / "implausible.nii.gz", spacing=spacing)
  refusal(read, path, "outside the plausible 0.01-50 mm range", f"{SPACING_RANGE_VARIABLE}=LOW,HIGH")


def test_range_ends_are_plausible(tmp_path):
  assert spacing_range() == DEFAULT_SPACING_RANGE == (0.01, 50.0)
  assert read_nifti(write(tmp_path / "fine.nii.gz", spacing=(0.01, 0.01, 50.0))).spacing == pytest.approx(
      (0.01, 0.01, 50.0))


def test_range_variable_widens_and_narrows_the_range(tmp_path, monkeypatch):
  coarse = write(tmp_path / "micrometres.nii.gz", spacing=(1680.5, 1680.5, 8.0))
  refusal(read_nifti, coarse, "0.01-50 mm")
  monkeypatch.setenv(SPACING_RANGE_VARIABLE, "0.001, 2000")
  assert spacing_range() == (0.001, 2000.0)
  assert read_nifti(coarse).spacing == (1680.5, 1680.5, 8.0)
  assert read_as_label(coarse).spacing == (1680.5, 1680.5, 8.0)
  monkeypatch.setenv(SPACING_RANGE_VARIABLE, "1,2")
  refusal(read_nifti, write(tmp_path / "ordinary.nii.gz"), "voxel spacing (1.5, 1.5, 8) mm", "plausible 1-2 mm range")


@pytest.mark.parametrize("value", ["abc", "1", "5,1", "0,10", "-1,10", "nan,5", "1,inf", "1,2,3", "1;2"])
def test_malformed_range_variable_is_one_error_naming_it(tmp_path, monkeypatch, value):
  path = write(tmp_path / "ordinary.nii.gz")
  monkeypatch.setenv(SPACING_RANGE_VARIABLE, value)
  for call in (spacing_range, lambda: read_nifti(path), lambda: PreprocessConfig()):
    with pytest.raises(DataError) as caught:
      call()
    message = str(caught.value)
    assert message.startswith(f"{SPACING_RANGE_VARIABLE}: {value!r} is not 'LOW,HIGH'") and "\n" not in message


# ---------------------------------------------------------------------------------------------------------------------
# 5. preprocessing: the target spacing, and resampling that would not fit in memory


@pytest.mark.parametrize("target", [1e-6, 1000.0])
def test_implausible_target_spacing_is_refused(target):
  with pytest.raises(DataError) as caught:
    PreprocessConfig(mode="faithful", target_spacing=(target, target))
  message = str(caught.value)
  assert message.startswith(f"preprocess config: target_spacing ({target}, {target}) mm is outside the plausible "
                            "0.01-50 mm range") and "\n" not in message


def test_image_cache_refuses_a_tiny_target_spacing_in_one_line(tmp_path, capsys):
  code = cli.main(["image-cache", "--data", str(tmp_path / "absent"), "--tfds-dir", str(tmp_path / "tfds"), "--out",
                   str(tmp_path / "cache"), "--spacing", "1e-6"])
  err = capsys.readouterr().err
  assert code == 2 and err.startswith("error: preprocess config: target_spacing") and err.count("\n") == 1, err
  assert not (tmp_path / "cache").exists()


def test_resampling_that_cannot_fit_in_memory_is_refused_before_allocating():
  image, labels = np.ones(SHAPE, np.float32), np.zeros(SHAPE, np.uint8)
  tracemalloc.start()
  try:
    with pytest.raises(DataError) as caught:
      preprocess_volume(image, (50000.0, 50000.0), labels, PreprocessConfig("faithful"), name="scan.nii.gz")
    peak = tracemalloc.get_traced_memory()[1]
  finally:
    tracemalloc.stop()
  message = str(caught.value)
  assert message.startswith("scan.nii.gz: resampling 8x8x3 voxels of 50000x50000 mm to 1.25x1.25 mm would produce "
                            "320000x320000x3 voxels and need about ") and " is available" in message, message
  assert peak < 1 << 20, peak


def test_memory_check_uses_the_available_memory(monkeypatch):
  image = np.random.default_rng(0).normal(size=(64, 64, 4)).astype(np.float32)
  assert memory.available_bytes() > 0
  monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
  with pytest.raises(DataError, match=r"^case7: resampling 64x64x4 voxels .* would produce 77x77x4 voxels and need "
                                      r"about \d+\.\d MiB of memory, but 1\.0 MiB is available"):
    preprocess_volume(image, (1.5, 1.5), None, PreprocessConfig("faithful"), name="case7")
  monkeypatch.setattr(memory, "available_bytes", lambda: None)  # unknown: not checked
  assert preprocess_volume(image, (1.5, 1.5), None, PreprocessConfig("faithful")).geometry.resampled_shape == (77, 77)
  monkeypatch.setattr(memory, "available_bytes", lambda: 1 << 20)
  assert preprocess_volume(image, (1.5, 1.5), None, PreprocessConfig("improved")).images.shape == (4, 64, 64, 3)


# ---------------------------------------------------------------------------------------------------------------------
# 6. validate's warnings


@pytest.fixture(scope="module")
def pristine_acdc(tmp_path_factory):
  out_dir = tmp_path_factory.mktemp("pristine") / "acdc"
  write_synthetic_acdc(out_dir, 2, 11)
  return out_dir


@pytest.fixture
def acdc(pristine_acdc, tmp_path):
  return shutil.copytree(pristine_acdc, tmp_path / "acdc")


def run_validate(data_dir, capsys):
  code = cli.main(["validate", str(data_dir)])
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert captured.out.startswith(f"ACDC dataset {data_dir}") or captured.out.startswith("nnU-Net raw dataset")
  lines = captured.err.splitlines()
  assert all(line.startswith("warning: ") for line in lines), lines
  return [line[len("warning: "):] for line in lines]


def rewrite_image(path, change):
  volume = nib.load(path)
  save_nifti(path, change(np.asanyarray(volume.dataobj).astype(np.float32)), volume.affine,
             tuple(float(z) for z in volume.header.get_zooms()))


def test_pristine_dataset_has_no_warnings(acdc, capsys):
  assert run_validate(acdc, capsys) == []


def test_constant_image_is_warned_about(acdc, capsys):
  path = acdc / "patient001" / "patient001_frame01.nii.gz"
  rewrite_image(path, lambda data: np.full_like(data, 7.0))
  assert run_validate(acdc, capsys) == [f"{path}: image is constant (every voxel is 7); it holds no anatomy, export "
                                        "it again or remove the case"]


def test_image_dominated_by_one_outlier_is_warned_about(acdc, capsys):
  path = acdc / "patient002" / "patient002_frame01.nii.gz"

  def spike(data):
    data[3, 4, 1] = 1000.0 * data.max()
    return data

  rewrite_image(path, spike)
  warnings = run_validate(acdc, capsys)
  assert len(warnings) == 1, warnings
  assert warnings[0].startswith(f"{path}: image is dominated by outliers: its maximum "), warnings
  assert "100x further above its minimum" in warnings[0] and "99.9th percentile" in warnings[0]


def test_outliers_of_a_few_times_the_percentile_are_not_warned_about(acdc, capsys):
  path = acdc / "patient002" / "patient002_frame01.nii.gz"

  def bright_spots(data):
    data[3, 4, 1] = 5.0 * data.max()  # a bright vessel or fat voxel: within a few times the rest
    return data

  rewrite_image(path, bright_spots)
  assert run_validate(acdc, capsys) == []


def test_duplicated_patient_is_warned_about_naming_both(acdc, capsys):
  copy = acdc / "patient003"
  shutil.copytree(acdc / "patient001", copy)
  for path in copy.glob("patient001*"):
    path.rename(copy / path.name.replace("patient001", "patient003"))
  report = validate(acdc)
  assert len(report.cases) == 6
  warnings = run_validate(acdc, capsys)
  frames = [case.frame_number for case in report.cases_of("patient001")]
  assert warnings == [f"{copy / f'patient003_frame{n:02d}.nii.gz'}: image has the same voxels as "
                      f"{acdc / 'patient001' / f'patient001_frame{n:02d}.nii.gz'} (case patient001_frame{n:02d}); a "
                      "duplicated case can land in both the training and the test split, remove one of them"
                      for n in frames]


def test_duplicated_nnunet_case_is_warned_about(tmp_path, capsys):
  root = write_shapes_dataset(tmp_path / "Dataset002_Shapes", num_cases=3, class_names=("blob",), seed=4,
                              shape=(16, 16, 4))
  images = sorted((root / "imagesTr").glob("*_0000.nii.gz"))
  first = images[0]
  case_id = first.name[:-len("_0000.nii.gz")]
  shutil.copy(first, root / "imagesTr" / "zzcopy_0000.nii.gz")
  shutil.copy(root / "labelsTr" / f"{case_id}.nii.gz", root / "labelsTr" / "zzcopy.nii.gz")
  warnings = [w for w in run_validate(root, capsys) if "numTraining" not in w]
  assert warnings == [f"{root / 'imagesTr' / 'zzcopy_0000.nii.gz'}: image has the same voxels as {first} (case "
                      f"{case_id}); a duplicated case can land in both the training and the test split, remove one of "
                      "them"]
