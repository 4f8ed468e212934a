"""The canonical voxel order slices are taken in, chosen from a scan's world geometry rather than its array layout.

A NIfTI file may store one acquisition in any voxel order: short-axis slices along axis 2 of one export are along
axis 0 of another, and an axis may run right-to-left in one and left-to-right in the next. A 2D model only sees the
planes it is given, so slicing `volume[:, :, k]` of the stored array would segment some scans in a plane it never saw.
`choose_orientation` finds, from the affine and the voxel spacing alone, a pure permutation and flip of the stored
axes (no resampling, so every voxel keeps its value) into one canonical order:

- the last canonical axis (the slice axis) is the acquisition's through-plane axis: the voxel axis whose spacing is
  clearly the largest (at least THICK_SLICE_RATIO times the second largest, as in 1.5 x 1.5 x 10 mm cine MRI);
  with (near-)isotropic voxels, the voxel axis closest to the scanner's superior-inferior direction (axial slices);
- the two in-plane axes follow the world axes they are closest to, R/L before A/P before S/I;
- every canonical axis points towards + world (RAS+), flipping stored axes where needed.

Which voxel axis is closest to which world axis is nibabel's `io_orientation`, which also assigns oblique affines
uniquely. The same world content stored in any of the 48 voxel orders therefore gives one canonical array, and an
axial RAS-stored volume is left as it is. `Orientation.to_stored` undoes the mapping exactly, so predictions made on
the canonical array are written in the file's own voxel order, with its own affine.

That per-volume choice jumps where an in-plane axis lies 45 degrees between two world axes: two short-axis stacks
planned a few degrees apart on either side of it would be cut transposed or mirrored relative to each other. A
dataset is therefore cut in one frame: `choose_dataset_orientations` takes a reference frame from the cases (per
acquisition plane, the case whose own frame the others agree with best), then gives every case the permutation and
flip of its axes nearest to that reference, and names the cases whose axes still point far from it. The references
are recorded with the dataset, so new scans (`predict`) are cut the same way (`align_orientation`).
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

THICK_SLICE_RATIO = 1.5
WORLD_LETTERS = ("R", "A", "S")  # the + direction of world axes x, y, z (RAS+)
WORLD_AXES = ("R/L", "A/P", "S/I")
PLANES = ("sagittal", "coronal", "axial")  # the plane whose slices are stacked along world x, y, z


@dataclasses.dataclass(frozen=True)
class Orientation:
  """Stored voxel order -> canonical voxel order: canonical axis i is stored axis `axes[i]`, reversed where
  `flips[i]`, and runs along world axis `world[i]` (0 x R, 1 y A, 2 z S) towards +."""
  axes: tuple[int, int, int] = (0, 1, 2)
  flips: tuple[bool, bool, bool] = (False, False, False)
  world: tuple[int, int, int] = (0, 1, 2)

  def __post_init__(self):
    object.__setattr__(self, "axes", tuple(int(a) for a in self.axes))
    object.__setattr__(self, "flips", tuple(bool(f) for f in self.flips))
    object.__setattr__(self, "world", tuple(int(w) for w in self.world))
    if sorted(self.axes) != [0, 1, 2] or sorted(self.world) != [0, 1, 2] or len(self.flips) != 3:
      raise ValueError(f"not an orientation: axes {self.axes}, flips {self.flips}, world {self.world}")
    if self.world[0] > self.world[1]:
      raise ValueError(f"in-plane axes must follow world order (R/L, A/P, S/I), got world {self.world}")

  @property
  def is_identity(self) -> bool:
    return self.axes == (0, 1, 2) and not any(self.flips)

  @property
  def slice_axis(self) -> int:
    """The stored axis the slices are taken along."""
    return self.axes[2]

  @property
  def slice_world_axis(self) -> int:
    """The world axis (0 R/L, 1 A/P, 2 S/I) closest to the through-plane direction."""
    return self.world[2]

  def _flip(self, array: np.ndarray) -> np.ndarray:
    return array[tuple(slice(None, None, -1) if f else slice(None) for f in self.flips)]

  def to_canonical(self, array: np.ndarray) -> np.ndarray:
    """The stored array (first 3 axes in stored voxel order, any further axes kept) in canonical order; a view."""
    array = np.asarray(array)
    if array.ndim < 3:
      raise ValueError(f"need at least 3 axes to reorient, got shape {array.shape}")
    return self._flip(np.transpose(array, self.axes + tuple(range(3, array.ndim))))

  def to_stored(self, array: np.ndarray) -> np.ndarray:
    """The exact inverse of `to_canonical`: a canonical-order array back in the stored voxel order; a view."""
    array = np.asarray(array)
    if array.ndim < 3:
      raise ValueError(f"need at least 3 axes to reorient, got shape {array.shape}")
    inverse = tuple(int(a) for a in np.argsort(self.axes))
    return np.transpose(self._flip(array), inverse + tuple(range(3, array.ndim)))

  def canonical_shape(self, stored_shape: Sequence[int]) -> tuple[int, int, int]:
    return tuple(int(stored_shape[a]) for a in self.axes)

  def stored_shape(self, canonical_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = [0, 0, 0]
    for i, axis in enumerate(self.axes):
      shape[axis] = int(canonical_shape[i])
    return tuple(shape)

  def canonical_spacing(self, stored_spacing: Sequence[float]) -> tuple[float, float, float]:
    return tuple(float(stored_spacing[a]) for a in self.axes)

  def canonical_affine(self, stored_affine: np.ndarray, stored_shape: Sequence[int]) -> np.ndarray:
    """The affine of the canonical voxel grid: the same world position for every voxel as in the stored file."""
    canonical_to_stored = np.zeros((4, 4))
    canonical_to_stored[3, 3] = 1.0
    for i, (axis, flip) in enumerate(zip(self.axes, self.flips)):
      canonical_to_stored[axis, i] = -1.0 if flip else 1.0
      canonical_to_stored[axis, 3] = int(stored_shape[axis]) - 1 if flip else 0.0
    return np.asarray(stored_affine, np.float64) @ canonical_to_stored

  def to_array(self) -> np.ndarray:
    """(3, 3) int32, a row per canonical axis: [stored axis, flipped (0/1), world axis]; the form slice examples
    record."""
    return np.array([[a, int(f), w] for a, f, w in zip(self.axes, self.flips, self.world)], np.int32)

  @classmethod
  def from_array(cls, array: Any) -> Orientation:
    rows = np.asarray(array).astype(int).reshape(3, 3)
    return cls(axes=tuple(rows[:, 0]), flips=tuple(rows[:, 1] != 0), world=tuple(rows[:, 2]))

  def to_dict(self) -> dict[str, Any]:
    return {"axes": list(self.axes), "flips": list(self.flips), "world": list(self.world)}

  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> Orientation:
    return cls(axes=tuple(values["axes"]), flips=tuple(values["flips"]), world=tuple(values["world"]))

  def describe(self) -> str:
    """One line for logs and records, e.g. "slices along stored axis 2 (S, axial), in-plane axes 0 (R), 1 (A)"."""
    letters = [WORLD_LETTERS[w] for w in self.world]
    text = (f"slices along stored axis {self.axes[2]} ({letters[2]}, {PLANES[self.world[2]]}), in-plane axes "
            f"{self.axes[0]} ({letters[0]}), {self.axes[1]} ({letters[1]})")
    flipped = [str(self.axes[i]) for i in range(3) if self.flips[i]]
    if flipped:
      text += f"; stored axis {', '.join(flipped)} reversed" if len(flipped) == 1 else \
          f"; stored axes {', '.join(flipped)} reversed"
    return text


IDENTITY = Orientation()


def voxel_world_axes(affine: np.ndarray) -> np.ndarray:
  """nibabel's `io_orientation`: per voxel axis, [closest world axis, +1/-1]; ValueError for a degenerate affine."""
  from nibabel.orientations import io_orientation

  affine = np.asarray(affine, np.float64)
  if affine.shape != (4, 4) or not np.isfinite(affine).all():
    raise ValueError(f"affine must be a finite 4x4 matrix, got {affine.tolist()}")
  ornt = io_orientation(affine)
  if not np.isfinite(ornt).all():
    raise ValueError("the affine does not give every voxel axis a direction (a zero or collinear column)")
  return ornt.astype(int)


