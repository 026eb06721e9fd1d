"""The compiled CPU kernels (numba) of ``augment/compiled.py``: crop, flip and a whole policy,
one sample at a time, on uint8 images.

Every kernel repeats the arithmetic of the eager path it replaces, so that its result is the
same to the last bit (``tests/augment/test_compiled_kernels.py``):

- the crop is ``grid_sample``'s bilinear CPU kernel (align_corners=False, border padding) in
  float32, operation for operation: unnormalise ``(g + 1) * (size / 2) - 0.5``, clip, split
  into floor and fraction, the four weights as products of the two distances, and the sum
  ``nw + ne + sw + se`` from the left. torch's AVX2 and AVX-512 builds of that kernel fuse
  the unnormalisation and the three sums into multiply-adds (the compiler contracts them),
  its plain build does not; which one this torch does is measured once
  (``compiled.crop_arithmetic``) and the kernel does the same. Otherwise numba never fuses
  (no ``fastmath``) and keeps float32 operations in float32;
- the geometric ops find each source pixel with PIL's NEAREST arithmetic, as
  ``geometric._source_index`` does (double-precision steps, or 16.16 fixed point);
- the colour ops hold whole levels, as ``levels.py`` and ``tables.py`` do, and round where they
  round: the blends in float32 (``(x - d) * f + d``, a product then a sum, truncated and
  clipped), the grayscale, means and Sharpness's filter as the exact integer quotients that
  those modules' float formulas equal, the AutoContrast and Equalize tables as in ``tables.py``.

A sample is 3 KB at 32x32, so all of its ops, from the crop to the output, read and write the
core's L1 cache: the eager path's cost was one pass over the whole batch per op and a dozen
small torch calls per op, not the arithmetic. Loops index arrays in full and never slice them:
in numba a view costs two atomic reference counts, which in a per-row loop cost more than the
arithmetic. Kernels release the GIL (``nogil``) and use one thread; ``cache=True`` keeps the
machine code between processes (``compiled.py`` chooses the folder before this module is
imported).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numba import njit, types
from numba.extending import intrinsic

# Kernel codes of the ops (compiled.py maps op names to them).
SKIP = -1
AFFINE = 0
AUTO_CONTRAST = 1
EQUALIZE = 2
INVERT = 3
SOLARIZE = 4
POSTERIZE = 5
CONTRAST = 6
COLOR = 7
BRIGHTNESS = 8
SHARPNESS = 9
CUTOUT = 10

_FILL = 128  # pil.GRAY_FILL
_F0 = np.float32(0.0)
_F1 = np.float32(1.0)
_HALF = np.float32(0.5)


@intrinsic
def _fma(typingctx: object, a: object, b: object, c: object) -> tuple[object, object]:
    """float32 ``a * b + c`` rounded once (LLVM's ``fma``, an instruction where the CPU has it;
    called from compiled code as ``_fma(a, b, c)``)."""
    signature = types.float32(types.float32, types.float32, types.float32)

    def codegen(context: object, builder: Any, signature: object, arguments: list[Any]) -> Any:
        return builder.fma(*arguments)

    return signature, codegen


@njit(cache=True, nogil=True)
def _multiply_add(a: np.float32, b: np.float32, c: np.float32, fused: bool) -> np.float32:
    """``a * b + c`` as torch's vectorised kernels compute it: one fused multiply-add where
    they are compiled with FMA (``fused``), else a product rounded, then a sum."""
    if fused:
        return _fma(a, b, c)  # type: ignore[call-arg]  # the typing context is numba's
    return a * b + c


@njit(cache=True, nogil=True)
def _axis(
    grid: np.ndarray, b: int, size: int, axes: np.ndarray, row: int, far: np.ndarray, fused: bool
) -> None:
    """Per output position on one axis of sample ``b``: the two source indices (``axes[row]``,
    and ``axes[row + 1]`` = that + 1 within the image) and the distance past the first
    (``far``), as grid_sample computes them (float32, border padding). Where the second index
    is outside the image, grid_sample reads 0 with weight 0; reading a value of the image with
    that weight 0 adds the same +0."""
    scaling = np.float32(size) / np.float32(2.0)
    last = np.float32(size - 1)
    for index in range(size):
        position = _multiply_add(grid[b, index] + _F1, scaling, -_HALF, fused)
        position = min(last, max(position, _F0))
        floor = math.floor(position)
        axes[row, index] = floor
        axes[row + 1, index] = min(floor + 1, size - 1)
        far[index] = position - np.float32(floor)


@njit(cache=True, nogil=True)
def _bilinear(
    image: np.ndarray,
    image_b: int,
    values: np.ndarray,
    as_levels: bool,
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    b: int,
    target: np.ndarray,
    target_b: int,
    rounded: bool,
    fused: bool,
    axes: np.ndarray,
    distances: np.ndarray,
    columns: np.ndarray,
    gathered: np.ndarray,
) -> None:
    """Resample ``image[image_b]`` ([B, C, H, W] uint8: its levels when ``as_levels``, else
    read as ``values[level]``) on sample ``b``'s separable grid into ``target[target_b]``: uint8
    ``rounded`` half to even (``torch.round``), or float32.

    Scratch: ``axes`` (uint64 [4, max(H, W)]), ``distances`` (float32 [2, max(H, W)]),
    ``columns`` (float32 [2, H, W]) and ``gathered`` (uint8 [2, H, W]): each source row's
    values at the output's two source columns, gathered once per row rather than once per
    output pixel, so that the sum over an output row is a vector loop (the same products and
    sums, in the same order). Levels are gathered as bytes and converted in that vector loop
    (0.15 ms a batch less than converting each one as it is gathered). The four weights are
    multiplied where they are used: keeping them in a [4, H, W] table cost 0.14 ms a batch
    more (256 samples of 3x32x32), its loads more than the products.
    """
    channels, height, width = image.shape[1], image.shape[2], image.shape[3]
    _axis(grid_x, b, width, axes, 0, distances[0], fused)
    _axis(grid_y, b, height, axes, 2, distances[1], fused)
    for c in range(channels):
        for r in range(axes[2, 0], axes[3, height - 1] + 1):  # the source rows read
            for j in range(width):
                if as_levels:
                    gathered[0, r, j] = image[image_b, c, r, axes[0, j]]
                    gathered[1, r, j] = image[image_b, c, r, axes[1, j]]
                else:
                    columns[0, r, j] = values[image[image_b, c, r, axes[0, j]]]
                    columns[1, r, j] = values[image[image_b, c, r, axes[1, j]]]
        for i in range(height):
            upper, lower = axes[2, i], axes[3, i]
            n_dist = distances[1, i]
            s_dist = _F1 - n_dist
            for j in range(width):
                w_dist = distances[0, j]
                e_dist = _F1 - w_dist
                if as_levels:
                    west_upper = np.float32(gathered[0, upper, j])
                    east_upper = np.float32(gathered[1, upper, j])
                    west_lower = np.float32(gathered[0, lower, j])
                    east_lower = np.float32(gathered[1, lower, j])
                else:
                    west_upper, east_upper = columns[0, upper, j], columns[1, upper, j]
                    west_lower, east_lower = columns[0, lower, j], columns[1, lower, j]
                value = west_upper * (s_dist * e_dist)
                value = _multiply_add(east_upper, s_dist * w_dist, value, fused)
                value = _multiply_add(west_lower, n_dist * e_dist, value, fused)
                value = _multiply_add(east_lower, n_dist * w_dist, value, fused)
                if rounded:
                    target[target_b, c, i, j] = np.rint(value)
                else:
                    target[target_b, c, i, j] = value


@njit(cache=True, nogil=True)
def _fix(value: float) -> int:
    """PIL's 16.16 fixed point: ``floor(v * 65536 + 0.5)``."""
    return math.floor(value * 65536.0 + 0.5)


