"""The nuclei recipe's datasets (DSB2018, TNBC, Kromp, NuInsSeg), and a hold-out split that predicts what a new lab sees.

Every dataset folder has one layout (as in the project's training data): `manifest.csv`, `images/<id>.<ext>` and
`labels/<id>.tif` (uint16 instance labels). DSB2018's modality is its `modality_guess` column; TNBC is H&E with the
patient in the file name (`tnbc_<patient>_<n>`); Kromp is DAPI fluorescence with `preparation` and `diagnosis`
columns; NuInsSeg is H&E with an `organ` column (the species is part of it).

Why groups: DSB2018 holds many crops of one acquisition. A split by random images puts near-duplicates of the
training images into validation, and its figures flatter the model (0.85 AP50 on random images, ~0.61 on images of
experiments never seen). So images are grouped by acquisition and whole groups are held out:

- DSB2018 has no experiment column. Images of one experiment share their size, channel count and modality, their
  intensity statistics (background level, bright end, nucleus brightness) and, for stained tissue, their colour,
  and their magnification, seen in the median nucleus area. Within each (modality, height, width, channels) key,
  images are clustered on those statistics (standardised; Ward linkage, cut at ACQUISITION_DISTANCE). Density is
  left out on purpose: it changes from field to field of one experiment, and splitting an experiment would leak it.
  The cut errs towards merging: a group that holds two experiments is still held out whole.
- TNBC: a group is a patient (slide).
- Kromp: a group is a preparation of one diagnosis (e.g. the neuroblastoma touch imprints): the authors' own
  grouping, and what differs from lab to lab (tissue section, touch imprint, cytospin, cells grown on the slide).
- NuInsSeg: a group is an organ of one species (human and mouse apart, as its authors ask).

`holdout_split` then holds out at least `fraction` of the groups of each modality (whole groups), chosen by a
seeded draw whose held-out share of images stays within a sane range. The split (groups, their members and side,
and how it was made) is written into the bundle's split.json.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from cellseg.bundles import GRAY_SUFFIX
from cellseg.errors import CellsegError

# The project's checkout keeps the training data beside the repository (../shared/data); a pack made by
# pack_training_data.py has the same layout.
PROJECT_DATA_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "data"
# dataset name -> its folder under a data root
DATASET_FOLDERS = {"dsb2018": "dsb2018-train", "tnbc": "tnbc-train", "kromp": "kromp-fluo", "nuinsseg": "nuinsseg-he"}

# manifest.csv modality_guess (DSB2018) -> the modality the model card reports
DSB_MODALITIES = {"fluorescence": "fluorescence", "brightfield_color_histology": "stained_tissue",
                  "brightfield_gray": "brightfield_gray"}
TNBC_MODALITY = "he_breast"
# The two later datasets are modalities of their own on the held-out curve, so that the first four columns stay the
# measurement they were for the v1-v3 bundles; their score thresholds are fluorescence's and brightfield's.
KROMP_MODALITY = "fluorescence_kromp"
NUINSSEG_MODALITY = "he_nuinsseg"
# Channels of a manifest without a `channels` column: Kromp's PNGs are 8-bit gray, NuInsSeg's JPEGs RGB.
DATASET_CHANNELS = {"kromp": 1, "nuinsseg": 3}
# How a held-out image is counted (validate_bundle): at its native scale, as the v1-v3 curve was measured, except
# Kromp, whose 63x images hold nuclei of 50-180 px (4-9x the model's): counted with --diameter auto, as a user with
# such an image and no pixel size does (the image carries none).
DATASET_DIAMETER = {"kromp": "auto"}
PROTOCOL_MODALITIES = ("fluorescence", "brightfield")     # what a protocol's `modality` may be
# Which images decide each score threshold of a bundle ([inference.score_threshold_by_modality]): a protocol
# modality's (cellseg.planning.protocol: fluorescence | brightfield), or its gray one (GRAY_SUFFIX), which a count
# takes for a slide whose network input has no colour (cellseg.planning.NetworkInput.gray). Fluorescence is gray
# anyway: its one threshold serves both.
THRESHOLD_KEY = {"fluorescence": "fluorescence", "stained_tissue": "brightfield",
                 "brightfield_gray": "brightfield" + GRAY_SUFFIX, TNBC_MODALITY: "brightfield",
                 KROMP_MODALITY: "fluorescence", NUINSSEG_MODALITY: "brightfield"}
ACQUISITION_DISTANCE = 5.0     # Ward distance (standardised features) at which the clustering tree is cut
GRAY_FEATURES = ("background", "bright_end", "nucleus_brightness", "nucleus_area")
COLOUR_FEATURES = GRAY_FEATURES + ("lab_l", "lab_a", "lab_b")


@dataclass(frozen=True)
class AnnotatedImage:
    """One annotated image of a dataset. `key` ('dataset/image_id') names it in split files."""

    dataset: str
    image_id: str
    modality: str
    image_path: Path
    labels_path: Path
    height: int
    width: int
    channels: int

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.image_id}"


def _manifest(folder: Path, need: set[str]) -> list[dict]:
    path = Path(folder) / "manifest.csv"
    if not path.is_file():
        raise CellsegError(f"expected a dataset folder with manifest.csv, images/ and labels/, found no {path}")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not need <= set(rows[0]):
        raise CellsegError(f"expected {path} to have the columns {sorted(need)}, found "
                           f"{sorted(rows[0]) if rows else 'no rows'}")
    return rows


def image_file(folder: Path, image_id: str) -> Path:
    """The image file of `image_id` in a dataset folder's images/ (PNG, JPEG or TIFF)."""
    for ext in (".png", ".jpg", ".jpeg", ".tif", ".tiff"):
        p = folder / "images" / f"{image_id}{ext}"
        if p.is_file():
            return p
    raise CellsegError(f"expected an image for {image_id} in {folder / 'images'}, found none")


