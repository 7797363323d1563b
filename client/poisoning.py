"""What a malicious client does with its own data and its own update (no omniscience).

Data poisoning, the :data:`DATA_ATTACKS` registry
    :func:`label_flip` (targeted / untargeted label flipping), :class:`Trigger` with
    :func:`backdoor_poison` (BadNets pixel-pattern backdoor [Gu et al., 2017]) and
    :func:`distributed_triggers` (DBA [Xie et al., ICLR 2020]), :func:`inflate_examples`
    (a lie about the example count, to weigh more in FedAvg).
Update poisoning that needs only the client's own update
    :func:`boost_update` and :func:`model_replacement` (model replacement, constrain and
    scale [Bagdasaryan et al., AISTATS 2020]: every backdoor's ``boost`` and ``max_norm``),
    :func:`neurotoxin` (the backdoor projected off the coordinates benign clients use most
    [Zhang et al., ICML 2022]: the ``neurotoxin`` data attack) and the :data:`UPDATE_POISONINGS` registry (``sign_flip``,
    ``gaussian``), built with :func:`get_update_poisoning`.

Each attack is registered next to the function it configures. Their names are distinct
from the omniscient attacks' in ``simulations.attacks``, so one name means one attack.

Attacks that need the honest clients' updates (ALIE, IPM, min-max, ...) live in
``simulations/attacks.py``. Every function here returns new tensors and leaves its inputs
untouched; randomness comes from a ``torch.Generator`` argument.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, TypeVar

import torch
from torch import Tensor

from aggregation.catalog import Check, Factory, optional
from aggregation.registry import Registry

__all__ = [
    "DATA_ATTACKS",
    "UPDATE_POISONINGS",
    "DataAttack",
    "Trigger",
    "UpdatePoisoning",
    "backdoor_poison",
    "boost_update",
    "distributed_triggers",
    "gaussian_update",
    "get_update_poisoning",
    "inflate_examples",
    "label_flip",
    "label_flip_map",
    "model_replacement",
    "neurotoxin",
    "neurotoxin_mask",
    "register_update_poisoning",
    "sign_flip_update",
    "split_trigger",
    "update_poisoning_names",
]

FlipMode = Literal["all_to_one", "random", "reverse"]
_FLIP_MODES: tuple[str, ...] = ("all_to_one", "random", "reverse")
Corner = Literal["top_left", "top_right", "bottom_left", "bottom_right"]
_CORNERS: tuple[str, ...] = ("top_left", "top_right", "bottom_left", "bottom_right")
F = TypeVar("F", bound=Callable[..., Any])


def _check_int(name: str, value: int, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    return value


def _check_generator(where: str, generator: object) -> torch.Generator:
    if not isinstance(generator, torch.Generator):
        raise TypeError(
            f"{where}: generator must be a torch.Generator, got {type(generator).__name__}; "
            "use aggregation.registry.make_generator(seed)"
        )
    return generator


# --------------------------------------------------------------------------- data attacks


@dataclass(frozen=True)
class DataAttack:
    """A data attack as a run config names it, with its parameters (defaults filled in).

    Built with ``DATA_ATTACKS.build(name, **params)``; what each parameter does is said
    by the registration next to the function it configures. ``client.malicious`` carries
    it out.

    Examples
    --------
    >>> DATA_ATTACKS.build("label_flip", mode="all_to_one")
    DataAttack(name='label_flip', params={'mode': 'all_to_one', 'target': 0})
    """

    name: str
    params: Mapping[str, Any]


DATA_ATTACKS: Registry[Callable[..., DataAttack]] = Registry("data attack")
"""Attacks a client mounts on its own data or on the example count it reports."""


# --------------------------------------------------------------------------- label flipping


def label_flip_map(num_classes: int, *, mode: FlipMode = "reverse", target: int = 0,
                   generator: torch.Generator | None = None) -> Tensor:
    """The class map ``pi`` of label flipping: label ``l`` becomes ``pi[l]``.

    ``"reverse"``: ``pi(l) = L - 1 - l`` [Fang et al., 2020; Tolpegin et al., ESORICS 2020];
    ``"all_to_one"``: ``pi(l) = target``; ``"random"``: a uniformly random derangement
    (a permutation without fixed points, so every label changes), drawn from ``generator``
    by rejection of uniform permutations.

    Parameters
    ----------
    num_classes
        ``L >= 2``.
    mode
        One of ``"reverse"``, ``"all_to_one"``, ``"random"``.
    target
        The class every label goes to under ``"all_to_one"`` (``0 <= target < L``).
    generator
        Required for ``"random"``.

    Returns
    -------
    Tensor
        ``(L,)`` int64 on the CPU.

    Raises
    ------
    ValueError
        On an unknown mode, ``L < 2``, ``target`` out of range, or ``"random"`` without a
        generator.

    Examples
    --------
    >>> label_flip_map(4)
    tensor([3, 2, 1, 0])
    """
    _check_int("num_classes", num_classes, low=2)
    if mode == "reverse":
        return torch.arange(num_classes - 1, -1, -1, dtype=torch.int64)
    if mode == "all_to_one":
        if isinstance(target, bool) or not isinstance(target, int) or not (
            0 <= target < num_classes
        ):
            raise ValueError(
                f"label_flip: target must be an int in [0, {num_classes}), got {target!r}"
            )
        return torch.full((num_classes,), target, dtype=torch.int64)
    if mode == "random":
        if generator is None:
            raise ValueError("label_flip: mode='random' needs generator=torch.Generator")
        gen = _check_generator("label_flip", generator)
        ident = torch.arange(num_classes)
        while True:  # P(derangement) -> 1/e, so ~2.7 draws on average
            perm = torch.randperm(num_classes, generator=gen, device=gen.device).cpu()
            if not bool((perm == ident).any()):
                return perm.to(torch.int64)
    raise ValueError(f"label_flip: unknown mode {mode!r}; valid: {', '.join(_FLIP_MODES)}")


def label_flip(y: Tensor, num_classes: int, *, mode: FlipMode = "reverse", target: int = 0,
               generator: torch.Generator | None = None) -> Tensor:
    """Label flipping: return ``pi[y]`` with ``pi`` from :func:`label_flip_map`.

    Parameters
    ----------
    y
        ``(N,)`` integer labels in ``[0, num_classes)``; left untouched.

    Returns
    -------
    Tensor
        ``(N,)`` new labels, dtype and device of ``y``.

    Raises
    ------
    ValueError
        If ``y`` is not a 1-D integer tensor with values in range, or see
        :func:`label_flip_map`.

    Examples
    --------
    >>> label_flip(torch.tensor([0, 1, 2]), 3)
    tensor([2, 1, 0])
    >>> label_flip(torch.tensor([0, 1, 2]), 3, mode="all_to_one", target=1)
    tensor([1, 1, 1])
    """
    _check_labels("label_flip", y, num_classes)
    pi = label_flip_map(num_classes, mode=mode, target=target, generator=generator)
    return pi.to(y.device)[y.long()].to(y.dtype)


@DATA_ATTACKS.register("label_flip")
def _label_flip_attack(*, mode: FlipMode = "reverse", target: int = 0) -> DataAttack:
    """``label_flip``: the client trains on :func:`label_flip` of its labels."""
    return DataAttack("label_flip", {"mode": mode, "target": target})


def _check_labels(where: str, y: Tensor, num_classes: int) -> None:
    _check_int("num_classes", num_classes, low=2)
    if not isinstance(y, Tensor) or y.ndim != 1 or y.is_floating_point() or y.is_complex() \
            or y.dtype == torch.bool:
        shape = tuple(y.shape) if isinstance(y, Tensor) else type(y).__name__
        raise ValueError(f"{where}: labels must be a 1-D integer tensor, got {shape}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(
            f"{where}: labels must lie in [0, {num_classes}), "
            f"got range [{int(y.min())}, {int(y.max())}]"
        )


# --------------------------------------------------------------------------- triggers


@dataclass(frozen=True)
class Trigger:
    """A pixel-pattern backdoor trigger (BadNets [Gu, Dolan-Gavitt & Garg, 2017]).

    The trigger is a set of pixels given as ``(dr, dc)`` offsets counted inward from
    ``corner``, ``margin`` pixels away from the image border: for ``"bottom_right"`` the
    offset ``(dr, dc)`` is pixel ``(H - 1 - margin - dr, W - 1 - margin - dc)``. Stamping
    sets those pixels (in ``channels``, all by default) to ``value``; ``None`` means the
    maximum of the tensor being stamped, i.e. the top of the input range (pass it
    explicitly, e.g. ``1.0`` for images in ``[0, 1]``, to keep it the same across
    datasets).

    Use :meth:`square` and :meth:`checker` for the usual patterns. ``pixels`` is stored
    sorted row-major and must be non-empty and free of duplicates.

    Examples
    --------
    >>> t = Trigger.square(2, corner="top_left", margin=0, value=1.0)
    >>> t.apply(torch.zeros(1, 1, 3, 3))[0, 0]
    tensor([[1., 1., 0.],
            [1., 1., 0.],
            [0., 0., 0.]])
    """

    pixels: tuple[tuple[int, int], ...]
    corner: Corner = "bottom_right"
    margin: int = 1
    value: float | None = None
    channels: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        pix = tuple(tuple(p) for p in self.pixels)
        if not pix:
            raise ValueError("Trigger: pixels must be non-empty")
        for p in pix:
            if len(p) != 2 or any(isinstance(v, bool) or not isinstance(v, int) or v < 0
                                  for v in p):
                raise ValueError(
                    f"Trigger: each pixel must be a pair of ints >= 0, got {p!r}"
                )
        ordered = tuple(sorted(set(pix)))
        if len(ordered) != len(pix):
            raise ValueError("Trigger: pixels contain duplicates")
        object.__setattr__(self, "pixels", ordered)
        if self.corner not in _CORNERS:
            raise ValueError(
                f"Trigger: unknown corner {self.corner!r}; valid: {', '.join(_CORNERS)}"
            )
        _check_int("Trigger margin", self.margin, low=0)
        if self.value is not None and not math.isfinite(float(self.value)):
            raise ValueError(f"Trigger: value must be finite or None, got {self.value}")
        if self.channels is not None:
            chans = tuple(self.channels)
            if not chans or len(set(chans)) != len(chans) or any(
                isinstance(c, bool) or not isinstance(c, int) or c < 0 for c in chans
            ):
                raise ValueError(
                    f"Trigger: channels must be distinct ints >= 0 or None, got {chans!r}"
                )
            object.__setattr__(self, "channels", tuple(sorted(chans)))

    @classmethod
    def square(cls, size: int = 3, *, corner: Corner = "bottom_right", margin: int = 1,
               value: float | None = None,
               channels: tuple[int, ...] | None = None) -> Trigger:
        """A filled ``size x size`` square (the BadNets "white square")."""
        _check_int("Trigger size", size, low=1)
        return cls(tuple((r, c) for r in range(size) for c in range(size)), corner, margin,
                   value, channels)

    @classmethod
    def checker(cls, size: int = 3, *, corner: Corner = "bottom_right", margin: int = 1,
                value: float | None = None,
                channels: tuple[int, ...] | None = None) -> Trigger:
        """The on-squares ``(dr + dc) even`` of a ``size x size`` checkerboard.

        Only those pixels are stamped; the others keep the image's values.
        """
        _check_int("Trigger size", size, low=1)
        return cls(tuple((r, c) for r in range(size) for c in range(size) if (r + c) % 2 == 0),
                   corner, margin, value, channels)

    @property
    def extent(self) -> tuple[int, int]:
        """Rows and columns the pattern spans from its corner, margin included."""
        return (self.margin + 1 + max(p[0] for p in self.pixels),
                self.margin + 1 + max(p[1] for p in self.pixels))

    def positions(self, height: int, width: int) -> tuple[Tensor, Tensor]:
        """Absolute ``(rows, cols)`` int64 index tensors ``(P,)`` in an ``H x W`` image.

        Raises
        ------
        ValueError
            If the pattern does not fit in ``height x width``.
        """
        need_h, need_w = self.extent
        if need_h > height or need_w > width:
            raise ValueError(
                f"Trigger needs at least {need_h}x{need_w} pixels from its corner, "
                f"image is {height}x{width}: use a smaller trigger or margin"
            )
        dr = torch.tensor([p[0] for p in self.pixels], dtype=torch.int64)
        dc = torch.tensor([p[1] for p in self.pixels], dtype=torch.int64)
        rows = height - 1 - self.margin - dr if self.corner.startswith("bottom") \
            else self.margin + dr
        cols = width - 1 - self.margin - dc if self.corner.endswith("right") \
            else self.margin + dc
        return rows, cols

    def mask(self, height: int, width: int) -> Tensor:
        """``(H, W)`` bool mask of the trigger's pixels."""
        m = torch.zeros((height, width), dtype=torch.bool)
        rows, cols = self.positions(height, width)
        m[rows, cols] = True
        return m

    def apply(self, x: Tensor, *, image_shape: Sequence[int] | None = None) -> Tensor:
        """Return a copy of ``x`` with the trigger stamped on every sample.

        Parameters
        ----------
        x
            ``(B, C, H, W)`` images, ``(B, H, W)`` single-channel images, or flat
            ``(B, D)`` inputs together with ``image_shape``.
        image_shape
            ``(C, H, W)`` or ``(H, W)`` with product ``D``; only for flat inputs.

        Returns
        -------
        Tensor
            Same shape, dtype and device as ``x``.

        Raises
        ------
        ValueError
            On an unsupported shape, an ``image_shape`` that does not match, a trigger or
            channel outside the image, or an empty ``x`` with ``value=None``.
        """
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ValueError("Trigger.apply: x must be a floating-point tensor")
        if x.ndim == 2:
            if image_shape is None:
                raise ValueError(
                    "Trigger.apply: flat inputs (B, D) need image_shape=(C, H, W) or (H, W)"
                )
            shape = tuple(int(s) for s in image_shape)
            if len(shape) == 2:
                shape = (1, *shape)
            if len(shape) != 3 or math.prod(shape) != x.shape[1]:
                raise ValueError(
                    f"Trigger.apply: image_shape {tuple(image_shape)} does not match "
                    f"{x.shape[1]} features"
                )
            images = x.reshape(x.shape[0], *shape)
        elif x.ndim == 3:
            images = x.unsqueeze(1)
        elif x.ndim == 4:
            if image_shape is not None and tuple(image_shape) != tuple(x.shape[1:]):
                raise ValueError(
                    f"Trigger.apply: image_shape {tuple(image_shape)} does not match "
                    f"x of shape {tuple(x.shape)}"
                )
            images = x
        else:
            raise ValueError(
                f"Trigger.apply: x must be (B, C, H, W), (B, H, W) or (B, D), "
                f"got shape {tuple(x.shape)}"
            )
        if self.value is None and x.numel() == 0:
            raise ValueError("Trigger.apply: value=None takes max(x), but x is empty")
        value = float(x.max()) if self.value is None else float(self.value)
        _, c, h, w = images.shape
        rows, cols = self.positions(h, w)
        chans = list(range(c)) if self.channels is None else list(self.channels)
        if chans[-1] >= c:
            raise ValueError(
                f"Trigger.apply: channels {self.channels} out of range for {c} channel(s)"
            )
        out = images.clone()
        ch = torch.tensor(chans, dtype=torch.int64, device=x.device)
        out[:, ch[:, None], rows.to(x.device)[None, :], cols.to(x.device)[None, :]] = value
        return out.reshape(x.shape)