@njit(cache=True, nogil=True)
def _affine(
    image: np.ndarray, data: np.ndarray, b: int, k: int, target: np.ndarray, index: np.ndarray
) -> None:
    """PIL's NEAREST affine transform of ``image`` [C, H, W] into ``target`` (the same shape)
    with ``data[b, k]`` (a, b, c, d, e, f), the arithmetic of ``geometric._source_index``: each
    output pixel's source as a flat index into ``index`` (int64 [H * W]; -1 outside, where the
    gray fill goes), then one gather per channel; a separable map (the translations) finds
    the source columns once for all rows (half the time). Writing another buffer, not
    ``image`` in place, saves a copy of the sample per op (``augment`` swaps the two)."""
    channels, height, width = image.shape
    a, s, c = data[b, k, 0], data[b, k, 1], data[b, k, 2]
    d, e, f = data[b, k, 3], data[b, k, 4], data[b, k, 5]
    if s == 0.0 and d == 0.0:  # separable: PIL steps in double precision and truncates
        x_position = c + a * 0.5  # each row steps through the same columns
        for j in range(width):
            x = -1 if x_position < 0.0 else int(x_position)
            x_position = x_position + a
            index[j] = x if 0 <= x < width else -1
        y_position = f + e * 0.5
        for i in range(height):
            y = -1 if y_position < 0.0 else int(y_position)
            y_position = y_position + e
            for ch in range(channels):
                for j in range(width):
                    x = index[j]
                    inside = 0 <= y < height and x >= 0
                    target[ch, i, j] = image[ch, y, x] if inside else _FILL
        return
    start_x = _fix(c + a * 0.5 + s * 0.5)
    start_y = _fix(f + d * 0.5 + e * 0.5)
    fix_a, fix_b, fix_d, fix_e = _fix(a), _fix(s), _fix(d), _fix(e)
    for i in range(height):
        row_x = start_x + fix_b * i
        row_y = start_y + fix_e * i
        for j in range(width):
            x = (row_x + fix_a * j) >> 16
            y = (row_y + fix_d * j) >> 16
            inside = 0 <= y < height and 0 <= x < width
            index[i * width + j] = y * width + x if inside else -1
    flat_source = image.reshape(channels, height * width)
    flat_target = target.reshape(channels, height * width)
    for ch in range(channels):
        for pixel in range(height * width):
            found = index[pixel]
            flat_target[ch, pixel] = _FILL if found < 0 else flat_source[ch, found]