def read_dataset(folder: Path, name: str) -> list[AnnotatedImage]:
    """The images of a dataset folder: name 'dsb2018' (modality from manifest.csv's modality_guess), 'tnbc', 'kromp'
    or 'nuinsseg'."""
    folder = Path(folder)
    if name not in DATASET_FOLDERS:
        raise CellsegError(f"expected a dataset name among {', '.join(DATASET_FOLDERS)}, got {name!r}")
    need = {"image_id", "height", "width"} | ({"channels"} if name not in DATASET_CHANNELS else set()) | \
        {"kromp": {"preparation", "diagnosis"}, "nuinsseg": {"organ"}}.get(name, set())
    out = []
    for row in _manifest(folder, need):
        if name == "dsb2018":
            guess = row.get("modality_guess", "")
            if guess not in DSB_MODALITIES:
                raise CellsegError(f"expected modality_guess one of {sorted(DSB_MODALITIES)} in "
                                   f"{folder / 'manifest.csv'}, found {guess!r} for {row['image_id']}")
            modality = DSB_MODALITIES[guess]
        else:
            modality = {"tnbc": TNBC_MODALITY, "kromp": KROMP_MODALITY, "nuinsseg": NUINSSEG_MODALITY}[name]
        image_id = row["image_id"]
        out.append(AnnotatedImage(name, image_id, modality, image_file(folder, image_id),
                                  folder / "labels" / f"{image_id}.tif", int(row["height"]), int(row["width"]),
                                  int(row.get("channels") or DATASET_CHANNELS[name])))
    return out


def manifest_groups(folder: Path, name: str) -> dict[str, str]:
    """Group name per image key for the datasets whose manifest names the group: Kromp (preparation and diagnosis)
    and NuInsSeg (organ, the species part of its name)."""
    columns = {"kromp": ("preparation", "diagnosis"), "nuinsseg": ("organ",)}[name]
    rows = _manifest(Path(folder), {"image_id", *columns})

    def slug(text: str) -> str:
        return "".join(c if c.isalnum() else "_" for c in text.strip().lower()).strip("_")
    return {f"{name}/{r['image_id']}": f"{name}/" + "-".join(slug(r[c]) for c in columns) for r in rows}