def through_plane_axis(spacing: Sequence[float], ornt: np.ndarray) -> int:
  """The stored voxel axis slices are stacked along: the clearly thickest one, else the one closest to S/I."""
  spacing = [float(s) for s in spacing]
  if len(spacing) != 3 or not all(np.isfinite(s) and s > 0 for s in spacing):
    raise ValueError(f"voxel spacing must be three positive numbers, got {tuple(spacing)}")
  order = np.argsort(spacing, kind="stable")
  if spacing[order[2]] >= THICK_SLICE_RATIO * spacing[order[1]]:
    return int(order[2])
  return int(np.flatnonzero(ornt[:, 0] == 2)[0])


def choose_orientation(affine: np.ndarray, spacing: Sequence[float]) -> Orientation:
  """The canonical order of a volume with this affine (voxel -> world mm) and voxel spacing (mm per stored axis)."""
  ornt = voxel_world_axes(affine)
  slice_axis = through_plane_axis(spacing, ornt)
  in_plane = sorted((a for a in range(3) if a != slice_axis), key=lambda a: ornt[a, 0])
  axes = (*in_plane, slice_axis)
  return Orientation(axes=axes, flips=tuple(bool(ornt[a, 1] < 0) for a in axes),
                     world=tuple(int(ornt[a, 0]) for a in axes))