@njit(cache=True, nogil=True)
def _blend(image: np.ndarray, code: int, factor: np.float32, gray: np.ndarray) -> None:
    """Brightness (with black), Color (with the grayscale), Contrast (with its rounded mean):
    ``levels.blend``, ``(x - d) * f + d`` in float32, truncated and clipped. The grayscale is
    PIL's 'L' (``levels.grayscale``, whose float formula equals this integer one) in ``gray``
    (int64 scratch [H, W]); the mean is PIL's ``int(mean + 0.5)`` (``levels.gray_mean``)."""
    channels, height, width = image.shape
    if code == COLOR and channels == 1:
        return  # blending a value with itself
    if code == BRIGHTNESS:  # levels.blend(0.0, ...): the product, truncated
        for ch in range(channels):
            for i in range(height):
                for j in range(width):
                    value = math.floor(np.float32(image[ch, i, j]) * factor)
                    image[ch, i, j] = min(255, max(0, value))
        return
    total = 0
    for i in range(height):
        for j in range(width):
            if channels == 1:
                level = int(image[0, i, j])
            else:
                level = (
                    19595 * int(image[0, i, j])
                    + 38470 * int(image[1, i, j])
                    + 7471 * int(image[2, i, j])
                    + 32768
                ) >> 16
            gray[i, j] = level
            total += level
    count = height * width
    mean = np.float32((2 * total + count) // (2 * count))
    for ch in range(channels):
        for i in range(height):
            for j in range(width):
                degenerate = np.float32(gray[i, j]) if code == COLOR else mean
                blended = (np.float32(image[ch, i, j]) - degenerate) * factor + degenerate
                image[ch, i, j] = min(255, max(0, math.floor(blended)))


@njit(cache=True, nogil=True)
def _sharpness(image: np.ndarray, factor: np.float32, target: np.ndarray) -> bool:
    """Blend the interior with PIL's SMOOTH filter of the original (``levels.sharpness``) into
    ``target``, the border as it is: the filtered value ``floor(s / 13 + 0.5)`` is the integer
    quotient ``(2 s + 13) // 26``. False (``target`` untouched) on images under 3x3, which
    the op leaves alone."""
    channels, height, width = image.shape
    if height < 3 or width < 3:
        return False
    for ch in range(channels):
        for j in range(width):
            target[ch, 0, j] = image[ch, 0, j]
            target[ch, height - 1, j] = image[ch, height - 1, j]
        for i in range(1, height - 1):
            target[ch, i, 0] = image[ch, i, 0]
            target[ch, i, width - 1] = image[ch, i, width - 1]
            for j in range(1, width - 1):
                total = 4 * np.int64(image[ch, i, j])
                for di in range(-1, 2):
                    for dj in range(-1, 2):
                        total += np.int64(image[ch, i + di, j + dj])
                smooth = np.float32((2 * total + 13) // 26)
                blended = (np.float32(image[ch, i, j]) - smooth) * factor + smooth
                target[ch, i, j] = min(255, max(0, math.floor(blended)))
    return True


@njit(cache=True, nogil=True)
def _apply_table(image: np.ndarray, ch: int, table: np.ndarray) -> None:
    for i in range(image.shape[1]):
        for j in range(image.shape[2]):
            image[ch, i, j] = table[image[ch, i, j]]


@njit(cache=True, nogil=True)
def _auto_contrast(image: np.ndarray, table: np.ndarray) -> None:
    """``tables.auto_contrast``: ``floor(v * scale + offset)`` in double precision, clipped."""
    for ch in range(image.shape[0]):
        low, high = 255, 0
        for i in range(image.shape[1]):
            for j in range(image.shape[2]):
                value = int(image[ch, i, j])
                low = value if value < low else low
                high = value if value > high else high
        if high <= low:
            continue
        scale = 255.0 / float(high - low)
        offset = -float(low) * scale
        for level in range(256):
            table[level] = min(255, max(0, math.floor(float(level) * scale + offset)))
        _apply_table(image, ch, table)


@njit(cache=True, nogil=True)
def _equalize(image: np.ndarray, table: np.ndarray, histogram: np.ndarray) -> None:
    """``tables.equalize``: PIL's table ``(step // 2 + pixels below) // step``, at most 255,
    taken as the floor of a float64 quotient as ``tables.equalize`` does (equal below 2**53;
    768 integer divisions a sample were half of this op's time)."""
    pixels = image.shape[1] * image.shape[2]
    for ch in range(image.shape[0]):
        for level in range(256):
            histogram[level] = 0
        for i in range(image.shape[1]):
            for j in range(image.shape[2]):
                histogram[image[ch, i, j]] += 1
        highest = 255
        while histogram[highest] == 0:
            highest -= 1
        step = (pixels - histogram[highest]) // 255
        if step == 0:
            continue
        divisor = float(step)
        below = step // 2
        for level in range(256):
            table[level] = below
            below += histogram[level]
        for level in range(256):
            table[level] = min(255, math.floor(float(table[level]) / divisor))
        _apply_table(image, ch, table)


@njit(cache=True, nogil=True)
def _point(image: np.ndarray, code: int, argument: float, table: np.ndarray) -> None:
    """Invert, Solarize (``v >= ceil(t)``, the threshold in float64) and Posterize (bits
    truncated within [1, 8]) as one table per sample."""
    if code == SOLARIZE:
        threshold = math.ceil(argument)
        for level in range(256):
            table[level] = 255 - level if level >= threshold else level
    elif code == POSTERIZE:
        bits = min(8, max(1, math.floor(argument)))
        mask = 255 - ((1 << (8 - bits)) - 1)
        for level in range(256):
            table[level] = level & mask
    else:
        for level in range(256):
            table[level] = 255 - level
    for ch in range(image.shape[0]):
        _apply_table(image, ch, table)


@njit(cache=True, nogil=True)
def _cutout(image: np.ndarray, fraction: float, across: float, down: float) -> None:
    """Fill Fast AutoAugment's Cutout box with gray: ``geometric.cutout_boxes``'s float64
    arithmetic (side ``floor(v) + 1`` for ``v = fraction * W > 0``, the corner
    ``floor(max(0, centre - v / 2))``, clipped; half-open) for the centre (``across``,
    ``down``) in pixels."""
    height, width = image.shape[1], image.shape[2]
    size = fraction * width
    if size <= 0.0:
        return
    side = math.floor(size) + 1.0
    left = math.floor(max(across - size / 2, 0.0))
    top = math.floor(max(down - size / 2, 0.0))
    right, bottom = int(min(left + side, width)), int(min(top + side, height))
    for ch in range(image.shape[0]):
        for i in range(int(top), bottom):
            for j in range(int(left), right):
                image[ch, i, j] = _FILL


@njit(cache=True, nogil=True)
def augment(
    images: np.ndarray,
    values: np.ndarray,
    as_levels: bool,
    resample: bool,
    grid_x: np.ndarray,
    grid_y: np.ndarray,
    fused: bool,
    policy_first: bool,
    codes: np.ndarray,
    arguments: np.ndarray,
    factors: np.ndarray,
    affine: np.ndarray,
    centers: np.ndarray,
    output: np.ndarray,
    out: np.ndarray,
) -> None:
    """Crop/flip and the policy, sample by sample, into ``out`` (float32 [B, C, H, W]).

    ``policy_first`` False: resample (when ``resample``) rounded to uint8, the policy, then
    ``output[level]``. True: the policy, then resample to float32 reading the levels
    (``as_levels``) or ``values[level]``, or ``output[level]`` without resampling.
    ``codes`` [B, K] are kernel codes, with their ``arguments`` (float64), float32 ``factors``,
    ``affine`` data [B, K, 6] and Cutout ``centers`` [B, K, 2] (fractions of the width and
    height, float64). ``fused``: the crop's products and sums as fused multiply-adds
    (``compiled.crop_arithmetic``). ``images`` are only read.
    """
    batch, channels, height, width = images.shape
    work = np.empty((2, channels, height, width), np.uint8)  # the sample, and the spare
    current = 0  # which of the two holds the sample: ops that resample write the other
    image, spare = work[0], work[1]
    table = np.empty(256, np.int64)
    histogram = np.empty(256, np.int64)
    gray = np.empty((height, width), np.int64)
    index = np.empty(height * width, np.int64)
    axes = np.empty((4, max(height, width)), np.uint64)
    distances = np.empty((2, max(height, width)), np.float32)
    columns = np.empty((2, height, width), np.float32)
    gathered = np.empty((2, height, width), np.uint8)
    for b in range(batch):
        if resample and not policy_first:
            _bilinear(
                images, b, values, True, grid_x, grid_y, b, work, current, True, fused, axes,
                distances, columns, gathered,
            )  # fmt: skip
        else:
            for ch in range(channels):
                for i in range(height):
                    for j in range(width):
                        image[ch, i, j] = images[b, ch, i, j]
        for k in range(codes.shape[1]):
            code = codes[b, k]
            if code == SKIP:
                continue
            if code in (AFFINE, SHARPNESS):
                if code == AFFINE:
                    _affine(image, affine, b, k, spare, index)
                elif not _sharpness(image, factors[b, k], spare):
                    continue
                current = 1 - current
                image, spare = work[current], work[1 - current]
            elif code == CUTOUT:
                _cutout(
                    image, arguments[b, k], centers[b, k, 0] * float(width),
                    centers[b, k, 1] * float(height),
                )  # fmt: skip
            elif code in (CONTRAST, COLOR, BRIGHTNESS):
                _blend(image, code, factors[b, k], gray)
            elif code == AUTO_CONTRAST:
                _auto_contrast(image, table)
            elif code == EQUALIZE:
                _equalize(image, table, histogram)
            else:
                _point(image, code, arguments[b, k], table)
        if resample and policy_first:
            _bilinear(
                work, current, values, as_levels, grid_x, grid_y, b, out, b, False, fused, axes,
                distances, columns, gathered,
            )  # fmt: skip
            continue
        for ch in range(channels):
            for i in range(height):
                for j in range(width):
                    out[b, ch, i, j] = output[image[ch, i, j]]