def read_pixels(image: AnnotatedImage) -> tuple[np.ndarray, np.ndarray]:
    """(pixels (H, W, C) with C 1 or 3, labels (H, W) int32, an id a nucleus: separate_shared_ids) of an annotated
    image."""
    import tifffile
    from PIL import Image
    with Image.open(image.image_path) as im:
        pixels = np.asarray(im)
    if pixels.ndim == 2:
        pixels = pixels[..., None]
    pixels = pixels[..., :3]
    labels = tifffile.imread(image.labels_path)
    if image.channels == 1 and pixels.shape[-1] == 3:   # a gray image stored as RGB
        pixels = pixels[..., :1]
    if labels.shape != pixels.shape[:2]:
        raise CellsegError(f"expected labels {image.labels_path} of the image's size {pixels.shape[:2]}, "
                           f"found {labels.shape}")
    return pixels, separate_shared_ids(labels)


# An id whose separate pieces of cellseg's SHARED_LABEL_PX or more have mostly background between them is that many nuclei
SHARED_ID_GAP_BACKGROUND = 0.5


def separate_shared_ids(labels: np.ndarray) -> np.ndarray:
    """`labels` (int32) with every nucleus an id of its own: an id whose separate pieces of SHARED_LABEL_PX px or more
    (cellseg.evaluation.label_pieces, which `cellseg evaluate` warns of) lie apart on background (over
    SHARED_ID_GAP_BACKGROUND of the gap in their convex hull unlabelled) gives its extra pieces new ids; smaller stray
    pieces stay with it.

    Some annotations give one id to nuclei apart from each other: 44 of the 55 ids of Kromp's held-out Wilms tumour
    section (otherspecimen_3: 99 nuclei read so), and an id or two in a few DSB2018 and TNBC images. Read as one, each such
    nucleus the model finds counts as a false one. Not split: a nucleus drawn under another, whose visible parts lie
    on either side of it (most such ids of NuInsSeg): the gap between its parts is the other nucleus, not background."""
    from scipy import ndimage
    from skimage.morphology import convex_hull_image

    from cellseg.evaluation import label_pieces
    out = labels.astype(np.int32, copy=True)
    next_id = int(out.max()) + 1
    for k, box in enumerate(ndimage.find_objects(out)):
        if box is None:
            continue
        mask = out[box] == k + 1
        pieces, nuclei = label_pieces(mask)
        if len(nuclei) < 2:
            continue
        gap = convex_hull_image(mask) & ~mask
        if not gap.any() or (out[box][gap] == 0).mean() <= SHARED_ID_GAP_BACKGROUND:
            continue
        largest = int(np.argmax(np.bincount(pieces.ravel())[1:]))
        for piece in nuclei:
            if piece != largest:
                out[box][pieces == piece + 1] = next_id
                next_id += 1
    return out


def separated_annotations(image):
    """An image's annotated nuclei (cellseg.evaluation.ImageMasks, e.g. from a dataset's annotations.json) with the
    nuclei of a shared id apart (separate_shared_ids): a shared id's mask keeps its largest part, its other nuclei are
    added after the image's own; the others as they were."""
    import pycocotools.mask as mask_utils

    def encoded(mask: np.ndarray) -> dict:
        return mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))

    canvas = np.zeros((image.height, image.width), np.int32)
    for k, rle in enumerate(image.rles, 1):
        canvas[mask_utils.decode(rle) > 0] = k
    separated = separate_shared_ids(canvas)
    extra = np.unique(separated[separated > len(image.rles)])
    if not len(extra):
        return image
    rles = list(image.rles)
    for k in np.unique(canvas[np.isin(separated, extra)]):
        rles[k - 1] = encoded(separated == k)
    rles += [encoded(separated == k) for k in extra]
    xywh = np.asarray(mask_utils.toBbox(rles), dtype=np.float64).round().astype(np.int64)
    boxes = np.stack([xywh[:, 1], xywh[:, 0], xywh[:, 1] + xywh[:, 3], xywh[:, 0] + xywh[:, 2]], axis=1)
    return replace(image, rles=rles, boxes=boxes, scores=np.concatenate([image.scores, np.ones(len(extra))]),
                   iscrowd=np.concatenate([image.iscrowd, np.zeros(len(extra), bool)]))


