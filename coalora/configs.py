"""Quantization configurations: one `LayerQuant` per weight matrix, the space they are drawn from,
and a model-wide `Configuration` with its average bits, JSON form and index-vector encoding.

A configuration is tied to one backbone's `Layout` (its quantized matrices, in model order), so a
configuration written for MiniLM cannot silently be applied to SmolLM2.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, fields

import numpy as np

from coalora.names import lookup
from coalora.quant import SCALE_DTYPE_BITS, storage_bits

KINDS = ("nf", "int")
BITS = (2, 3, 4, 8)
SCALE_BITS = (2, 3, 4, 8)
SCALE_DTYPES = tuple(SCALE_DTYPE_BITS)  # ("bf16", "fp16", "fp32")
BLOCK_SIZES = (16, 32, 64)
GROUP_SIZES = (16, 64, 256)
# The five per-matrix choices, in the order of the paper's Table 1 and of the index vector.
FIELDS = ("bits", "scale_bits", "scale_dtype", "block_size", "group_size")


def _check_choice(field: str, value, valid: Iterable) -> None:
    valid = tuple(valid)
    if value not in valid or isinstance(value, bool):
        raise ValueError(f"invalid {field}={value!r}; valid choices: {', '.join(map(repr, valid))}")


@dataclass(frozen=True)
class LayerQuant:
    """How one weight matrix is quantized: code (NF-k or INT-k), scale bits b0, second-level scale
    dtype b1, block size B0 and group size B1 (docs/method.md#configuration-space)."""

    kind: str = "nf"
    bits: int = 4
    scale_bits: int = 8
    scale_dtype: str = "fp32"
    block_size: int = 64
    group_size: int = 256

    def __post_init__(self):
        _check_choice("kind", self.kind, KINDS)
        _check_choice("bits", self.bits, BITS)
        _check_choice("scale_bits", self.scale_bits, SCALE_BITS)
        _check_choice("scale_dtype", self.scale_dtype, SCALE_DTYPES)
        _check_choice("block_size", self.block_size, BLOCK_SIZES)
        _check_choice("group_size", self.group_size, GROUP_SIZES)

    @property
    def storage_bits(self) -> float:
        """Bits per weight including both levels of scales: b + b0/B0 + bits(b1)/(B0*B1)."""
        return storage_bits(self)

    def __str__(self) -> str:
        return (f"{self.kind}{self.bits}/s{self.scale_bits}/{self.scale_dtype}"
                f"/B0={self.block_size}/B1={self.group_size}")

    @classmethod
    def from_dict(cls, d: Mapping) -> LayerQuant:
        if not isinstance(d, Mapping):
            raise ValueError(f"a layer quantization must be a JSON object, got {d!r}")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown layer quantization field(s) {sorted(unknown)}; valid fields: {sorted(names)}")
        return cls(**d)


# What bitsandbytes' 4-bit layers hold natively (NF4, bnb_4bit_use_double_quant): NF4 codes in blocks of
# 64 whose absmax scales are stored in 8 bits, in groups of 256 with an fp32 second-level scale.
BNB_NF4 = LayerQuant("nf", 4, 8, "fp32", 64, 256)


@dataclass(frozen=True)
class QuantSpace:
    """The per-matrix choices a search or allocation may pick from (432 options per matrix for the
    paper's NF space; the integer space of Table 1 swaps NF-k codes for INT-k)."""

    name: str
    kind: str
    bits: tuple = BITS
    scale_bits: tuple = SCALE_BITS
    scale_dtype: tuple = SCALE_DTYPES
    block_size: tuple = BLOCK_SIZES
    group_size: tuple = GROUP_SIZES

    def __post_init__(self):
        _check_choice("kind", self.kind, KINDS)
        for field in FIELDS:
            choices = getattr(self, field)
            if not choices:
                raise ValueError(f"space {self.name!r} has no choices for {field}")
            for value in choices:
                LayerQuant(**{"kind": self.kind, field: value})  # validates each choice

    @classmethod
    def nf(cls) -> QuantSpace:
        """The paper's NF space (docs/method.md#configuration-space): 4 x 4 x 3 x 3 x 3 = 432 options per matrix."""
        return cls(name="nf", kind="nf")

    @classmethod
    def integer(cls) -> QuantSpace:
        """Integer mixed precision (the poster's Table 1): int2/3/4/8 with the same scale fields."""
        return cls(name="int", kind="int")

    @classmethod
    def named(cls, name: str) -> QuantSpace:
        return lookup({"nf": cls.nf, "int": cls.integer}, name, "quantization space")()

    @property
    def n_choices(self) -> tuple[int, ...]:
        """Number of choices per field, in FIELDS order, e.g. (4, 4, 3, 3, 3)."""
        return tuple(len(getattr(self, f)) for f in FIELDS)

    def options(self) -> list[LayerQuant]:
        """Every LayerQuant of the space, in index order (the last field varies fastest)."""
        return [LayerQuant(self.kind, *values) for values in itertools.product(*(getattr(self, f) for f in FIELDS))]

    def __contains__(self, lq: LayerQuant) -> bool:
        return lq.kind == self.kind and all(getattr(lq, f) in getattr(self, f) for f in FIELDS)

    def index_of(self, lq: LayerQuant) -> tuple[int, ...]:
        """The choice index of each field of `lq` (raises if `lq` is not in this space)."""
        if lq.kind != self.kind:
            raise ValueError(f"layer quantization kind {lq.kind!r} is not in space {self.name!r} (kind {self.kind!r})")
        for f in FIELDS:
            _check_choice(f"{f} in space {self.name!r}", getattr(lq, f), getattr(self, f))
        return tuple(getattr(self, f).index(getattr(lq, f)) for f in FIELDS)

    def from_index(self, index: Iterable[int]) -> LayerQuant:
        index = tuple(int(i) for i in index)
        if len(index) != len(FIELDS):
            raise ValueError(f"an index has {len(FIELDS)} entries ({', '.join(FIELDS)}), got {len(index)}")
        values = []
        for f, i, n in zip(FIELDS, index, self.n_choices):
            if not 0 <= i < n:
                raise ValueError(f"index {i} for {f} out of range; valid: 0..{n - 1}")
            values.append(getattr(self, f)[i])
        return LayerQuant(self.kind, *values)

    def bits_range(self) -> tuple[float, float]:
        """Smallest and largest storage bits of any single option of the space."""
        bits = [o.storage_bits for o in self.options()]
        return min(bits), max(bits)


@dataclass(frozen=True)
class MatrixSpec:
    """One quantized weight matrix of a backbone: module name, (out, in) shape, transformer block
    index and module type (query, key, ..., down_proj) - what theta embeds besides the config."""

    name: str
    shape: tuple[int, int]
    block: int
    module_type: str

    @property
    def numel(self) -> int:
        return int(self.shape[0]) * int(self.shape[1])


@dataclass(frozen=True)
class Layout:
    """The ordered quantized matrices of one backbone: what a Configuration must cover exactly."""

    backbone: str
    matrices: tuple[MatrixSpec, ...]

    def __post_init__(self):
        if not self.matrices:
            raise ValueError(f"backbone {self.backbone!r} has no quantized matrices")
        names = [m.name for m in self.matrices]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate matrix names in the layout of {self.backbone!r}")

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(m.name for m in self.matrices)

    @property
    def numels(self) -> np.ndarray:
        return np.array([m.numel for m in self.matrices], dtype=np.int64)

    @property
    def n_blocks(self) -> int:
        return max(m.block for m in self.matrices) + 1

    @property
    def module_types(self) -> tuple[str, ...]:
        """Distinct module types in order of first appearance."""
        return tuple(dict.fromkeys(m.module_type for m in self.matrices))

    def __len__(self) -> int:
        return len(self.matrices)

    def average_bits(self, per_matrix_bits: Iterable[float]) -> float:
        """Numel-weighted mean of per-matrix storage bits."""
        bits = np.asarray(list(per_matrix_bits), dtype=np.float64)
        if bits.shape != (len(self),):
            raise ValueError(f"need {len(self)} per-matrix bit values for {self.backbone!r}, got {bits.shape[0]}")
        return float((bits * self.numels).sum() / self.numels.sum())


class Configuration:
    """A model-wide quantization configuration: matrix name -> LayerQuant for one backbone layout."""

    def __init__(self, layout: Layout, layers: Mapping[str, LayerQuant]):
        missing = [n for n in layout.names if n not in layers]
        extra = [n for n in layers if n not in set(layout.names)]
        if missing or extra:
            raise ValueError(
                f"configuration does not match backbone {layout.backbone!r} ({len(layout)} matrices): "
                f"missing {missing[:3]}{'...' if len(missing) > 3 else ''} ({len(missing)}), "
                f"extra {extra[:3]}{'...' if len(extra) > 3 else ''} ({len(extra)})")
        for name in layout.names:
            if not isinstance(layers[name], LayerQuant):
                raise ValueError(f"matrix {name!r}: expected a LayerQuant, got {layers[name]!r}")
        self.layout = layout
        self.layers = {name: layers[name] for name in layout.names}

    @property
    def backbone(self) -> str:
        return self.layout.backbone

    def __getitem__(self, name: str) -> LayerQuant:
        return self.layers[name]

    def __iter__(self):
        return iter(self.layers.items())

    def __len__(self) -> int:
        return len(self.layers)

    def __eq__(self, other) -> bool:
        return (isinstance(other, Configuration) and self.backbone == other.backbone
                and self.layers == other.layers)

    def __hash__(self) -> int:
        return hash(self.digest())

    def __repr__(self) -> str:
        return f"Configuration({self.backbone!r}, {len(self)} matrices, {self.avg_bits:.3f} bits)"

    @property
    def avg_bits(self) -> float:
        """Numel-weighted average storage bits over the quantized matrices, scale overhead included."""
        return self.layout.average_bits(lq.storage_bits for lq in self.layers.values())

    # ---- constructors ------------------------------------------------------------------------
    @classmethod
    def uniform(cls, layout: Layout, lq: LayerQuant) -> Configuration:
        return cls(layout, {name: lq for name in layout.names})

    @classmethod
    def random(cls, layout: Layout, space: QuantSpace, seed: int) -> Configuration:
        """Each matrix gets an independent uniformly random option of `space` (seeded)."""
        rng = np.random.default_rng(seed)
        index = np.stack([rng.integers(0, n, size=len(layout)) for n in space.n_choices], axis=1)
        return cls.decode(index.reshape(-1), space, layout)

    # ---- index vectors -----------------------------------------------------------------------
    def encode(self, space: QuantSpace) -> np.ndarray:
        """Integer vector of length 5*N: per matrix (in layout order) the five choice indices."""
        return np.array([space.index_of(lq) for lq in self.layers.values()], dtype=np.int64).reshape(-1)

    @classmethod
    def decode(cls, vector, space: QuantSpace, layout: Layout) -> Configuration:
        vector = np.asarray(vector)
        k = len(FIELDS)
        if vector.ndim != 1 or vector.shape[0] != k * len(layout):
            raise ValueError(f"an index vector for {layout.backbone!r} has length {k * len(layout)} "
                             f"({len(layout)} matrices x {k} fields), got shape {tuple(vector.shape)}")
        rows = vector.reshape(len(layout), k)
        return cls(layout, {name: space.from_index(row) for name, row in zip(layout.names, rows)})

    # ---- JSON ------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"backbone": self.backbone, "layers": {n: asdict(lq) for n, lq in self.layers.items()}}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=False)

    def digest(self) -> str:
        """Short content hash: the same configuration always gets the same id."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]

    @classmethod
    def from_json(cls, text: str, layout: Layout) -> Configuration:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(f"malformed configuration JSON: {err}") from err
        if not isinstance(data, dict) or "layers" not in data or "backbone" not in data:
            raise ValueError("configuration JSON must be an object with keys 'backbone' and 'layers'")
        if data["backbone"] != layout.backbone:
            raise ValueError(f"configuration is for backbone {data['backbone']!r}, not {layout.backbone!r}")
        if not isinstance(data["layers"], dict):
            raise ValueError("configuration JSON 'layers' must map matrix names to layer quantizations")
        return cls(layout, {name: LayerQuant.from_dict(d) for name, d in data["layers"].items()})


def unique(configurations: Iterable[Configuration]) -> list[Configuration]:
    """The configurations without repeats (equal digests), in order of first appearance."""
    return list({c.digest(): c for c in configurations}.values())