def split_trigger(trigger: Trigger, num_parts: int) -> list[Trigger]:
    """Split a global trigger into ``K`` disjoint local triggers (DBA [Xie et al., 2020]).

    The pixels, in row-major order from the corner, are cut into ``K`` contiguous runs
    whose sizes differ by at most one (the first ``P mod K`` get one more); for a
    ``K``-row square each part is one row, as DBA's bar-shaped local triggers. The parts
    are disjoint and their union is the global trigger.

    Raises
    ------
    ValueError
        If ``num_parts < 1`` or exceeds the trigger's ``P`` pixels.

    Examples
    --------
    >>> [len(t.pixels) for t in split_trigger(Trigger.square(3), 4)]
    [3, 2, 2, 2]
    """
    _check_int("num_parts", num_parts, low=1)
    count = len(trigger.pixels)
    if num_parts > count:
        raise ValueError(
            f"split_trigger: cannot split {count} pixel(s) into {num_parts} parts; "
            "use a larger trigger or fewer parts"
        )
    base, extra = divmod(count, num_parts)
    parts: list[Trigger] = []
    start = 0
    for k in range(num_parts):
        stop = start + base + (1 if k < extra else 0)
        parts.append(replace(trigger, pixels=trigger.pixels[start:stop]))
        start = stop
    return parts