def orientation_of(affine: np.ndarray, spacing: Sequence[float], where: Any) -> Orientation:
  """`choose_orientation` for a file's header: a degenerate affine is a one-line DataError naming `where`."""
  from autosam_jax.data.errors import DataError

  try:
    return choose_orientation(affine, spacing)
  except ValueError as err:
    raise DataError(f"{where}: {err}; fix the affine (sform/qform) in the header") from None


PLANE_ANGLE_DEGREES = 45.0  # slice planes further apart than this are different acquisition planes


def slice_normal(affine: np.ndarray, orientation: Orientation) -> np.ndarray:
  """The unit world direction the slices are stacked along (the normal of the in-plane axes' plane)."""
  columns = np.asarray(affine, np.float64)[:3, :3]
  normal = np.cross(columns[:, orientation.axes[0]], columns[:, orientation.axes[1]])
  return normal / np.linalg.norm(normal)


def plane_disagreement(normals: Mapping[str, np.ndarray], limit: int = 5) -> str | None:
  """A warning naming the cases when their slice planes (`normals`: {case id: world unit normal}) fall into more than
  one group of planes within PLANE_ANGLE_DEGREES of each other (e.g. axial and coronal scans in one dataset), else
  None: a 2D model learns the planes of the majority and segments the others in planes it rarely saw. Oblique planes
  that differ by a few degrees (one anatomical view, such as a cardiac short axis, planned per patient) agree."""
  normals = {str(case_id): np.asarray(normal, np.float64) for case_id, normal in normals.items()}
  groups = _plane_groups(normals)  # the groups `choose_dataset_orientations` takes a reference frame in
  if len(groups) < 2:
    return None
  groups.sort(key=lambda group: -len(group))
  parts = []
  for cases in groups:
    axis = int(np.argmax(np.abs(normals[cases[0]])))
    shown = ", ".join(sorted(cases)[:limit]) + (" ..." if len(cases) > limit else "")
    parts.append(f"{len(cases)} with slices stacked along {WORLD_AXES[axis]} ({PLANES[axis]}-like: {shown})")
  return (f"cases are cut in planes more than {PLANE_ANGLE_DEGREES:g} degrees apart: " + "; ".join(parts) +
          "; a 2D model trained on one plane segments the others poorly: keep one acquisition plane per dataset")


# A case whose in-plane axes still point further than this from its dataset's reference frame, after the nearest
# permutation and flip, is named in a warning: its slices show the anatomy turned that far from the others'.
REFERENCE_DISAGREEMENT_DEGREES = 30.0
MAX_REFERENCE_CANDIDATES = 256