def acquisition_features(pixels: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    """What tells acquisitions apart (module docstring): intensity statistics, nucleus size, colour."""
    gray = pixels.astype(np.float32).mean(-1)
    nuclei = labels > 0
    areas = np.bincount(labels.ravel())[1:]
    areas = areas[areas > 0]
    background = gray[~nuclei] if (~nuclei).any() else gray.ravel()
    features = {
        "background": float(background.mean()),
        "bright_end": float(np.percentile(gray, 99)),
        "nucleus_brightness": float(gray[nuclei].mean()) if nuclei.any() else float(gray.mean()),
        "nucleus_area": float(np.median(areas)) if areas.size else 0.0,
    }
    if pixels.shape[-1] == 3:
        from skimage.color import rgb2lab
        lab = rgb2lab(pixels[..., :3]).reshape(-1, 3).mean(0)
        features.update(lab_l=float(lab[0]), lab_a=float(lab[1]), lab_b=float(lab[2]))
    return features


def _feature_matrix(rows: list[dict[str, float]], names: tuple[str, ...]) -> np.ndarray:
    x = np.array([[r.get(n, 0.0) for n in names] for r in rows], np.float64)
    logged = [i for i, n in enumerate(names) if not n.startswith("lab_")]   # intensities and areas: ratios matter
    x[:, logged] = np.log1p(np.maximum(x[:, logged], 0))
    return x


def acquisition_groups(images: list[AnnotatedImage], features: dict[str, dict[str, float]],
                       distance: float = ACQUISITION_DISTANCE) -> dict[str, str]:
    """Group name per image key: images of one (modality, size, channels) key clustered on their features.

    features: image key -> acquisition_features. Features are standardised over all images given, so one cut
    distance means the same spread in every key.
    """
    from scipy.cluster.hierarchy import fcluster, linkage
    everything = _feature_matrix([features[im.key] for im in images], COLOUR_FEATURES)
    mean, std = everything.mean(0), everything.std(0) + 1e-9
    by_key: dict[tuple, list[AnnotatedImage]] = {}
    for im in images:
        by_key.setdefault((im.dataset, im.modality, im.height, im.width, im.channels), []).append(im)
    groups = {}
    for (dataset, modality, h, w, c), members in sorted(by_key.items()):
        names = COLOUR_FEATURES if c == 3 else GRAY_FEATURES
        cols = [COLOUR_FEATURES.index(n) for n in names]
        x = ((_feature_matrix([features[m.key] for m in members], COLOUR_FEATURES) - mean) / std)[:, cols]
        cluster = (np.ones(len(members), int) if len(members) < 2
                   else fcluster(linkage(x, "ward"), distance, "distance"))
        # Number clusters by their first member's position (sorted ids): names do not depend on scipy's numbering.
        order = {}
        for m, k in sorted(zip(members, cluster), key=lambda mk: mk[0].image_id):
            order.setdefault(k, len(order) + 1)
        for m, k in zip(members, cluster):
            groups[m.key] = f"{dataset}/{modality}-{h}x{w}x{c}-{order[k]}"
    return groups


def patient_groups(images: list[AnnotatedImage]) -> dict[str, str]:
    """TNBC: the patient (slide) is the group; ids are tnbc_<patient>_<n>."""
    groups = {}
    for im in images:
        parts = im.image_id.split("_")
        if len(parts) < 3:
            raise CellsegError(f"expected TNBC image ids tnbc_<patient>_<n>, found {im.image_id!r}")
        groups[im.key] = f"{im.dataset}/patient-{parts[1]}"
    return groups


@dataclass
class Split:
    """Which images train and which are held out, by whole groups. `groups`: group -> (modality, side, keys).

    `seen`: held-out images that an earlier training stage of the lineage trained on (its own split drew them
    differently). They stay held out, so that figures compare with that stage's, but they are not images no stage
    saw: validate_bundle leaves them out of its "_unseen" figures without being told (`--seen`).
    """

    train: list[str]
    val: list[str]
    groups: dict[str, dict]
    method: str
    seen: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"method": self.method, "train": self.train, "val": self.val, "groups": self.groups,
                **({"seen": self.seen} if self.seen else {})}

    @classmethod
    def from_json(cls, d: dict) -> Split:
        if not isinstance(d, dict) or not {"train", "val", "groups"} <= set(d):
            raise CellsegError("expected a split file with 'train', 'val' and 'groups' (a group hold-out split), "
                               f"found keys {sorted(d) if isinstance(d, dict) else type(d).__name__}")
        split = cls(list(d["train"]), list(d["val"]), dict(d["groups"]), str(d.get("method", "")),
                    list(d.get("seen", [])))
        split.check()
        return split

    def with_seen(self, seen: set[str]) -> Split:
        """This split recording, as `seen`, its held-out images that `seen` (seen_images of an earlier stage's
        splits) lists."""
        split = replace(self, seen=sorted((set(self.seen) | seen) & set(self.val)))
        split.check()
        return split

    def check(self) -> None:
        """No image on both sides, no group with members on both sides, and `seen` among the held-out images."""
        both = set(self.train) & set(self.val)
        if both:
            raise CellsegError(f"expected no image on both sides of the split, found {len(both)} (e.g. {min(both)})")
        stray = set(self.seen) - set(self.val)
        if stray:
            raise CellsegError(f"expected the 'seen' images among the held-out ones, found {len(stray)} that are not "
                               f"(e.g. {min(stray)})")
        side = {k: "train" for k in self.train} | {k: "val" for k in self.val}
        for name, g in self.groups.items():
            sides = {side.get(k) for k in g["images"]}
            if len(sides) != 1 or sides != {g["side"]}:
                raise CellsegError(f"expected every image of group {name} on its side {g['side']!r}, found "
                                   f"{sorted(map(str, sides))}")

    def modality_of(self) -> dict[str, str]:
        return {k: g["modality"] for g in self.groups.values() for k in g["images"]}

    def train_on_seen(self, seen: set[str], modality: str) -> Split:
        """This split with the held-out images of `modality` that an earlier training stage of the same lineage
        already trained on (`seen`, see seen_images) moved to the training side.

        For a fine-tune that must win back what its lineage knew and forgot: the images any stage of the lineage
        trained on stay the same, so figures on the images no stage saw stay honest. A held-out group that is
        partly seen becomes two: GROUP-seen (training) and GROUP (held out, the unseen rest)."""
        groups, moved = {}, []
        for name, g in self.groups.items():
            taken = [k for k in g["images"] if k in seen] if g["side"] == "val" and g["modality"] == modality else []
            rest = [k for k in g["images"] if k not in taken]
            if taken:
                groups[f"{name}-seen"] = {**g, "side": "train", "images": taken}
                moved += taken
            if rest:
                groups[name] = {**g, "images": rest}
        if not moved:
            raise CellsegError(f"expected held-out {modality} images that the seen split trained on, found none "
                               f"(held out: {sum(1 for k, m in self.modality_of().items() if m == modality and k in self.val)})")
        method = (f"{self.method} Then the {len(moved)} held-out {modality} images that an earlier training stage of "
                  "this lineage trained on were moved to the training side (Split.train_on_seen).")
        split = Split(self.train + moved, [k for k in self.val if k not in set(moved)], groups, method.strip(),
                      [k for k in self.seen if k not in set(moved)])
        split.check()
        return split