def distributed_triggers(trigger: Trigger, num_attackers: int, *,
                         num_parts: int = 4) -> list[Trigger]:
    """Local triggers of the distributed backdoor attack (DBA) [Xie et al., ICLR 2020].

    The global trigger is split into ``K = num_parts`` parts (:func:`split_trigger`);
    attacker ``i`` gets part ``i mod K``. With ``num_attackers >= K`` every part is used and
    the attackers' triggers together cover the global trigger, which is the one used at
    test time; with fewer attackers some parts are never trained on.

    Returns
    -------
    list[Trigger]
        ``num_attackers`` local triggers.

    Examples
    --------
    >>> parts = distributed_triggers(Trigger.square(4), 5)
    >>> parts[4] == parts[0]
    True
    """
    _check_int("num_attackers", num_attackers, low=1)
    parts = split_trigger(trigger, num_parts)
    return [parts[i % num_parts] for i in range(num_attackers)]


def backdoor_poison(x: Tensor, y: Tensor, *, trigger: Trigger, target: int, fraction: float,
                    generator: torch.Generator, exclude_target: bool = False,
                    image_shape: Sequence[int] | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Backdoor data poisoning (BadNets [Gu et al., 2017]; DBA with a local trigger).

    Picks ``k = floor(fraction * N + 1/2)`` samples (``fraction * N`` rounded half up)
    uniformly without replacement with ``generator``, stamps ``trigger`` on them and
    relabels them ``target``. With ``exclude_target=True`` only samples whose label is not
    ``target`` are candidates (``k`` is still a fraction of all ``N``), so every poisoned
    sample teaches the backdoor rather than repeating its true label.

    With ``trigger.value=None`` the stamp value is the maximum of the whole ``x``.

    Parameters
    ----------
    x
        ``(N, ...)`` inputs, as :meth:`Trigger.apply` accepts; left untouched.
    y
        ``(N,)`` integer labels; left untouched.
    target
        The backdoor's target class (``>= 0``).
    fraction
        Share of the samples to poison, in ``[0, 1]``.

    Returns
    -------
    tuple[Tensor, Tensor, Tensor]
        ``x'`` like ``x``, ``y'`` like ``y``, and the poisoned indices ``(k,)`` int64,
        sorted, on the device of ``x``.

    Raises
    ------
    ValueError
        If shapes disagree, ``fraction`` is outside ``[0, 1]``, or fewer than ``k``
        candidates remain with ``exclude_target=True``.

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> x2, y2, idx = backdoor_poison(torch.zeros(10, 1, 5, 5), torch.zeros(10, dtype=torch.long),
    ...                               trigger=Trigger.square(2, value=1.0), target=3,
    ...                               fraction=0.25, generator=make_generator(0))
    >>> idx.numel(), int((y2 == 3).sum())
    (3, 3)
    """
    gen = _check_generator("backdoor_poison", generator)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor) or x.ndim < 2 or y.ndim != 1 \
            or x.shape[0] != y.shape[0]:
        raise ValueError(
            "backdoor_poison: need x (N, ...) and y (N,) with the same N, got "
            f"{tuple(getattr(x, 'shape', ()))} and {tuple(getattr(y, 'shape', ()))}"
        )
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"backdoor_poison: labels must be integers, got {y.dtype}")
    _check_int("target", target, low=0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not (
        0.0 <= float(fraction) <= 1.0
    ):
        raise ValueError(f"backdoor_poison: fraction must be in [0, 1], got {fraction!r}")
    n = x.shape[0]
    k = math.floor(float(fraction) * n + 0.5)
    candidates = torch.arange(n, device=x.device)
    if exclude_target:
        candidates = candidates[y != target]
    if k > candidates.numel():
        raise ValueError(
            f"backdoor_poison: fraction={fraction} asks for {k} of {n} samples, but only "
            f"{candidates.numel()} have a label != target={target}: lower the fraction"
        )
    if trigger.value is None and n > 0:
        trigger = replace(trigger, value=float(x.max()))
    order = torch.randperm(candidates.numel(), generator=gen, device=gen.device)
    idx = torch.sort(candidates[order[:k].to(x.device)]).values
    x_out = x.clone()
    y_out = y.clone()
    if k:
        x_out[idx] = trigger.apply(x[idx], image_shape=image_shape)
        y_out[idx] = target
    return x_out, y_out, idx


@DATA_ATTACKS.register("backdoor")
def _backdoor_attack(*, target: int = 0, fraction: float = 0.5, size: int = 2,
                     pattern: str = "square", boost: float = 1.0,
                     max_norm: float | None = None) -> DataAttack:
    """``backdoor``: :func:`backdoor_poison` of a ``fraction`` of the client's samples with
    a ``size`` x ``size`` ``pattern`` trigger (``square`` or ``checker``) to class ``target``,
    then the update scaled by ``boost`` up to the norm ``max_norm``: model replacement,
    constrain-and-scale with a bound (:func:`model_replacement`; ``boost=1``,
    ``max_norm=None``: sent as trained)."""
    _check_boost("backdoor", boost, max_norm)
    return DataAttack("backdoor", {"target": target, "fraction": fraction, "size": size,
                                   "pattern": pattern, "boost": boost, "max_norm": max_norm})


@DATA_ATTACKS.register("dba")
def _dba_attack(*, target: int = 0, fraction: float = 0.5, size: int = 2,
                pattern: str = "square", boost: float = 1.0, max_norm: float | None = None,
                parts: int = 4) -> DataAttack:
    """``dba``: as ``backdoor``, each attacker with its part of the trigger split in
    ``parts`` (:func:`distributed_triggers`)."""
    _check_boost("dba", boost, max_norm)
    return DataAttack("dba", {"target": target, "fraction": fraction, "size": size,
                              "pattern": pattern, "boost": boost, "max_norm": max_norm,
                              "parts": parts})


@DATA_ATTACKS.register("neurotoxin")
def _neurotoxin_attack(*, top_k: float = 0.05, target: int = 0, fraction: float = 0.5,
                       size: int = 2, pattern: str = "square", boost: float = 1.0,
                       max_norm: float | None = None) -> DataAttack:
    """``neurotoxin``: the ``backdoor`` whose update is projected off the ``top_k`` share of
    coordinates that changed most in the global model since this client last saw it
    (:func:`neurotoxin`) [Zhang et al., ICML 2022], then boosted by ``boost`` up to the
    norm ``max_norm`` (:func:`model_replacement`). The first round a client attacks
    without an earlier global model it sends the plain (boosted) backdoor update."""
    _check_boost("neurotoxin", boost, max_norm)
    _check_top_k("neurotoxin", top_k)
    return DataAttack("neurotoxin", {"target": target, "fraction": fraction, "size": size,
                                     "pattern": pattern, "boost": boost,
                                     "max_norm": max_norm, "top_k": top_k})


def _check_boost(where: str, boost: float, max_norm: float | None) -> None:
    _check_positive(where, "boost", boost)
    if max_norm is not None:
        _check_positive(where, "max_norm", max_norm)


def _check_top_k(where: str, top_k: float) -> None:
    if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not (
        0.0 <= float(top_k) < 1.0
    ):
        raise ValueError(
            f"{where}: top_k must be a fraction in [0, 1) (the share of coordinates "
            f"left to the benign clients), got {top_k!r}"
        )


# --------------------------------------------------------------------------- own-update attacks


def boost_update(update: Tensor, factor: float) -> Tensor:
    """Model-replacement boosting [Bagdasaryan et al., AISTATS 2020]: ``factor * update``.

    With FedAvg's global learning rate ``eta`` over ``n`` clients, ``factor ~ n / eta``
    makes the attacker's update replace the global model.

    Parameters
    ----------
    update
        The attacker's update, any shape, floating point.
    factor
        Finite and ``> 0``.

    Returns
    -------
    Tensor
        Same shape, dtype and device as ``update``.

    Examples
    --------
    >>> boost_update(torch.tensor([1.0, -2.0]), 10.0)
    tensor([ 10., -20.])
    """
    _check_update("boost_update", update, flat=False)
    factor = _check_positive("boost_update", "factor", factor)
    return update * factor


def model_replacement(update: Tensor, *, scale: float,
                      max_norm: float | None = None) -> Tensor:
    r"""Constrain-and-scale model replacement [Bagdasaryan et al., AISTATS 2020, Sec. 4].

    FedAvg moves the global model by ``(eta / n) sum_i u_i``; an attacker that sends
    ``gamma u`` with ``gamma = scale = n / eta`` replaces the global model by its own
    backdoored one (the paper's ``L = gamma (X - G) + G``, written on updates). Against a
    server that bounds update norms at ``S = max_norm`` the attacker scales only up to that
    bound (the paper's "scale up to the bound S"):

    .. math:: \tilde{u} = \min\!\left(\gamma, \frac{S}{\|u\|}\right) u

    The constraint the paper adds to the attacker's training loss is a change to local
    training, not to the update, and is not part of this function. In a run config, model
    replacement is the ``backdoor`` data attack with ``boost = gamma`` and ``max_norm = S``
    (``dba`` and ``neurotoxin`` take them too); ``gamma = n / eta`` depends on the server's
    learning rate and on how many clients it averages, which a client does not know, so
    ``boost`` is given explicitly. :func:`boost_update` is this function with
    ``max_norm=None``.

    Parameters
    ----------
    update
        The attacker's backdoored update, any shape, floating point, finite.
    scale
        ``gamma > 0``; ``n / eta`` for ``n`` averaged clients and server learning rate
        ``eta`` (``n`` for plain FedAvg).
    max_norm
        The server's norm bound ``S > 0``, or ``None`` for no bound.

    Returns
    -------
    Tensor
        Same shape, dtype and device as ``update``.

    Raises
    ------
    ValueError
        On a bad update or parameter.

    Examples
    --------
    >>> u = torch.tensor([3.0, 4.0])   # norm 5
    >>> model_replacement(u, scale=10.0)
    tensor([30., 40.])
    >>> model_replacement(u, scale=10.0, max_norm=20.0)   # gamma 10 -> 4
    tensor([12., 16.])
    """
    _check_update("model_replacement", update, flat=False)
    gamma = _check_positive("model_replacement", "scale", scale)
    if max_norm is not None:
        bound = _check_positive("model_replacement", "max_norm", max_norm)
        norm = float(torch.linalg.vector_norm(update.to(torch.float64)))
        if norm * gamma > bound:
            gamma = bound / norm
    return update * gamma


def neurotoxin_mask(benign: Tensor, *, top_k: float) -> Tensor:
    """The coordinates Neurotoxin may write [Zhang et al., ICML 2022]: all but the top-k.

    The ``ceil(top_k d)`` coordinates of largest ``|benign_j|`` are the ones the benign
    clients update most; a backdoor written there is overwritten within a few rounds. The
    mask keeps the others. Ties in ``|benign_j|`` go to the lower index.

    Parameters
    ----------
    benign
        ``(d,)`` the benign direction (on a client: the last change of the global model).
    top_k
        Fraction of the coordinates excluded, in ``[0, 1)``.

    Returns
    -------
    Tensor
        ``(d,)`` bool, ``True`` where the attacker may write, on the device of ``benign``.

    Examples
    --------
    >>> neurotoxin_mask(torch.tensor([0.1, -5.0, 0.2, 3.0]), top_k=0.5)
    tensor([ True, False,  True, False])
    """
    _check_update("neurotoxin", benign, flat=True)
    _check_top_k("neurotoxin", top_k)
    d = benign.shape[0]
    k = math.ceil(float(top_k) * d)
    order = torch.sort(benign.abs(), descending=True, stable=True).indices
    mask = torch.ones(d, dtype=torch.bool, device=benign.device)
    mask[order[:k]] = False
    return mask


def neurotoxin(update: Tensor, benign: Tensor | None, *, top_k: float = 0.05) -> Tensor:
    r"""Neurotoxin [Zhang et al., ICML 2022]: the backdoor update projected off the
    coordinates the benign clients use most.

    .. math:: \tilde{u} = u \odot m, \qquad
              m_j = \mathbb{1}[\, j \notin \text{top-}k\% \text{ of } |b| \,]

    with ``b`` the benign direction (:func:`neurotoxin_mask`). A client sees no other
    client's update; the paper's attacker uses the last change of the global model,
    ``b = w_t - w_{t-1}``, which it can keep from round to round. The paper projects every
    local gradient step; projecting the finished update is the one-shot form of the same
    projection (it needs no change to local training). ``benign=None`` (no earlier global
    model yet) leaves the update as it is. The paper's code excludes the top 5 %
    (``gradmask_ratio = 0.95``), the default here.

    Parameters
    ----------
    update
        ``(d,)`` the attacker's backdoored update.
    benign
        ``(d,)`` the benign direction, or ``None``.
    top_k
        Fraction of the coordinates excluded, in ``[0, 1)``.

    Returns
    -------
    Tensor
        ``(d,)``, dtype and device of ``update`` (a new tensor).

    Raises
    ------
    ValueError
        If ``update`` or ``benign`` is not a finite floating ``(d,)`` vector, their
        shapes differ, or ``top_k`` is out of range.

    Examples
    --------
    >>> neurotoxin(torch.ones(4), torch.tensor([0.1, -5.0, 0.2, 3.0]), top_k=0.5)
    tensor([1., 0., 1., 0.])
    """
    _check_update("neurotoxin", update, flat=True)
    if benign is None:
        return update.clone()
    if not isinstance(benign, Tensor) or benign.shape != update.shape:
        got = tuple(benign.shape) if isinstance(benign, Tensor) else type(benign).__name__
        raise ValueError(
            f"neurotoxin: the benign direction must have the update's shape "
            f"{tuple(update.shape)}, got {got}: pass the change of the same model's weights"
        )
    mask = neurotoxin_mask(benign, top_k=top_k).to(update.device)
    return update * mask


def inflate_examples(true_count: int, factor: float) -> int:
    """The example count a lying client reports: ``floor(true_count * factor + 1/2)``.

    FedAvg weighs clients by their reported count, so ``factor > 1`` inflates the
    attacker's weight [e.g. Sun et al., 2019, "Can you really backdoor FL?"].

    Raises
    ------
    ValueError
        If ``true_count < 1`` or ``factor`` is not finite or below 1.

    Examples
    --------
    >>> inflate_examples(120, 10.0)
    1200
    """
    _check_int("true_count", true_count, low=1)
    factor = _check_positive("inflate_examples", "factor", factor)
    if factor < 1.0:
        raise ValueError(
            f"inflate_examples: factor must be >= 1 (it inflates), got {factor}"
        )
    return math.floor(true_count * factor + 0.5)


@DATA_ATTACKS.register("inflate_examples")
def _inflate_examples_attack(*, factor: float = 100.0) -> DataAttack:
    """``inflate_examples``: the client reports :func:`inflate_examples` of its count."""
    return DataAttack("inflate_examples", {"factor": factor})


def _check_positive(where: str, name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{where}: {name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{where}: {name} must be finite and > 0, got {value}")
    return value


def _check_update(where: str, update: Tensor, *, flat: bool) -> None:
    if not isinstance(update, Tensor) or not update.is_floating_point():
        raise ValueError(f"{where}: the update must be a floating-point tensor")
    if flat and (update.ndim != 1 or update.numel() == 0):
        raise ValueError(f"{where}: the update must be a (d,) vector, got {tuple(update.shape)}")
    if not bool(torch.isfinite(update).all()):
        raise ValueError(f"{where}: the update contains NaN or Inf")


@dataclass(frozen=True)
class UpdatePoisoning:
    """An update poisoning with its parameters bound; build with :func:`get_update_poisoning`.

    ``poison(update, generator=...)`` maps the client's honest ``(d,)`` update to the one it
    sends, same shape, dtype and device.

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> get_update_poisoning("sign_flip", scale=1.0)(torch.ones(2), generator=make_generator(0))
    tensor([-1., -1.])
    """

    name: str
    params: Mapping[str, Any]
    fn: Callable[[Tensor, torch.Generator], Tensor] = field(repr=False, compare=False)

    def __call__(self, update: Tensor, *, generator: torch.Generator) -> Tensor:
        """Return the poisoned ``(d,)`` update.

        Raises
        ------
        ValueError
            If ``update`` is not a non-empty finite floating ``(d,)`` vector.
        TypeError
            If ``generator`` is not a ``torch.Generator``.
        """
        _check_update(self.name, update, flat=True)
        return self.fn(update, _check_generator(self.name, generator))


UPDATE_POISONINGS: Registry[Factory[UpdatePoisoning]] = Registry("update poisoning")


def register_update_poisoning(
    name: str, *, params: Mapping[str, Check] | None = None,
    validate: Callable[[Mapping[str, Any]], None] | None = None,
) -> Callable[[F], F]:
    """Register the decorated ``fn(update, *, hyper..., generator?)`` as the update poisoning
    ``name``; the function is returned unchanged.

    ``params`` checks each hyperparameter, ``validate`` all of them together; a function
    with a keyword-only ``generator`` receives the attack's generator.
    """
    def decorator(fn: F) -> F:
        random = "generator" in inspect.signature(fn).parameters

        def make(p: dict[str, Any]) -> UpdatePoisoning:
            if random:
                return UpdatePoisoning(name, p, lambda u, g: fn(u, generator=g, **p))
            return UpdatePoisoning(name, p, lambda u, g: fn(u, **p))

        UPDATE_POISONINGS.register(name)(Factory(
            name, fn, make, params=params, runtime=("generator",), validate=validate))
        return fn
    return decorator


def get_update_poisoning(name: str, **params: Any) -> UpdatePoisoning:
    """Build the update poisoning registered as ``name`` with ``params``.

    Raises
    ------
    KeyError
        Unknown name (the message lists the valid ones and a close match).
    TypeError
        Unknown parameter.
    ValueError
        Parameter value out of range.

    Examples
    --------
    >>> get_update_poisoning("gaussian", norm=1.0).params
    {'norm': 1.0, 'std': None}
    """
    poisoning: UpdatePoisoning = UPDATE_POISONINGS.build(name, **params)
    return poisoning


def update_poisoning_names() -> list[str]:
    """Sorted names of the registered update poisonings."""
    return UPDATE_POISONINGS.names()


def _norm_or_std(params: Mapping[str, Any]) -> None:
    if params["norm"] is not None and params["std"] is not None:
        raise ValueError("gaussian: give norm (a fixed L2 norm) or std (i.i.d. noise), not both")


@register_update_poisoning("sign_flip", params={"scale": _check_positive})
def sign_flip_update(update: Tensor, *, scale: float = 10.0) -> Tensor:
    """Sign flipping of the client's own update: ``-scale * update``.

    [Li et al., AAAI 2019 (RSA); Allen-Zhu et al., ICLR 2021].

    Returns
    -------
    Tensor
        ``(d,)``, dtype and device of ``update``.

    Examples
    --------
    >>> sign_flip_update(torch.tensor([1.0, -2.0]), scale=2.0)
    tensor([-2.,  4.])
    """
    return -scale * update


@register_update_poisoning("gaussian", params={"norm": optional(_check_positive),
                                       "std": optional(_check_positive)},
                           validate=_norm_or_std)
def gaussian_update(update: Tensor, *, generator: torch.Generator, norm: float | None = None,
                    std: float | None = None) -> Tensor:
    """Random update in place of the client's own [Blanchard et al., NeurIPS 2017].

    - ``std`` given: ``N(0, std^2 I_d)``;
    - else: ``norm * u / ||u||`` with ``u ~ N(0, I_d)`` (a uniformly random direction)
      and ``norm`` the given L2 norm, or ``||update||`` when ``norm`` is ``None`` (so a
      norm-based filter cannot tell it from the honest update).

    Draws come from ``generator`` on its device, then move to ``update``'s device.

    Returns
    -------
    Tensor
        ``(d,)``, dtype and device of ``update``.

    Raises
    ------
    ValueError
        If both ``norm`` and ``std`` are given.

    Examples
    --------
    >>> from aggregation.registry import make_generator
    >>> v = gaussian_update(torch.tensor([3.0, 4.0]), generator=make_generator(0))
    >>> round(float(torch.linalg.vector_norm(v)), 4)
    5.0
    """
    if norm is not None and std is not None:
        raise ValueError("gaussian: give norm or std, not both")
    u = torch.randn(update.shape, generator=generator, device=generator.device,
                    dtype=torch.float64)
    if std is not None:
        return (std * u).to(device=update.device, dtype=update.dtype)
    target = float(torch.linalg.vector_norm(update.to(torch.float64))) if norm is None else norm
    direction = u.div(torch.linalg.vector_norm(u))
    return (target * direction).to(device=update.device, dtype=update.dtype)
