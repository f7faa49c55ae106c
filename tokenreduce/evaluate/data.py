"""Loaders for the small real evaluation sets kept outside the repository.

Quality measurements (does token reduction hurt accuracy?) need real data, but the data is not
shipped with the package and must never be downloaded at run time. It lives in a folder beside
the repository (``../shared/data``) or wherever ``TOKENREDUCE_DATA`` points. Every loader takes
the folder as a parameter and raises :class:`DataMissing` when it is absent, so callers (tests,
benchmarks) can skip quality checks with a clear message on a clone without the data.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path

import numpy as np
import torch

ENV_VAR = "TOKENREDUCE_DATA"
STSB_SPLITS = ("dev", "test")
CIFAR10_SPLITS = ("train", "test")

StsPair = tuple[str, str, float]


class DataMissing(Exception):
    """The evaluation data folder, or a file inside it, is not there."""

    def __init__(self, folder: Path | str | None, what: str) -> None:
        self.folder = folder
        self.what = what
        where = (
            f"in data folder {folder}"
            if folder is not None
            else f"(no data folder: set {ENV_VAR} or put the data at <repo>/../shared/data)"
        )
        super().__init__(f"evaluation data missing {where}: {what}")


def default_data_dir() -> Path | None:
    """The evaluation data folder: ``$TOKENREDUCE_DATA`` if set, else ``<repo>/../shared/data``.

    ``<repo>`` is found both from this file's location and from the current directory; the
    first existing candidate wins. Returns None when no candidate exists. An explicitly set
    ``TOKENREDUCE_DATA`` is returned even if it does not exist (loaders then raise DataMissing
    naming it) so that a typo is reported rather than silently ignored.
    """
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env).expanduser()
    repo = Path(__file__).resolve().parents[2]
    for candidate in (repo / ".." / "shared" / "data", Path.cwd() / ".." / "shared" / "data"):
        if candidate.is_dir():
            return candidate.resolve()
    return None


def resolve_data(data_dir: Path | str | None, sub: str) -> Path:
    base = Path(data_dir) if data_dir is not None else default_data_dir()
    if base is None or not base.is_dir():
        raise DataMissing(base, f"folder {sub}/ (data folder itself not found)")
    path = base / sub
    if not path.exists():
        raise DataMissing(base, sub)
    return path


def parse_stsb_file(path: Path | str) -> tuple[list[StsPair], int]:
    """Parse one STS Benchmark file; return ``(pairs, n_skipped)``.

    Lines are tab-separated: genre, file, year, id, score (0-5), sentence1, sentence2 (some
    releases add trailing source columns, which are ignored). Quotes are literal text, hence
    ``QUOTE_NONE``. Lines with too few fields or a score that is not a number in [0, 5] are
    skipped and counted.
    """
    pairs: list[StsPair] = []
    skipped = 0
    with open(path, encoding="utf-8", newline="") as f:
        for row in csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if len(row) < 7:
                skipped += 1
                continue
            try:
                score = float(row[4])
            except ValueError:
                skipped += 1
                continue
            if not 0.0 <= score <= 5.0 or not row[5].strip() or not row[6].strip():
                skipped += 1
                continue
            pairs.append((row[5], row[6], score))
    return pairs, skipped


def load_stsb(
    split: str, data_dir: Path | str | None = None, limit: int | None = None
) -> list[StsPair]:
    """STS Benchmark ``(sentence1, sentence2, gold score 0-5)`` pairs, file order.

    ``split`` is ``"dev"`` (1500 pairs) or ``"test"`` (1379 pairs); ``limit`` keeps the first
    ``limit`` pairs. Use :func:`parse_stsb_file` to also get the malformed-line count.
    """
    if split not in STSB_SPLITS:
        raise ValueError(f"STS-B split must be one of {STSB_SPLITS}, got {split!r}")
    pairs, _ = parse_stsb_file(resolve_data(data_dir, f"stsb/sts-{split}.csv"))
    return pairs[:limit] if limit is not None else pairs


def load_cifar10(
    split: str, data_dir: Path | str | None = None, limit_per_class: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """CIFAR-10 subset from ``cifar10/<split>/<class>/*.jpg``.

    Returns ``(images, labels, class_names)``: images uint8 ``[N, 3, 32, 32]``, labels int64
    ``[N]`` indexing the alphabetically sorted ``class_names``. Classes and files are read in
    sorted order, so the result is deterministic; ``limit_per_class`` keeps the first files.
    """
    from PIL import Image

    if split not in CIFAR10_SPLITS:
        raise ValueError(f"CIFAR-10 split must be one of {CIFAR10_SPLITS}, got {split!r}")
    root = resolve_data(data_dir, f"cifar10/{split}")
    class_names = sorted(p.name for p in root.iterdir() if p.is_dir())
    if not class_names:
        raise DataMissing(root.parent.parent, f"class folders under cifar10/{split}/")
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = sorted((root / name).glob("*.jpg"))
        if limit_per_class is not None:
            files = files[:limit_per_class]
        if not files:
            raise DataMissing(root.parent.parent, f"JPEG files in cifar10/{split}/{name}/")
        for file in files:
            with Image.open(file) as im:
                images.append(np.asarray(im.convert("RGB"), dtype=np.uint8))
            labels.append(label)
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    return batch, torch.tensor(labels, dtype=torch.long), class_names
