"""Real data for the reproduction, prepared offline from Debian packages (or a small sample in the package).

- Machine translation: the verse-aligned English / Spanish Bible, World English Bible (public domain) and
  Reina-Valera 1909 (public domain), exported from Debian's sword-text-web and sword-text-sparv modules with
  diatheke. About 31k verse pairs; a deterministic held-out split by verse (a hash of its reference): 5000
  test and 2500 dev verses, so that about 1000 and 500 remain once the tasks keep only short verses.
- Images: Fashion-MNIST (MIT licence, Zalando Research) from Debian's dataset-fashion-mnist.

``prepare()`` writes them under the data directory ($RMSNORM_DATA, default ~/.cache/rmsnorm/data).
The ``sample`` data set (a few hundred verse pairs and images, shipped in rmsnorm/reproduce/data/, see
LICENSES.md there) serves the smoke preset and the tests on machines without the packages.
"""

from __future__ import annotations

import gzip
import hashlib
import html
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .atomic import atomic_file, atomic_text

if TYPE_CHECKING:
    import numpy as np  # the experiments extra; imported where it is used

APT = "sudo apt-get install sword-text-web sword-text-sparv diatheke dataset-fashion-mnist"
SAMPLE_DIR = Path(__file__).with_name("data")
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
SWORD_MODULES = {"en": "engWEB2015eb", "es": "spaRV1909eb"}
DEV_SIZE, TEST_SIZE = 2500, 5000
# prepared, under data_dir(); the Bible's name carries its split, so that a copy split otherwise is not reused
FILES = {"bible": f"bible.en-es.test{TEST_SIZE}-dev{DEV_SIZE}.tsv", "fashion": "fashion-mnist.npz"}
SAMPLES = {"bible": "bible-sample.en-es.tsv.gz", "fashion": "fashion-sample.npz"}  # shipped, in SAMPLE_DIR


class DataMissing(RuntimeError):
    """Raised with instructions when a data set is neither prepared nor preparable here."""


def data_dir() -> Path:
    return Path(os.environ.get("RMSNORM_DATA", Path.home() / ".cache" / "rmsnorm" / "data"))


# ------------------------------------------------------------------------------------------------ bible

_TAG = re.compile(r"<[^>]+>")
_DROP = re.compile(r"<(title|note)\b[^>]*>.*?</\1>", re.S)
_VERSE = re.compile(r"^\s*(\S.*?) (\d+):(\d+): ?", re.M)


def parse_diatheke(text: str) -> dict[tuple[str, int, int], str]:
    """Verses from diatheke's default ("internal") output: headings and notes dropped, markup stripped."""
    text = _DROP.sub(" ", text)
    text = re.sub(r"\n\(\w+\)\s*$", "", text.strip())  # trailing "(module)" line
    text = html.unescape(_TAG.sub("", text))
    verses: dict[tuple[str, int, int], str] = {}
    marks = list(_VERSE.finditer(text))
    for i, m in enumerate(marks):
        end = marks[i + 1].start() if i + 1 < len(marks) else len(text)
        body = " ".join(text[m.end():end].split())
        if body:
            verses[(m.group(1).strip(), int(m.group(2)), int(m.group(3)))] = body
    return verses


def export_module(module: str) -> str:
    exe = shutil.which("diatheke")
    if exe is None:
        raise DataMissing(f"diatheke is not installed: {APT}")
    out = subprocess.run([exe, "-b", module, "-k", "Genesis 1:1-Revelation 22:21"], capture_output=True,
                         text=True, timeout=600)
    if out.returncode != 0 or len(out.stdout) < 1000:
        raise DataMissing(f"diatheke could not export {module} ({out.stderr.strip()[:200]}): {APT}")
    return out.stdout


