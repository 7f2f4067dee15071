"""DINO's multi-crop augmentation: 2 global views plus N small local views of each image.

The student sees all views, the teacher only the global ones, so the student learns "local-to-global"
correspondences: a 16 px corner of a shirt must predict what the teacher says about the whole shirt.
Per-view augmentations follow DINO (BYOL's recipe): flip, colour jitter (p=0.8), grayscale (p=0.2),
Gaussian blur (always on the first global view, 10% on the second, 50% on locals) and solarisation
(20%, second global view only), so the two global views differ in a known, asymmetric way.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from visuray.images import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import torch
    from PIL import Image


def _blur_kernel(size: int) -> int:
    # ~10% of the side (23 px at 224, as in SimCLR), odd, at least 3
    k = max(3, int(0.1 * size))
    return k if k % 2 else k + 1


class MultiCropAugmentation:
    """``__call__(pil_image) -> [global_1, global_2, local_1, ..., local_N]`` normalised float tensors.

    Picklable (torchvision transforms are built lazily in each process that calls it).
    """

    def __init__(
        self,
        global_size: int,
        local_size: int,
        num_local: int,
        global_scale: tuple[float, float] = (0.4, 1.0),
        local_scale: tuple[float, float] = (0.05, 0.4),
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
    ) -> None:
        if num_local < 0:
            raise ValueError(f"num_local must be >= 0, got {num_local}")
        if not global_scale[0] < global_scale[1] or not local_scale[0] < local_scale[1]:
            raise ValueError(f"crop scales must be increasing ranges: {global_scale}, {local_scale}")
        self.global_size = global_size
        self.local_size = local_size
        self.num_local = num_local
        self.global_scale = tuple(global_scale)
        self.local_scale = tuple(local_scale)
        self.mean, self.std = tuple(mean), tuple(std)  # the backbone's own input statistics
        self._views: list[Any] | None = None

    @property
    def num_crops(self) -> int:
        return 2 + self.num_local

    def _build(self) -> list[Any]:
        import torch
        from torchvision.transforms import InterpolationMode, v2

        def view(size: int, scale: tuple[float, float], blur_p: float, solarize_p: float) -> Any:
            steps = [
                v2.PILToTensor(),
                v2.RandomResizedCrop(
                    size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True
                ),
                v2.RandomHorizontalFlip(p=0.5),
                v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=0.8),
                v2.RandomGrayscale(p=0.2),
                v2.RandomApply([v2.GaussianBlur(_blur_kernel(size), sigma=(0.1, 2.0))], p=blur_p),
            ]
            if solarize_p > 0:
                steps.append(v2.RandomSolarize(threshold=128, p=solarize_p))
            steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]
            return v2.Compose(steps)

        first = view(self.global_size, self.global_scale, blur_p=1.0, solarize_p=0.0)
        second = view(self.global_size, self.global_scale, blur_p=0.1, solarize_p=0.2)
        local = view(self.local_size, self.local_scale, blur_p=0.5, solarize_p=0.0)
        return [first, second] + [local] * self.num_local

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        if self._views is None:
            self._views = self._build()
        return [view(image) for view in self._views]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_views": None}

    def batch(self, images: list[Image.Image]) -> list[torch.Tensor]:
        """Crop-major batches: ``[ (B,3,G,G), (B,3,G,G), (B,3,L,L) x N ]``, view ``i`` of every image."""
        import torch

        per_image = [self(img) for img in images]
        return [torch.stack([views[i] for views in per_image]) for i in range(self.num_crops)]
