"""Make clean rendered ink look scanned: geometry, paper, ink, blur, noise, JPEG, binarization.

Every step works on one rendered ink mask (uint8 coverage 0..255, text white on black) and a
``numpy.random.Generator``, so a seed fixes the result. Strengths are modest on purpose: the text
must stay legible, the model is meant to read it with <1% character errors.
"""

from __future__ import annotations

import cv2
import numpy as np

MAX_ROTATION_DEG = 1.5
#: Random margin around a line's ink on each side, in pixels (line detectors crop tight).
LINE_MARGIN_PX = (2, 10)
#: Probability of each degradation being applied to one line.
P_ROTATE = 0.5
P_STRETCH = 0.3
P_SHEAR = 0.2
P_PERSPECTIVE = 0.2
P_INK_WEIGHT = 0.25
P_ILLUMINATION = 0.5
P_TEXTURE = 0.5
P_BLUR = 0.4
P_NOISE = 0.5
P_BITONAL = 0.35
P_JPEG = 0.25


def _require_mask(mask: np.ndarray) -> None:
    if mask.ndim != 2 or mask.dtype != np.uint8:
        raise ValueError(f"ink mask must be a 2-D uint8 array, got shape {mask.shape} dtype {mask.dtype}")
    if not mask.any():
        raise ValueError("ink mask is empty: nothing was rendered")


def random_homography(rng: np.random.Generator, width: int, height: int, max_rotation_deg: float) -> np.ndarray:
    """A small rotation, stretch, shear and perspective about the mask centre, as a 3x3 matrix."""
    centre = np.array([[1, 0, -width / 2], [0, 1, -height / 2], [0, 0, 1]], dtype=np.float64)
    angle = np.deg2rad(rng.uniform(-max_rotation_deg, max_rotation_deg)) if rng.random() < P_ROTATE else 0.0
    rotate = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    sx = rng.uniform(0.9, 1.1) if rng.random() < P_STRETCH else 1.0
    sy = rng.uniform(0.95, 1.05) if rng.random() < P_STRETCH else 1.0
    shear = rng.uniform(-0.08, 0.08) if rng.random() < P_SHEAR else 0.0
    stretch = np.array([[sx, shear, 0], [0, sy, 0], [0, 0, 1]])
    tilt = rng.uniform(-2e-5, 2e-5, size=2) * (rng.random() < P_PERSPECTIVE)
    perspective = np.array([[1, 0, 0], [0, 1, 0], [tilt[0], tilt[1], 1]])
    return perspective @ rotate @ stretch @ centre


def warp_to_fit(mask: np.ndarray, homography: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
    """Apply ``homography`` on a canvas just large enough to hold the whole warped mask.

    Returns the canvas and the (x, y) its top-left corner has in the homography's output frame.
    """
    height, width = mask.shape
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64).reshape(-1, 1, 2)
    moved = cv2.perspectiveTransform(corners, homography).reshape(-1, 2)
    low = np.floor(moved.min(axis=0))
    size = np.ceil(moved.max(axis=0) - low).astype(int) + 1
    shift = np.array([[1, 0, -low[0]], [0, 1, -low[1]], [0, 0, 1]])
    warped = cv2.warpPerspective(mask, shift @ homography, (int(size[0]), int(size[1])), flags=cv2.INTER_LINEAR)
    return warped, (int(low[0]), int(low[1]))


def change_ink_weight(mask: np.ndarray, rng: np.random.Generator, font_px: int) -> np.ndarray:
    """Heavier or lighter strokes, like over- or under-inked type; thinning only on large text."""
    kernel = np.ones((2, 2), np.uint8)
    if font_px >= 32 and rng.random() < 0.5:
        return cv2.erode(mask, kernel)
    return cv2.dilate(mask, kernel)