def _split_of(key: tuple[str, int, int]) -> float:
    digest = hashlib.sha1(f"{key[0]}|{key[1]}|{key[2]}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def prepare_bible(out: Path) -> Path:
    """Write the Bible's file (split, book, chapter, verse, en, es) from the SWORD modules."""
    en = parse_diatheke(export_module(SWORD_MODULES["en"]))
    es = parse_diatheke(export_module(SWORD_MODULES["es"]))
    keys = [k for k in en if k in es]
    if len(keys) < 20000:
        raise DataMissing(f"only {len(keys)} aligned verses found; are both SWORD modules installed? {APT}")
    ranked = sorted(keys, key=_split_of)
    split = {k: "test" for k in ranked[:TEST_SIZE]}
    split.update({k: "dev" for k in ranked[TEST_SIZE:TEST_SIZE + DEV_SIZE]})
    path = out / FILES["bible"]
    atomic_text(path, "".join(f"{split.get(k, 'train')}\t{k[0]}\t{k[1]}\t{k[2]}\t{en[k]}\t{es[k]}\n"
                                for k in keys))
    return path


@dataclass(frozen=True)
class Parallel:
    src: list[str]
    tgt: list[str]


def load_bible(which: str = "full") -> dict[str, Parallel]:
    """{"train", "dev", "test"} English -> Spanish; ``which="sample"`` reads the shipped sample."""
    path = _path("bible", which)
    opener = gzip.open if path.suffix == ".gz" else open
    parts: dict[str, Parallel] = {s: Parallel([], []) for s in ("train", "dev", "test")}
    with opener(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            split, _b, _c, _v, en, es = line.rstrip("\n").split("\t")
            parts[split].src.append(en)
            parts[split].tgt.append(es)
    return parts


# --------------------------------------------------------------------------------------------- fashion

def _read_idx(path: Path) -> np.ndarray:
    import numpy as np

    with gzip.open(path, "rb") as fh:
        data = fh.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def prepare_fashion(out: Path) -> Path:
    files = {k: FASHION_DIR / f"{k}-ubyte.gz" for k in ("train-images-idx3", "train-labels-idx1",
                                                        "t10k-images-idx3", "t10k-labels-idx1")}
    if not all(p.exists() for p in files.values()):
        raise DataMissing(f"Fashion-MNIST is not installed in {FASHION_DIR}: {APT}")
    arrays = {
        "x_train": _read_idx(files["train-images-idx3"]), "y_train": _read_idx(files["train-labels-idx1"]),
        "x_test": _read_idx(files["t10k-images-idx3"]), "y_test": _read_idx(files["t10k-labels-idx1"]),
    }
    path = out / FILES["fashion"]

    def write(tmp: Path) -> None:
        import numpy as np

        with open(tmp, "wb") as fh:
            np.savez_compressed(fh, **arrays)  # type: ignore[arg-type]  # numpy's stub types **kwds as bool

    atomic_file(path, write)
    return path


def load_fashion(which: str = "full") -> dict[str, np.ndarray]:
    import numpy as np

    with np.load(_path("fashion", which)) as z:
        return {k: z[k] for k in z.files}


# ------------------------------------------------------------------------------------------------ common

def file_name(name: str, which: str) -> str:
    """The name of data set ``name``'s file: the shipped sample's (``which="sample"``), else the prepared one's."""
    return (SAMPLES if which == "sample" else FILES)[name]


def _path(name: str, which: str) -> Path:
    """The file of data set ``name``: the shipped sample (``which="sample"``), else the prepared copy,
    prepared now if it is missing."""
    if which == "sample":
        path = SAMPLE_DIR / file_name(name, which)
        if not path.exists():
            raise DataMissing(f"the shipped sample {path} is missing (broken installation?)")
        return path
    path = data_dir() / file_name(name, which)
    return path if path.exists() else prepare((name,))[name]


def prepare(which: tuple[str, ...] = ("bible", "fashion"), force: bool = False) -> dict[str, Path]:
    """Build the prepared data sets that are missing (or all with ``force``); returns their paths."""
    out = data_dir()
    out.mkdir(parents=True, exist_ok=True)
    builders = {"bible": prepare_bible, "fashion": prepare_fashion}
    done = {}
    for name in FILES:
        if name in which:
            path = out / FILES[name]
            done[name] = path if path.exists() and not force else builders[name](out)
    return done


def status() -> dict[str, str]:
    """Where each data set is, or how to get it."""
    out = {}
    for name, file in FILES.items():
        path = data_dir() / file
        if path.exists():
            out[name] = f"prepared: {path}"
        elif (name == "bible" and shutil.which("diatheke")) or (name == "fashion" and FASHION_DIR.exists()):
            out[name] = "not prepared yet (the Debian packages are installed; `rmsnorm data` prepares it)"
        else:
            out[name] = f"missing: {APT}"
    return out