def seen_images(split_files: list[Path]) -> set[str]:
    """Image keys ('dataset/id') that a training stage used: the "train" list of each split file (an old
    random-image split lists bare DSB2018 ids), and its "seen" list (held-out images an earlier stage trained on)."""
    seen = set()
    for path in split_files:
        d = json.loads(Path(path).read_text())
        for k in d["train"] + d.get("seen", []):
            seen.add(k if "/" in k else f"dsb2018/{k}")
    return seen


def holdout_split(images: list[AnnotatedImage], groups: dict[str, str], fraction: float = 0.15, seed: int = 0,
                  share_range: tuple[float, float] = (0.08, 0.35), method: str = "") -> Split:
    """Hold out ceil(fraction x groups) whole groups of each modality (at least one).

    The groups are drawn in a seeded random order; among the first 2000 draws the first whose held-out share of
    the modality's images lies in `share_range` is taken (else the draw closest to the range's middle), so one huge
    or tiny group does not swallow or starve validation. A modality with a single group is held out whole: it
    then measures how the model does on an acquisition it never saw at all.
    """
    if not 0 < fraction < 1:
        raise CellsegError(f"expected a hold-out fraction between 0 and 1, got {fraction}")
    rng = np.random.default_rng(seed)
    members: dict[str, list[str]] = {}
    modality_of_group: dict[str, str] = {}
    for im in images:
        g = groups[im.key]
        members.setdefault(g, []).append(im.key)
        if modality_of_group.setdefault(g, im.modality) != im.modality:
            raise CellsegError(f"expected one modality per group, found {g} holding {modality_of_group[g]} and "
                               f"{im.modality}")
    held: set[str] = set()
    for modality in sorted(set(modality_of_group.values())):
        names = sorted(g for g, m in modality_of_group.items() if m == modality)
        n_hold = max(1, math.ceil(fraction * len(names)))
        total = sum(len(members[g]) for g in names)
        best, best_gap = None, math.inf
        for _ in range(2000 if len(names) > n_hold else 1):
            pick = [names[i] for i in rng.permutation(len(names))[:n_hold]]
            share = sum(len(members[g]) for g in pick) / total
            gap = 0.0 if share_range[0] <= share <= share_range[1] else abs(share - sum(share_range) / 2)
            if gap < best_gap:
                best, best_gap = pick, gap
            if gap == 0.0:
                break
        held.update(best)
    table = {g: {"modality": modality_of_group[g], "side": "val" if g in held else "train",
                 "images": sorted(members[g])} for g in sorted(members)}
    split = Split(train=sorted(k for g, t in table.items() if t["side"] == "train" for k in t["images"]),
                  val=sorted(k for g, t in table.items() if t["side"] == "val" for k in t["images"]),
                  groups=table, method=method or (f"whole groups held out: ceil({fraction} x groups) per modality, "
                                                  f"seed {seed}"))
    split.check()
    return split