def world_frame(affine: np.ndarray, orientation: Orientation) -> np.ndarray:
  """(3, 3): column i is the unit world direction canonical axis i runs along (towards increasing canonical index)."""
  columns = np.asarray(affine, np.float64)[:3, :3]
  frame = np.stack([columns[:, a] * (-1.0 if f else 1.0) for a, f in zip(orientation.axes, orientation.flips)], axis=1)
  return frame / np.linalg.norm(frame, axis=0, keepdims=True)


def _in_plane_candidates(slice_axis: int) -> list[tuple[tuple[int, int], tuple[bool, bool]]]:
  """The 8 ways to order and flip the two in-plane stored axes: ((first, second), (flip first, flip second))."""
  in_plane = [a for a in range(3) if a != slice_axis]
  return [(order, flips) for order in (tuple(in_plane), tuple(in_plane[::-1]))
          for flips in itertools.product((False, True), repeat=2)]


def _candidate_frames(affine: np.ndarray, slice_axis: int) -> np.ndarray:
  """(8, 3, 2) world directions of the in-plane axes under each of `_in_plane_candidates`."""
  columns = np.asarray(affine, np.float64)[:3, :3]
  columns = columns / np.linalg.norm(columns, axis=0, keepdims=True)
  return np.stack([np.stack([columns[:, a] * (-1.0 if f else 1.0) for a, f in zip(order, flips)], axis=1)
                   for order, flips in _in_plane_candidates(slice_axis)])


def align_orientation(affine: np.ndarray, spacing: Sequence[float], reference: Mapping[str, Any],
                      own: Orientation | None = None) -> Orientation:
  """The orientation of a volume cut like its dataset: its own through-plane axis, then the order and flips of the
  stored axes whose world directions are nearest to the reference frame's (`reference`: {"frame": (3, 3) world
  directions of the canonical axes, "world": the reference orientation's world axes})."""
  own = own or choose_orientation(affine, spacing)  # `own`: the volume's own choice, when the caller has it
  frame = np.asarray(reference["frame"], np.float64)
  slice_axis = own.slice_axis
  scores = np.einsum("kdi,di->k", _candidate_frames(affine, slice_axis), frame[:, :2])
  (first, second), (flip_first, flip_second) = _in_plane_candidates(slice_axis)[int(np.argmax(scores))]
  columns = np.asarray(affine, np.float64)[:3, :3]
  flip_slice = bool(columns[:, slice_axis] @ frame[:, 2] < 0)
  return Orientation(axes=(first, second, slice_axis), flips=(flip_first, flip_second, flip_slice),
                     world=tuple(int(w) for w in reference["world"]))


def frame_disagreement_degrees(affine: np.ndarray, orientation: Orientation, reference: Mapping[str, Any]) -> float:
  """The largest angle between an in-plane canonical axis of this volume and the reference's same axis."""
  frame = world_frame(affine, orientation)
  reference_frame = np.asarray(reference["frame"], np.float64)
  cosines = np.clip(np.sum(frame[:, :2] * reference_frame[:, :2], axis=0), -1.0, 1.0)
  return float(np.degrees(np.arccos(cosines)).max())


@dataclasses.dataclass(frozen=True)
class DatasetOrientation:
  """How a dataset's cases are cut: each case's orientation, the reference frames they were aligned to (one per
  acquisition plane, JSON-ready: {"case", "frame", "world", "cases"}) and warnings naming the cases that disagree."""
  orientations: dict[str, Orientation]
  references: list[dict[str, Any]]
  warnings: list[str]


def _plane_groups(normals: Mapping[str, np.ndarray]) -> list[list[str]]:
  """Case ids grouped by slice plane: each joins the first group whose first member's plane is within
  PLANE_ANGLE_DEGREES of its own (the groups `plane_disagreement` names)."""
  limit_cos = np.cos(np.deg2rad(PLANE_ANGLE_DEGREES))
  groups: list[list[str]] = []
  for case_id in sorted(normals):
    for members in groups:
      if abs(float(normals[members[0]] @ normals[case_id])) >= limit_cos:
        members.append(case_id)
        break
    else:
      groups.append([case_id])
  return groups


