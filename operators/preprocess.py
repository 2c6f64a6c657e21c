"""Line crops to model-size line images, as the checkpoint's image processor would make them.

Pure numpy and PIL, so the CPU stages that cut and resize crops never load torch or transformers
(a worker that imports them spends seconds before its first page). Only
:meth:`LinePreprocessor.to_pixel_values`, which runs next to the model, needs torch, and imports it
when called.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from operators.errors import ModelLoadError

if TYPE_CHECKING:
    import torch

#: Extra preprocessor_config.json key: resize keeping the aspect ratio and pad right with white.
#: transformers ignores it (its own processor stretches); LinePreprocessor reads it. Absent = stretch.
KEEP_ASPECT_KEY = "trocr_pipeline_keep_aspect"
#: Extra key for keep-aspect models: lines are stretched this much wider than their aspect before they
#: are fitted, so a glyph spans more encoder patches. Absent = 1.0 (no stretch).
WIDTH_SCALE_KEY = "trocr_pipeline_width_scale"
BACKGROUND = 255


@dataclass(frozen=True)
class LinePreprocessor:
    """8-bit grayscale line crops -> model input, reproducing the checkpoint's image processor exactly."""

    input_size: tuple[int, int]  # (height, width) the encoder sees
    resize_size: tuple[int, int]  # (height, width) before a centre crop; equals input_size without one
    resample: Image.Resampling
    keep_aspect: bool
    rescale_factor: float | None
    image_mean: tuple[float, float, float] | None
    image_std: tuple[float, float, float] | None
    width_scale: float = 1.0

    @property
    def max_aspect(self) -> float:
        """The widest line (width / height) that fits the input without being shrunk."""
        return self.input_size[1] / (self.input_size[0] * self.width_scale)

    @classmethod
    def from_image_processor(cls, image_processor: Any) -> "LinePreprocessor":
        """Read the processor's settings; raise ModelLoadError for any step this class does not reproduce."""
        name = type(image_processor).__name__
        if not getattr(image_processor, "do_resize", False):
            raise ModelLoadError(f"{name}: do_resize is off, so line crops would keep their own sizes; unsupported")
        if getattr(image_processor, "do_pad", False):
            raise ModelLoadError(f"{name}: do_pad is not supported")
        resize_size = _height_width(image_processor.size, name, "size")
        input_size = resize_size
        keep_aspect = bool(getattr(image_processor, KEEP_ASPECT_KEY, False))
        if getattr(image_processor, "do_center_crop", False):
            input_size = _height_width(image_processor.crop_size, name, "crop_size")
            if input_size[0] > resize_size[0] or input_size[1] > resize_size[1]:
                raise ModelLoadError(f"{name}: crop_size {input_size} larger than size {resize_size} is not supported")
            if keep_aspect and input_size != resize_size:
                raise ModelLoadError(f"{name}: {KEEP_ASPECT_KEY} cannot be combined with a centre crop")
        width_scale = float(getattr(image_processor, WIDTH_SCALE_KEY, 1.0))
        if not width_scale > 0:
            raise ModelLoadError(f"{name}: {WIDTH_SCALE_KEY} must be positive, got {width_scale}")
        if width_scale != 1.0 and not keep_aspect:
            raise ModelLoadError(f"{name}: {WIDTH_SCALE_KEY} needs {KEEP_ASPECT_KEY}")
        do_normalize = bool(getattr(image_processor, "do_normalize", False))
        return cls(
            input_size=input_size,
            resize_size=resize_size,
            resample=Image.Resampling(int(image_processor.resample)),
            keep_aspect=keep_aspect,
            rescale_factor=float(image_processor.rescale_factor) if image_processor.do_rescale else None,
            image_mean=_per_channel(image_processor.image_mean) if do_normalize else None,
            image_std=_per_channel(image_processor.image_std) if do_normalize else None,
            width_scale=width_scale,
        )

    def resize(self, crop: np.ndarray) -> np.ndarray:
        """uint8 HxW gray or HxWx3 RGB crop -> uint8 (H, W) or (H, W, 3) at ``input_size``; cheap, CPU only.

        Gray stays one channel (a third of the bytes through the object store); the processor's own
        gray-to-RGB step is the channel expansion in :meth:`to_pixel_values`, which gives the same values.
        """
        image = _to_pil(crop)
        if self.keep_aspect:
            image = self._fit_on_background(image)
        else:
            image = image.resize((self.resize_size[1], self.resize_size[0]), resample=self.resample)
            image = self._center_crop(image)
        return np.asarray(image)

    def to_pixel_values(self, resized: Sequence[np.ndarray], device: torch.device | str, dtype: torch.dtype,
                        width_step: int | None = None) -> torch.Tensor:
        """Stack resized crops into (N, 3, H, W), rescale and normalise on ``device``, cast to ``dtype``.

        With ``width_step`` (keep-aspect input only), the batch is cut right of its widest line's last
        non-background column, rounded up to a multiple of ``width_step``: see
        :func:`operators.decoding.encode_lines`.
        """
        import torch  # here, not at the top: the CPU stages resize without ever loading torch

        if len(resized) == 0:
            raise ValueError("to_pixel_values needs at least one resized line image, got none")
        shapes = {self.input_size, (*self.input_size, 3)}
        for index, pixels in enumerate(resized):
            if pixels.shape not in shapes or pixels.dtype != np.uint8 or pixels.shape != resized[0].shape:
                raise ValueError(f"resized line {index} is {pixels.dtype} {pixels.shape}, expected uint8 "
                                 f"{self.input_size} (gray) or {(*self.input_size, 3)} (RGB), all alike")
        stacked = np.stack(resized)
        if width_step is not None:
            if not self.keep_aspect:
                raise ValueError("only keep-aspect line images can be cut to their ink width")
            widest = max(ink_columns(pixels) for pixels in resized)
            stacked = stacked[:, :, :min(-(-max(widest, 1) // width_step) * width_step, stacked.shape[2])]
        batch = torch.from_numpy(np.ascontiguousarray(stacked)).to(device)
        if batch.ndim == 3:
            values = batch.unsqueeze(1).expand(-1, 3, -1, -1).to(torch.float32)
        else:
            values = batch.permute(0, 3, 1, 2).to(torch.float32)
        if self.rescale_factor is not None:
            values = values * self.rescale_factor
        if self.image_mean is not None:
            mean = torch.tensor(self.image_mean, device=values.device).view(1, 3, 1, 1)
            std = torch.tensor(self.image_std, device=values.device).view(1, 3, 1, 1)
            values = (values - mean) / std
        return values.to(dtype).contiguous()

    def _fit_on_background(self, image: Image.Image) -> Image.Image:
        """Scale to fit inside input_size keeping the aspect ratio (times ``width_scale``); left-aligned,
        vertically centred, white around."""
        height, width = self.input_size
        stretched_width = image.width * self.width_scale
        scale = min(height / image.height, width / stretched_width)
        new_width = max(1, min(width, round(stretched_width * scale)))
        new_height = max(1, min(height, round(image.height * scale)))
        canvas = Image.new(image.mode, (width, height), (BACKGROUND,) * len(image.getbands()))
        canvas.paste(image.resize((new_width, new_height), resample=self.resample), (0, (height - new_height) // 2))
        return canvas

    def _center_crop(self, image: Image.Image) -> Image.Image:
        if self.input_size == self.resize_size:
            return image
        top = (self.resize_size[0] - self.input_size[0]) // 2
        left = (self.resize_size[1] - self.input_size[1]) // 2
        return image.crop((left, top, left + self.input_size[1], top + self.input_size[0]))


def ink_columns(resized: np.ndarray) -> int:
    """Columns of a resized keep-aspect line image up to its last one that is not all background."""
    columns = np.flatnonzero((resized != BACKGROUND).reshape(resized.shape[0], resized.shape[1], -1).any(axis=(0, 2)))
    return int(columns[-1]) + 1 if columns.size else 0


def _height_width(size: Any, name: str, key: str) -> tuple[int, int]:
    height, width = _get(size, "height"), _get(size, "width")
    if not height or not width:
        raise ModelLoadError(f"{name}: {key}={size!r} is not a fixed height/width; unsupported")
    return int(height), int(width)


def _get(size: Any, key: str) -> Any:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _per_channel(value: float | Sequence[float]) -> tuple[float, float, float]:
    values = [float(value)] * 3 if np.isscalar(value) else [float(v) for v in value]
    if len(values) != 3:
        raise ModelLoadError(f"image mean/std must have 3 channels, got {value!r}")
    return values[0], values[1], values[2]


def _to_pil(crop: np.ndarray) -> Image.Image:
    if crop.dtype != np.uint8:
        raise ValueError(f"line crop must be uint8, got {crop.dtype}")
    if crop.ndim == 2:
        image = Image.fromarray(crop, mode="L")
    elif crop.ndim == 3 and crop.shape[2] == 3:
        image = Image.fromarray(crop, mode="RGB")
    else:
        raise ValueError(f"line crop must be HxW gray or HxWx3 RGB, got shape {crop.shape}")
    if image.width == 0 or image.height == 0:
        raise ValueError(f"line crop is empty: shape {crop.shape}")
    return image