GROUPING_METHOD = (
    "DSB2018: within each (modality_guess, height, width, channels) key, images clustered on background level, "
    "99th intensity percentile, mean nucleus brightness and median nucleus area (log), plus mean CIELAB colour for "
    "RGB images; features standardised over all images; Ward linkage cut at distance {distance}. TNBC: one group per "
    "patient (slide id in the file name). Hold-out: ceil({fraction} x groups) whole groups per modality, seeded "
    "draw (seed {seed}) with 8-35 % of the modality's images held out; a single-group modality is held out whole.")


def make_split(datasets: dict[str, Path], fraction: float = 0.15, seed: int = 0,
               distance: float = ACQUISITION_DISTANCE, progress: bool = False) -> tuple[Split, list[AnnotatedImage]]:
    """Read the datasets (name -> folder: 'dsb2018', 'tnbc'), group them and hold out whole groups."""
    from tqdm import tqdm
    images: list[AnnotatedImage] = []
    groups: dict[str, str] = {}
    for name, folder in datasets.items():
        found = read_dataset(folder, name)
        images += found
        if name == "tnbc":
            groups.update(patient_groups(found))
        else:
            features = {im.key: acquisition_features(*read_pixels(im))
                        for im in tqdm(found, desc=f"{name} features", disable=not progress)}
            groups.update(acquisition_groups(found, features, distance))
    method = GROUPING_METHOD.format(distance=distance, fraction=fraction, seed=seed)
    return holdout_split(images, groups, fraction, seed, method=method), images


# Kromp's groups held out whole: the dense preparations the model misses (issue 47) that are not its only training
# examples of a kind. Kept for training: the ganglioneuroblastoma tissue sections (10 images, Kromp's only larger set of
# sections), the bone-marrow cytospins and the HaCaT cell lines. Held out: the one neuroblastoma and the one Wilms
# tumour section, the neuroblastoma touch imprints (densest of all) and the neuroblastoma cell-line cytospins.
KROMP_HELD_OUT = ("kromp/tissue_section-neuroblastoma", "kromp/tissue_section-wilms",
                  "kromp/tumor_touch_imprint-neuroblastoma", "kromp/cellline_cytospin-neuroblastoma")