def choose_dataset_orientations(geometries: Mapping[str, tuple[np.ndarray, Sequence[float]]],
                                wheres: Mapping[str, Any] | None = None, limit: int = 5) -> DatasetOrientation:
  """One frame per dataset: `geometries` {case id: (affine, spacing)}; `wheres` {case id: file} names a degenerate
  affine's file in its error. Per plane group, the reference is the case whose own frame (`choose_orientation`) the
  group agrees with best (the largest sum over cases of the best alignment score, ties to the first case id); every
  case then takes `align_orientation` to it. Deterministic: the result depends only on the geometries."""
  wheres = wheres or {}
  own = {case_id: orientation_of(affine, spacing, wheres.get(case_id, case_id))
         for case_id, (affine, spacing) in geometries.items()}
  normals = {case_id: world_frame(geometries[case_id][0], own[case_id])[:, 2] for case_id in own}
  orientations: dict[str, Orientation] = {}
  references, warnings = [], []
  for members in _plane_groups(normals):
    candidates = np.stack([_candidate_frames(geometries[c][0], own[c].slice_axis) for c in members])  # (n, 8, 3, 2)
    # References are looked for among at most MAX_REFERENCE_CANDIDATES cases (evenly spread in case-id order), so a
    # dataset of thousands of cases costs (cases x that) comparisons, not cases squared.
    options = members[::-(-len(members) // MAX_REFERENCE_CANDIDATES)]
    frames = np.stack([world_frame(geometries[c][0], own[c])[:, :2] for c in options])  # (m, 3, 2)
    agreement = np.einsum("nkdi,mdi->nmk", candidates, frames).max(axis=2).sum(axis=0)  # (m,)
    chosen = options[int(np.argmax(agreement))]
    reference = {"case": chosen, "frame": world_frame(geometries[chosen][0], own[chosen]).tolist(),
                 "world": list(own[chosen].world), "cases": len(members)}
    references.append(reference)
    far = []
    for case_id in members:
      affine, spacing = geometries[case_id]
      orientations[case_id] = align_orientation(affine, spacing, reference, own[case_id])
      degrees = frame_disagreement_degrees(affine, orientations[case_id], reference)
      if degrees > REFERENCE_DISAGREEMENT_DEGREES:
        far.append(f"{case_id} ({degrees:.0f} degrees)")
    if far:
      shown = ", ".join(far[:limit]) + (" ..." if len(far) > limit else "")
      warnings.append(f"{len(far)} case(s) have in-plane axes more than {REFERENCE_DISAGREEMENT_DEGREES:g} degrees "
                      f"from the dataset's reference frame (case {chosen}) even after the nearest reordering: "
                      f"{shown}; their slices show the anatomy turned against the others': check their planning "
                      "or headers")
  return DatasetOrientation(orientations=orientations, references=references, warnings=warnings)


def reference_for(references: Sequence[Mapping[str, Any]], affine: np.ndarray, spacing: Sequence[float],
                  own: Orientation | None = None) -> Mapping[str, Any] | None:
  """The recorded reference whose slice plane is nearest to a new volume's (None when there is none within
  PLANE_ANGLE_DEGREES: the volume is cut in its own frame)."""
  own = own or choose_orientation(affine, spacing)
  normal = world_frame(affine, own)[:, 2]
  best, best_cos = None, np.cos(np.deg2rad(PLANE_ANGLE_DEGREES))
  for reference in references:
    cosine = abs(float(np.asarray(reference["frame"], np.float64)[:, 2] @ normal))
    if cosine >= best_cos:
      best, best_cos = reference, cosine
  return best


def orientation_for(affine: np.ndarray, spacing: Sequence[float], references: Sequence[Mapping[str, Any]] | None,
                    where: Any) -> Orientation:
  """How a new scan is cut: aligned to the recorded reference of its plane (`reference_for`), else in its own frame
  (`orientation_of`; also for models that record no references)."""
  own = orientation_of(affine, spacing, where)
  reference = reference_for(references or [], affine, spacing, own)
  return own if reference is None else align_orientation(affine, spacing, reference, own)
