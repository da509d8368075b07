"""The :class:`Dataset` container (private module; import it from :mod:`ntkcore.data`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import numpy as np

from .errors import CorruptDataError, NonFiniteError, ParameterError, ShapeError


@dataclass(eq=False)
class Dataset:
    """A loaded dataset: pixels in [0, 1], labels, and the paper's preprocessing.

    Attributes
    ----------
    name : str
        One of :data:`DATASETS`.
    classes : tuple of int
        Original class ids kept; label ``y`` means class ``classes[y]``.
    class_names : tuple of str
        Names of ``classes``, same order.
    image_shape : tuple
        ``(H, W)`` for grayscale, ``(3, H, W)`` for CIFAR-10 (channel-major, as torchvision),
        ``(s, s)`` or ``(d,)`` for synthetic data.
    mean, std : tuple of float
        Table 5 normalization, one value per channel.
    pixels_train : ndarray (n, d) float64
        Flattened training pixels in [0, 1] (CIFAR rows channel-major: R plane, G, B).
    y_train : ndarray (n,) int64
        Training labels in ``0..C-1``.
    pixels_test, y_test : ndarray (T, d) float64, (T,) int64
    train_indices, test_indices : ndarray int64
        Row of each sample in the original files (provenance); synthetic: ``arange``.
    source : str
        Folder the files were read from (or the generator).
    seed : int
        Seed of the subset draw.
    """

    name: str
    classes: tuple
    class_names: tuple
    image_shape: tuple
    mean: tuple
    std: tuple
    pixels_train: np.ndarray = field(repr=False)
    y_train: np.ndarray = field(repr=False)
    pixels_test: np.ndarray = field(repr=False)
    y_test: np.ndarray = field(repr=False)
    train_indices: np.ndarray = field(repr=False)
    test_indices: np.ndarray = field(repr=False)
    source: str = ""
    seed: int = 42

    # ----------------------------------------------------------------- sizes
    @property
    def binary(self) -> bool:
        """True when exactly two classes are kept (targets are then a +-1 column)."""
        return len(self.classes) == 2

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def n_train(self) -> int:
        return int(self.pixels_train.shape[0])

    @property
    def n_test(self) -> int:
        return int(self.pixels_test.shape[0])

    @property
    def dim(self) -> int:
        return int(self.pixels_train.shape[1])

    # ----------------------------------------------------------------- preprocessing
    def _channel_vectors(self, d: int):
        """Per-feature mean and std vectors (d,): each channel's value repeated over its plane."""
        c = len(self.mean)
        if d % c:
            raise CorruptDataError(f"{self.name}: dimension {d} is not a multiple of {c} channels")
        mean = np.repeat(np.asarray(self.mean, dtype=np.float64), d // c)
        std = np.repeat(np.asarray(self.std, dtype=np.float64), d // c)
        return mean, std

    def preprocess(self, pixels):
        """Normalize pixels as the models see them: Table 5, then unit-norm rows (A.1).

        ``x -> z = (x - mean) / std`` per feature (per channel for CIFAR-10, channel-major
        layout), then ``z / ||z||_2`` per row. A row with ``z == 0`` (only possible when
        every pixel equals the mean) stays zero instead of becoming NaN.

        Parameters
        ----------
        pixels : ndarray or torch.Tensor, shape (n, d) or (d,)
            Pixels in [0, 1] (values outside are allowed: attacks may overshoot before clipping).

        Returns
        -------
        Same kind as the input, same shape. NumPy input (or a nested list) gives a new float64
        array; a floating torch tensor gives a tensor of its own dtype and device,
        differentiable w.r.t. ``pixels``, and an integer or bool tensor a float64 one.

        Raises
        ------
        ShapeError
            The last dimension is not ``self.dim``.
        ParameterError
            Complex pixels (their imaginary part would be dropped).
        NonFiniteError
            NaN or Inf in NumPy input (torch input is not scanned: it sits inside attack loops).
        """
        d = self.dim
        is_torch = type(pixels).__module__.startswith("torch")
        if not is_torch:
            pixels = np.asarray(pixels)
        if pixels.dtype.is_complex if is_torch else pixels.dtype.kind == "c":
            raise ParameterError(f"pixels: expected real values, got dtype {pixels.dtype}")
        shape = tuple(pixels.shape)
        if len(shape) not in (1, 2) or shape[-1] != d:
            raise ShapeError(f"pixels: expected shape (n, {d}) or ({d},), got {shape}")
        mean, std = self._channel_vectors(d)
        if is_torch:
            import torch

            if not pixels.is_floating_point():  # the statistics would be cast to integers
                pixels = pixels.to(torch.float64)
            m = torch.as_tensor(mean, dtype=pixels.dtype, device=pixels.device)
            s = torch.as_tensor(std, dtype=pixels.dtype, device=pixels.device)
            z = (pixels - m) / s
            norm = torch.linalg.vector_norm(z, dim=-1, keepdim=True)
            return z / torch.where(norm > 0, norm, torch.ones_like(norm))
        z = np.array(pixels, dtype=np.float64)  # a copy, worked on in place
        if not np.isfinite(z).all():
            raise NonFiniteError("pixels: expected finite values, got NaN or Inf")
        z -= mean
        z /= std
        norm = np.sqrt(np.einsum("...j,...j->...", z, z))[..., None]
        norm[norm == 0] = 1.0
        z /= norm
        return z

    @cached_property
    def X_train(self) -> np.ndarray:
        """``preprocess(pixels_train)``, (n, d) float64, unit rows; computed once and cached."""
        return self.preprocess(self.pixels_train)

    @cached_property
    def X_test(self) -> np.ndarray:
        """``preprocess(pixels_test)``, (T, d) float64, unit rows; computed once and cached."""
        return self.preprocess(self.pixels_test)

    # ----------------------------------------------------------------- targets
    def targets(self, y) -> np.ndarray:
        """Regression targets for kernel ridge regression (B.12).

        Parameters
        ----------
        y : array of int, shape (n,)
            Labels in ``0..C-1``.

        Returns
        -------
        ndarray (n, C) float64 one-hot for ``C > 2``; for binary data a (n, 1) column with
        ``-1`` for ``classes[0]`` (y == 0) and ``+1`` for ``classes[1]`` (y == 1), i.e.
        ``2 y - 1``, so a positive output predicts the second listed class.
        """
        y = np.asarray(y)
        if y.ndim != 1 or (y.size and y.dtype.kind not in "iu"):
            raise ShapeError(f"y: expected a 1-D integer array, got shape {y.shape} {y.dtype}")
        c = self.n_classes
        if y.size and (y.min() < 0 or y.max() >= c):
            raise ParameterError(f"y: expected labels 0..{c - 1}, got {y.min()}..{y.max()}")
        y = y.astype(np.int64, copy=False)  # an empty list comes as float64
        if self.binary:
            return (2.0 * y - 1.0).astype(np.float64)[:, None]
        out = np.zeros((y.shape[0], c), dtype=np.float64)
        out[np.arange(y.shape[0]), y] = 1.0
        return out

    @property
    def Y_train(self) -> np.ndarray:
        """``targets(y_train)``."""
        return self.targets(self.y_train)

    @property
    def Y_test(self) -> np.ndarray:
        """``targets(y_test)``."""
        return self.targets(self.y_test)

    def labels_from_outputs(self, outputs) -> np.ndarray:
        """Predicted labels ``0..C-1`` from model/KRR outputs shaped like :meth:`targets`.

        (n, 1) outputs (binary): ``1`` where the output is > 0, else ``0``; (n, C): argmax.
        ShapeError unless there is one column per class (or one, for binary data).
        """
        out = np.asarray(outputs)
        widths = (1, 2) if self.binary else (self.n_classes,)
        if out.ndim != 2 or out.shape[1] not in widths:
            raise ShapeError(f"outputs: expected shape (n, {' or '.join(map(str, widths))}) for "
                             f"{self.name}'s {self.n_classes} classes, got {out.shape}")
        if out.shape[1] == 1:
            return (out[:, 0] > 0).astype(np.int64)
        return np.argmax(out, axis=1).astype(np.int64)

    def as_images(self, pixels) -> np.ndarray:
        """Pixels (n, d) -> images for plotting: (n, H, W), or (n, H, W, 3) for CIFAR-10; one
        row (d,) gives one image (H, W) or (H, W, 3)."""
        p = np.asarray(pixels)
        d = int(np.prod(self.image_shape))
        if p.ndim == 1 and p.shape[0] == d:
            return self.as_images(p[None])[0]
        if p.ndim != 2 or p.shape[1] != d:
            raise ShapeError(f"pixels: expected (n, {d}) rows of {self.name} pixels, got shape "
                             f"{p.shape}")
        imgs = p.reshape((p.shape[0],) + tuple(self.image_shape))
        if len(self.image_shape) == 3:
            imgs = np.moveaxis(imgs, 1, -1)
        return imgs