def add_groups(base: Split, images: list[AnnotatedImage], groups: dict[str, str], held: set[str],
               method: str) -> Split:
    """`base` with the groups of further `images` added, those named in `held` held out whole, the others trained
    on. The base split's groups and sides are kept as they are, so the images an earlier bundle held out stay held
    out (its figures stay comparable) and no image changes side."""
    table = dict(base.groups)
    for im in images:
        g = groups[im.key]
        if g in base.groups:
            raise CellsegError(f"expected new groups only, found {g} already in the split")
        entry = table.setdefault(g, {"modality": im.modality, "side": "val" if g in held else "train", "images": []})
        if entry["modality"] != im.modality:
            raise CellsegError(f"expected one modality per group, found {g} holding {entry['modality']} and "
                               f"{im.modality}")
        entry["images"].append(im.key)
    unknown = held - {groups[im.key] for im in images}
    if unknown:
        raise CellsegError(f"expected every group to hold out among the images' groups, found none for "
                           f"{sorted(unknown)}")
    for g in table.values():
        g["images"] = sorted(g["images"])
    new = [im.key for im in images]
    split = Split(train=sorted(base.train + [k for k in new if groups[k] not in held]),
                  val=sorted(base.val + [k for k in new if groups[k] in held]),
                  groups=dict(sorted(table.items())), method=f"{base.method} {method}".strip(), seen=base.seen)
    split.check()
    return split


def extend_with_new_datasets(base: Split, data_root: Path, seed: int = 0, fraction: float = 0.15) -> Split:
    """The base split (e.g. the shipped bundle's split.json) with Kromp and NuInsSeg added: Kromp's KROMP_HELD_OUT
    preparations held out, and ceil(fraction x organs) whole NuInsSeg organs of each species, by holdout_split's
    seeded draw."""
    kromp_folder, nuinsseg_folder = data_root / DATASET_FOLDERS["kromp"], data_root / DATASET_FOLDERS["nuinsseg"]
    kromp, nuinsseg = read_dataset(kromp_folder, "kromp"), read_dataset(nuinsseg_folder, "nuinsseg")
    groups = manifest_groups(kromp_folder, "kromp") | manifest_groups(nuinsseg_folder, "nuinsseg")
    held = set(KROMP_HELD_OUT)
    for species in ("human", "mouse"):
        members = [im for im in nuinsseg if groups[im.key].startswith(f"nuinsseg/{species}_")]
        held.update(g for g, t in holdout_split(members, groups, fraction, seed).groups.items() if t["side"] == "val")
    method = (f"Then Kromp (one group per preparation and diagnosis; held out: {', '.join(KROMP_HELD_OUT)}) and "
              f"NuInsSeg (one group per organ; ceil({fraction} x organs) of each species held out whole by the same "
              f"seeded draw, seed {seed}) were added, the earlier groups unchanged (datasets.extend_with_new_datasets).")
    return add_groups(base, kromp + nuinsseg, groups, held, method)


def main() -> None:
    """python -m references.nuclei.datasets --extend BASE_SPLIT --out NEW_SPLIT [--seen EARLIER_SPLIT ...]: the base
    split with Kromp and NuInsSeg; with --seen, its held-out images that an earlier stage's split trained on recorded
    as "seen"."""
    import argparse
    p = argparse.ArgumentParser(description=main.__doc__)
    p.add_argument("--extend", type=Path, required=True, help="a split.json to extend (e.g. the shipped bundle's)")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data-root", type=Path, default=PROJECT_DATA_ROOT)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seen", type=Path, action="append", default=[],
                   help="a split.json whose 'train' images an earlier stage of the lineage trained on (repeatable)")
    args = p.parse_args()
    if args.out.exists():
        p.error(f"{args.out} exists: not overwritten")
    split = extend_with_new_datasets(Split.from_json(json.loads(args.extend.read_text(encoding="utf-8"))),
                                     args.data_root, args.seed)
    if args.seen:
        split = split.with_seen(seen_images(args.seen))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(split.to_json(), indent=1), encoding="utf-8")
    by = {}
    for g in split.groups.values():
        n = by.setdefault((g["modality"], g["side"]), [0, 0])
        n[0] += 1
        n[1] += len(g["images"])
    for (m, side), (ng, ni) in sorted(by.items()):
        print(f"{m:20s} {side:5s} {ng:3d} groups {ni:4d} images")


if __name__ == "__main__":
    main()