def crop_to_ink(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Tight crop around the ink with an independent random margin on each side (:data:`LINE_MARGIN_PX`), as line
    detectors crop."""
    rows = np.flatnonzero(mask.max(axis=1) > 64)
    cols = np.flatnonzero(mask.max(axis=0) > 64)
    if rows.size == 0:
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    top, bottom, left, right = rng.integers(LINE_MARGIN_PX[0], LINE_MARGIN_PX[1] + 1, size=4)
    padded = cv2.copyMakeBorder(mask, int(top), int(bottom), int(left), int(right), cv2.BORDER_CONSTANT, value=0)
    return padded[rows[0] : rows[-1] + 1 + top + bottom, cols[0] : cols[-1] + 1 + left + right]


def paper(shape: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """Light paper: a base tone, sometimes uneven illumination and a fibre-like low-frequency texture."""
    height, width = shape
    page = np.full(shape, rng.uniform(200, 250), dtype=np.float32)
    if rng.random() < P_ILLUMINATION:
        gx, gy = rng.uniform(-25, 25), rng.uniform(-10, 10)
        ramp_x = np.linspace(-0.5, 0.5, width, dtype=np.float32)[None, :]
        ramp_y = np.linspace(-0.5, 0.5, height, dtype=np.float32)[:, None]
        page += gx * ramp_x + gy * ramp_y
    if rng.random() < P_TEXTURE:
        coarse = rng.normal(0, rng.uniform(2, 8), size=(max(2, height // 6), max(2, width // 6))).astype(np.float32)
        page += cv2.resize(coarse, (width, height), interpolation=cv2.INTER_LINEAR)
    return page


def ink_on_paper(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Blend dark ink into paper by mask coverage; returns float32 grey levels."""
    coverage = mask.astype(np.float32) * (1 / 255)
    background = paper(mask.shape, rng)
    ink = np.float32(rng.uniform(0, 70))
    return background + (ink - background) * coverage


def blur(image: np.ndarray, rng: np.random.Generator, font_px: int) -> np.ndarray:
    """Defocus, weaker on small text so thin strokes survive."""
    sigma = rng.uniform(0.3, 0.4 + 0.7 * font_px / 48)
    return cv2.GaussianBlur(image, (0, 0), sigma)


def add_noise(image: np.ndarray, rng: np.random.Generator, max_sigma: float = 12.0) -> np.ndarray:
    sigma = np.float32(rng.uniform(2, max_sigma))
    return image + sigma * rng.standard_normal(size=image.shape, dtype=np.float32)


def binarize(image: np.ndarray) -> np.ndarray:
    """Otsu threshold to pure black and white, like the binarized UW3 scans."""
    grey = np.clip(image, 0, 255).astype(np.uint8)
    _, bitonal = cv2.threshold(grey, 0, 255, cv2.THRESH_BINARY | cv2.THRESH_OTSU)
    return bitonal


def jpeg_roundtrip(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    ok, encoded = cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(35, 91))])
    if not ok:
        raise RuntimeError("OpenCV failed to JPEG-encode a line image")
    return cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)


def scanned_line(mask: np.ndarray, rng: np.random.Generator, font_px: int) -> np.ndarray:
    """A rendered line mask turned into a tightly cropped, scanned-looking uint8 grey image."""
    _require_mask(mask)
    height, width = mask.shape
    mask, _ = warp_to_fit(mask, random_homography(rng, width, height, MAX_ROTATION_DEG))
    if rng.random() < P_INK_WEIGHT:
        mask = change_ink_weight(mask, rng, font_px)
    image = ink_on_paper(crop_to_ink(mask, rng), rng)
    if rng.random() < P_BLUR:
        image = blur(image, rng, font_px)
    if rng.random() < P_NOISE:
        image = add_noise(image, rng)
    if rng.random() < P_BITONAL:
        return binarize(image)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return jpeg_roundtrip(image, rng) if rng.random() < P_JPEG else image


def augment_scan(gray: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A real scanned line image, varied as another scan of it could be: slant, width, ink, focus, noise.

    Why: a few thousand real lines seen many times would be learned by heart; each time a line is
    drawn it looks a little different, while its text stays legible.
    """
    height, width = gray.shape
    image = gray.astype(np.float32)
    if rng.random() < 0.5:  # slant, stretch and a slight rotation about the middle, white around
        shear, stretch = rng.uniform(-0.15, 0.15), rng.uniform(0.85, 1.15)
        angle = np.deg2rad(rng.uniform(-1.0, 1.0))
        affine = np.array([[stretch * np.cos(angle), shear - np.sin(angle), 0],
                           [np.sin(angle), np.cos(angle), 0]], dtype=np.float64)
        new_width = max(8, int(round(width * stretch + abs(shear) * height)))
        affine[:, 2] = [new_width / 2, height / 2] - affine[:, :2] @ [width / 2, height / 2]
        image = cv2.warpAffine(image, affine, (new_width, height), flags=cv2.INTER_LINEAR,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=255)
    if rng.random() < 0.2:  # dark ink is a minimum: eroding grey levels thickens strokes, dilating thins them
        kernel = np.ones((2, 2), np.uint8)
        image = (cv2.erode if rng.random() < 0.5 else cv2.dilate)(image, kernel)
    if rng.random() < 0.5:  # contrast and paper tone
        image = 255 - (255 - image) * np.float32(rng.uniform(0.6, 1.2)) - np.float32(rng.uniform(-10, 30))
    if rng.random() < P_BLUR:
        image = blur(image, rng, height)
    if rng.random() < P_NOISE:
        image = add_noise(image, rng, max_sigma=8.0)
    image = np.clip(image, 0, 255).astype(np.uint8)
    return jpeg_roundtrip(image, rng) if rng.random() < P_JPEG else image
