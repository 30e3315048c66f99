"""Are two result folders the same count? (not a test) The check behind "the same files" in docs/performance.md.

    python benchmarks/same_results.py NEW_FOLDER REFERENCE_FOLDER

File by file, a file is the same when its bytes are, or else by these checks (which say how it differs):
- *.ome.tif: every pyramid level's pixels, dtype and shape equal, the same TIFF tags (compression, tiles,
  resolution) and OME-XML but for its UUID (new on every write): the codec's bytes may differ;
- cells.geojson(.gz): the same features in the same order, ids and properties equal, each geometry the same
  JSON or the same polygon rings after shapely.normalize (the same corners; a ring may start elsewhere);
- *.csv: the same rows in the columns both files have (a column only one has is listed);
- *.png: the same pixels;
- summary.json, run.json: equal but for run times ("seconds") and keys only one has (listed);
- report.html: not compared (it holds run times).
Exits 1 when some file differs otherwise.
"""

from __future__ import annotations

import csv
import gzip
import json
import re
import sys
from pathlib import Path


def tiff(a: Path, b: Path) -> str | None:
    import numpy as np
    import tifffile

    with tifffile.TiffFile(a) as ta, tifffile.TiffFile(b) as tb:
        la, lb = ta.series[0].levels, tb.series[0].levels
        if len(la) != len(lb):
            return f"{len(la)} pyramid levels against {len(lb)}"
        for k, (x, y) in enumerate(zip(la, lb)):
            if x.shape != y.shape or x.dtype != y.dtype or not np.array_equal(x.asarray(), y.asarray()):
                return f"level {k} differs"
        skip = {"TileOffsets", "TileByteCounts", "ImageDescription", "SubIFDs"}
        for pa, pb in zip(ta.pages, tb.pages):
            tags_a = {t.name: t.value for t in pa.tags.values() if t.name not in skip}
            tags_b = {t.name: t.value for t in pb.tags.values() if t.name not in skip}
            if tags_a != tags_b:
                return f"TIFF tags differ: {sorted(k for k in tags_a if tags_a[k] != tags_b.get(k))}"

        def ome(t):
            return re.sub(r'UUID="[^"]*"', "", t.pages[0].description)
        if ome(ta) != ome(tb):
            return "OME-XML differs"
    return None


def geojson(a: Path, b: Path) -> str | None:
    import shapely

    def load(p: Path):
        with (gzip.open if p.suffix == ".gz" else open)(p, "rt", encoding="utf-8") as fh:
            return json.load(fh)["features"]
    fa, fb = load(a), load(b)
    if len(fa) != len(fb):
        return f"{len(fa)} features against {len(fb)}"
    normalised = 0
    for x, y in zip(fa, fb):
        if x == y:
            continue
        if x["id"] != y["id"] or x["properties"] != y["properties"] or x.keys() != y.keys():
            return f"feature {x['id']} differs beyond its geometry"
        for key in ("geometry", "nucleusGeometry"):
            if key in x and x[key] != y[key]:
                gx, gy = (shapely.normalize(shapely.geometry.shape(g[key])) for g in (x, y))
                if not shapely.equals_exact(gx, gy, 0):
                    return f"feature {x['id']}: {key} is another polygon"
        normalised += 1
    return f"same: {len(fa)} features, {normalised} of them equal after shapely.normalize" if normalised else None


def table(a: Path, b: Path) -> str | None:
    with open(a, newline="", encoding="utf-8") as fa, open(b, newline="", encoding="utf-8") as fb:
        ra, rb = list(csv.DictReader(fa)), list(csv.DictReader(fb))
    if len(ra) != len(rb):
        return f"{len(ra)} rows against {len(rb)}"
    ca, cb = (list(r[0]) if r else [] for r in (ra, rb))
    shared = [c for c in ca if c in cb]
    if any(x[c] != y[c] for x, y in zip(ra, rb) for c in shared):
        return "rows differ"
    only = sorted(set(ca) ^ set(cb))
    return f"same: {len(ra)} rows in the {len(shared)} shared columns; only in one: {only}"


def png(a: Path, b: Path) -> str | None:
    import numpy as np
    from PIL import Image
    x, y = np.asarray(Image.open(a)), np.asarray(Image.open(b))
    return None if x.shape == y.shape and np.array_equal(x, y) else "pixels differ"


def record(a: Path, b: Path) -> str | None:
    ra, rb = (json.loads(p.read_text(encoding="utf-8")) for p in (a, b))
    diffs, only = [], []

    def walk(x, y, path):
        if isinstance(x, dict) and isinstance(y, dict):
            for k in sorted(set(x) | set(y)):
                if k == "seconds":
                    continue
                if (k in x) != (k in y):
                    only.append(f"{path}{k}")
                else:
                    walk(x[k], y[k], f"{path}{k}.")
        elif x != y:
            diffs.append(path.rstrip("."))
    walk(ra, rb, "")
    if diffs:
        return f"differs at {diffs[:5]}"
    return f"same but for run times; only in one: {only}" if only else None


def compare(new: Path, ref: Path) -> bool:
    same = True
    for f in sorted(ref.iterdir()):
        if f.name.startswith("."):
            continue
        g = new / f.name
        if not g.exists():
            print(f"MISSING {f.name}")
            same = False
            continue
        if f.read_bytes() == g.read_bytes():
            print(f"same    {f.name} (bytes)")
            continue
        check = (tiff if f.name.endswith(".tif") else geojson if ".geojson" in f.name else table
                 if f.suffix == ".csv" else png if f.suffix == ".png" else record if f.suffix == ".json" else None)
        if check is None:
            print(f"skipped {f.name} (not compared)")
            continue
        why = check(g, f)
        ok = why is None or why.startswith("same")
        same &= ok
        print(f"{'same   ' if ok else 'DIFFERS'} {f.name}: {why or 'by its check'}")
    return same


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    sys.exit(0 if compare(Path(sys.argv[1]), Path(sys.argv[2])) else 1)
