"""The conversion engine of the language tower: a table of `TensorRule`s <-> our param tree.

A family file (`interop/llada.py`, `interop/llada_moe.py`, ...) says, for every parameter our
`Transformer` may have, under which Hugging Face key it is stored and how many leading dims of
our kernel are inputs. Everything else is generic and follows from four conventions:

* PyTorch stores linear weights ``[out, in]`` (transpose); heads are split head-major from the
  output dim (a row-major reshape);
* params under ``blocks`` / ``dense_blocks`` are stacked over layers (one HF tensor per layer,
  ``{i}`` in the key; ``blocks`` layers are numbered after the ``dense_blocks`` ones);
* a key with ``{j}`` is one HF tensor per expert: the param has an expert axis after the layer
  axis (stacked on import, split on export);
* several rules with the same key are one fused HF tensor, their rows concatenated in table
  order (LLaDA2's ``query_key_value``: q | k | v).

Rules whose param the config does not create (QK-norm off, a tied LM head) are skipped. Import
streams one HF tensor at a time into one stacked host buffer per parameter, placed on its
sharding and dropped (host memory peaks at about one stacked parameter); export pulls one layer
(and expert) slice at a time off the devices into the shard writer.

The vision side of LLaDA-V (`interop.siglip`, `interop.llada_v`) is small enough to convert in
memory: `import_tensors` / `export_tensors` run a `TableRow` table (HF name, our path, kind)
between a dict of arrays and nested numpy params, with shapes from the module's abstract params.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from llada_jax.config import ModelConfig
from llada_jax.interop import safetensors_io as io
from llada_jax.model.transformer import Transformer

# Logical axis name of our params -> the config field that sizes it (for error messages).
AXIS_FIELDS = {"embed": "d_model", "norm": "d_model", "heads": "n_heads",
               "kv_heads": "n_kv_heads", "head_dim": "head_dim", "mlp": "mlp_hidden_size",
               "vocab": "vocab_size", "layers": "n_layers"}


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Where one of our parameters lives in a Hugging Face checkpoint.

    path: the parameter's path in our tree. key: the HF key; ``{i}`` is the HF layer index,
    ``{j}`` the expert index. num_in_dims: for kernels, how many leading dims of a slice are
    inputs (the HF tensor is ``[prod(out dims), prod(in dims)]``); None: stored as is.
    tied_to: the key to read instead when a tied checkpoint lacks this one (the LM head).
    """

    path: tuple[str, ...]
    key: str
    num_in_dims: int | None = None
    tied_to: str | None = None

    @property
    def stacked(self) -> bool:   # under dense_blocks / blocks
        return "{i}" in self.key

    @property
    def experts(self) -> bool:
        return "{j}" in self.key


# ----------------------------------------------------------------------------------------------
# Tree helpers and shapes (jax.eval_shape: nothing is allocated).


def get(tree: Mapping, path: Sequence[str]) -> Any:
    for name in path:
        tree = tree[name]
    return tree


@functools.lru_cache(maxsize=16)
def abstract_params(config: ModelConfig) -> dict:
    """Our param tree as boxed `ShapeDtypeStruct`s with logical axis names (no allocation)."""
    init = functools.partial(Transformer(config).init, jax.random.key(0),
                             jnp.zeros((1, 1), jnp.int32))
    return jax.eval_shape(init)["params"]


def to_hf(x: Any, kind: int | str | None) -> Any:
    """Our (per-layer, per-expert) param slice -> the HF tensor (numpy or jax alike). kind: a
    rule's `num_in_dims`, or a `TableRow`'s kind (which adds "flat" and "conv")."""
    if kind == "conv":   # our [p, p, C, width] -> PyTorch OIHW [width, C, p, p]
        return x.transpose(3, 2, 0, 1)
    if kind is None or kind == "flat":
        return x if kind is None else x.reshape(-1)
    return x.reshape(math.prod(x.shape[:kind]), -1).T   # [in, out] -> [out, in]


def _read_into(out: np.ndarray, w: np.ndarray, kind: int | str | None) -> None:
    """Writes the HF tensor `w` as our param slice (the inverse of `to_hf`: PyTorch [out, in]
    transposed, heads split head-major) into the (contiguous) slot `out` without an extra
    copy, cast to its dtype."""
    if kind == "conv":
        np.copyto(out, w.transpose(2, 3, 1, 0), casting="unsafe")
    elif kind is None or kind == "flat":
        np.copyto(out, w.reshape(out.shape), casting="unsafe")
    else:
        np.copyto(out.reshape(math.prod(out.shape[:kind]), -1), w.T, casting="unsafe")


def _hf_shape(rule: TensorRule, abstract: Mapping) -> tuple[tuple[int, ...], str]:
    """The HF tensor shape of one rule's slice, and how it follows from the config."""
    box = get(abstract, rule.path)
    lead = int(rule.stacked) + int(rule.experts)   # one slice: no layer or expert axis
    shape, names = tuple(box.value.shape)[lead:], tuple(box.names)[lead:]
    if rule.num_in_dims is None:   # stored as is: one HF dim per dim of ours
        groups = [((s,), (n,)) for s, n in zip(shape, names, strict=True)]
    else:                          # PyTorch [out, in]: rows are our output dims, flattened
        k = rule.num_in_dims
        groups = [(shape[k:], names[k:]), (shape[:k], names[:k])]
    parts = []
    for sizes, axis_names in groups:
        size = math.prod(sizes)
        fields = "*".join(AXIS_FIELDS.get(n, str(n)) for n in axis_names)
        values = "*".join(str(s) for s in sizes)
        parts.append(f"{fields}={size}" if len(sizes) == 1 else f"{fields}={values}={size}")
    return tuple(math.prod(sizes) for sizes, _ in groups), "[" + ", ".join(parts) + "]"


@dataclasses.dataclass(frozen=True)
class HFTensor:
    """One HF tensor of a layout: the rules (one, or several fused by rows) that fill it."""

    key: str
    rules: tuple[TensorRule, ...]
    shape: tuple[int, ...]
    explanation: str
    rows: tuple[int, ...]          # rows of each rule in the fused tensor
    section: int = 0               # file order: 0 before the layers, 1 a layer's, 2 after

    def instances(self, abstract: Mapping) -> Iterator[tuple[str, int, int, int]]:
        """(key, layer within its stack, expert, HF layer) for every stored copy."""
        rule = self.rules[0]
        box = get(abstract, rule.path)
        layers = range(box.value.shape[0]) if rule.stacked else [0]
        experts = range(box.value.shape[1 if rule.stacked else 0]) if rule.experts else [0]
        offset = 0
        if rule.path[0] == "blocks" and "dense_blocks" in abstract:
            offset = jax.tree.leaves(nn.unbox(abstract["dense_blocks"]))[0].shape[0]
        for layer in layers:
            for expert in experts:
                yield self.key.format(i=offset + layer, j=expert), layer, expert, offset + layer


def hf_tensors(rules: Sequence[TensorRule], config: ModelConfig) -> list[HFTensor]:
    """The HF tensors of a layout for `config`, in file order: the unstacked tensors listed
    before the first stacked rule, then layer by layer, then the rest.

    Rules for params the config does not create are skipped; a param with no rule is refused.
    """
    abstract = abstract_params(config)
    paths = set(flatten_dict(abstract))
    present = [r for r in rules if r.path in paths]
    missing = sorted(paths - {r.path for r in present})
    if missing:
        raise ValueError(f"this checkpoint layout cannot store param(s) "
                         f"{['/'.join(p) for p in missing]} of the model")
    by_key: dict[tuple[str, str], list[TensorRule]] = {}   # (key, stack): fused when shared
    for rule in present:
        by_key.setdefault((rule.key, rule.path[0] if rule.stacked else ""), []).append(rule)
    out = []
    for (key, _), members in by_key.items():
        shapes = [_hf_shape(r, abstract) for r in members]
        rows = tuple(s[0][0] for s in shapes)
        shape = shapes[0][0] if len(members) == 1 else (sum(rows), *shapes[0][0][1:])
        out.append(HFTensor(key, tuple(members), shape, " | ".join(s[1] for s in shapes), rows))
    first_stacked = next((n for n, t in enumerate(out) if t.rules[0].stacked), len(out))
    return [dataclasses.replace(t, section=1 if t.rules[0].stacked else 2 * (n > first_stacked))
            for n, t in enumerate(out)]


# ----------------------------------------------------------------------------------------------
# Checking a checkpoint against a config (headers only).


def check_tensors(stored: Mapping[str, io.StoredTensor], rules: Sequence[TensorRule],
                  config: ModelConfig, tied: bool, layout: str) -> list[str]:
    """What is wrong with the stored tensors for `config` (missing, unexpected, wrong shape or
    non-float), as messages naming the tensor; [] when they fit."""
    abstract = abstract_params(config)
    expected: dict[str, HFTensor] = {}   # key of every stored copy -> its tensor
    for t in hf_tensors(rules, config):
        if tied and t.rules[0].tied_to is not None and t.key not in stored:
            continue   # the LM head is the embedding
        expected.update((key, t) for key, *_ in t.instances(abstract))
    problems = []
    missing = [k for k in expected if k not in stored]
    if missing:
        problems.append(f"{len(missing)} missing tensor(s) that config.json implies: "
                        f"{io.some(missing)}")
    unexpected = sorted(k for k in stored if k not in expected)
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensor(s) for a {config.n_layers}-layer "
                        f"'{layout}' checkpoint: {io.some(unexpected)}")
    for key, t in expected.items():
        if key not in stored:
            continue
        if stored[key].shape != t.shape:
            problems.append(f"tensor {key!r} has shape {list(stored[key].shape)}, but "
                            f"config.json implies {list(t.shape)} = {t.explanation}")
        if stored[key].dtype not in io.FLOAT_DTYPES:
            problems.append(f"tensor {key!r} has dtype {stored[key].dtype}, which cannot be "
                            f"converted to weights (expected one of "
                            f"{sorted(io.FLOAT_DTYPES)})")
    return problems


def _check_divisible(abstract: Mapping, shardings: Mapping) -> None:
    """Refuses, before anything is read, a mesh that cannot split a parameter evenly."""
    for path, box in flatten_dict(abstract).items():
        sharding = get(shardings, path)
        if not isinstance(sharding, NamedSharding):
            continue
        spec = tuple(sharding.spec) + (None,) * (len(box.value.shape) - len(sharding.spec))
        for size, name, axes in zip(box.value.shape, box.names, spec, strict=True):
            axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
            parts = math.prod(sharding.mesh.shape[a] for a in axes)
            if size % parts:
                raise ValueError(
                    f"cannot shard {'/'.join(path)}: its '{name}' dim "
                    f"({AXIS_FIELDS.get(name, name)}={size}) is split over mesh axes "
                    f"{list(axes)} of {parts} devices, which does not divide it")


# ----------------------------------------------------------------------------------------------
# Import.


def load_params(directory: str, stored: Mapping[str, io.StoredTensor],
                rules: Sequence[TensorRule], config: ModelConfig,
                mesh: jax.sharding.Mesh | None = None, rules_table: Sequence | None = None
                ) -> dict:
    """Streams checked tensors into params of `config.param_dtype`, each placed on its
    sharding (`io.param_shardings` on `mesh` by `rules_table`)."""
    dtype = io.DTYPES[config.param_dtype]
    abstract = abstract_params(config)
    shardings = io.param_shardings(abstract, mesh, rules_table)
    _check_divisible(abstract, shardings)
    params: dict = {}   # path -> array
    with contextlib.closing(io.ShardReader(directory)) as reader:
        for tensor in hf_tensors(rules, config):
            for n, rule in enumerate(tensor.rules):
                start = sum(tensor.rows[:n])
                host = np.empty(get(abstract, rule.path).value.shape, dtype)
                for key, layer, expert, _ in tensor.instances(abstract):
                    if key not in stored and rule.tied_to is not None:
                        key = rule.tied_to   # tied: the LM head is wte, stored [vocab, d] too
                    # Its rows of a fused tensor (all of them when not fused): a view.
                    w = reader.read(key, stored[key].shard)[start:start + tensor.rows[n]]
                    slot = host[layer] if rule.stacked else host
                    _read_into(slot[expert] if rule.experts else slot, w, rule.num_in_dims)
                    del w
                reader.close()
                params[rule.path] = io.place(host, get(shardings, rule.path))
                del host   # the devices hold it now
    return unflatten_dict(params)


# ----------------------------------------------------------------------------------------------
# Export.


@functools.lru_cache(maxsize=64)
def _host_slice_fn(rules: tuple[TensorRule, ...], dtype: str,
                   mesh: jax.sharding.Mesh | None) -> Callable:
    """A jitted (params of the rules, layer, expert) -> the HF tensor in `dtype`.

    On a mesh the result is replicated, so every process can copy it to its host whole (the
    indices are arguments: one compilation per HF tensor, not per layer).
    """
    def slice_one(xs, layer, expert):
        parts = []
        for x, rule in zip(xs, rules, strict=True):
            if rule.stacked:
                x = jax.lax.dynamic_index_in_dim(x, layer, 0, keepdims=False)
            if rule.experts:
                x = jax.lax.dynamic_index_in_dim(x, expert, 0, keepdims=False)
            parts.append(to_hf(x, rule.num_in_dims).astype(io.DTYPES[dtype]))
        return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=0)

    if mesh is not None:
        return jax.jit(slice_one, out_shardings=NamedSharding(mesh, P()))
    return jax.jit(slice_one)


def check_params(params: Mapping, config: ModelConfig) -> None:
    """Refuses params whose tree or shapes differ from what `config` creates."""
    expected = {p: tuple(box.value.shape)
                for p, box in flatten_dict(abstract_params(config)).items()}
    found = flatten_dict(params)
    unexpected = sorted("/".join(p) for p in found.keys() - expected.keys())
    if unexpected:
        raise ValueError(f"params have parameter(s) the language tower does not: {unexpected}")
    for path, shape in expected.items():
        if path not in found:
            raise ValueError(f"params lack {'/'.join(path)} (expected shape {list(shape)})")
        if tuple(found[path].shape) != shape:
            raise ValueError(f"param {'/'.join(path)} has shape {list(found[path].shape)}, but "
                             f"the config implies {list(shape)}")


def _produce(params: Mapping, tensor: HFTensor, dtype: str, layer: int, expert: int
             ) -> np.ndarray:
    """One stored copy of `tensor` (its `layer` and `expert` slice) in `dtype`, on the host."""
    # numpy params go to the default device; a jax.Array comes back as it is (sharding kept).
    xs = [jnp.asarray(get(params, r.path)) for r in tensor.rules]
    mesh = xs[0].sharding.mesh if isinstance(xs[0].sharding, NamedSharding) else None
    return io.to_host(_host_slice_fn(tensor.rules, dtype, mesh)(
        xs, jnp.int32(layer), jnp.int32(expert)))


def planned_tensors(params: Mapping, rules: Sequence[TensorRule], config: ModelConfig,
                    dtype: str) -> list[io.PlannedTensor]:
    """The HF tensors of `params` in file order, each produced from the devices when written
    (one layer/expert slice at a time)."""
    abstract = abstract_params(config)
    instances = [(hf_layer, t, key, layer, expert) for t in hf_tensors(rules, config)
                 for key, layer, expert, hf_layer in t.instances(abstract)]
    # Layer by layer (a shard holds whole layers); sorted() is stable: table order, then expert.
    instances.sort(key=lambda s: (s[1].section, s[0] if s[1].section == 1 else 0))
    return [(key, io.DTYPES[dtype], t.shape,
             functools.partial(_produce, params, t, dtype, layer, expert))
            for _, t, key, layer, expert in instances]


# ----------------------------------------------------------------------------------------------
# In-memory tables (the vision side of LLaDA-V: `interop.siglip`, `interop.llada_v`): HF name ->
# array in, nested numpy params out, and back.

# One row of an in-memory table: (Hugging Face name relative to the prefix, path in our params,
# kind). A name with ``{i}`` is one tensor per layer of a param stacked on a leading axis.
# kind: how many leading dims of our kernel are inputs of the PyTorch Linear ``[out, in]``
# (heads split head-major), None: stored as is, "flat": our [heads, head_dim] is one HF vector,
# "conv": our [p, p, C, width] is the PyTorch OIHW kernel [width, C, p, p].
TableRow = tuple[str, tuple[str, ...], int | str | None]


def listing(names: Iterable[str], limit: int = 12) -> str:
    names = sorted(names)
    more = f" ... and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


def import_tensors(tensors: Mapping[str, Any], table: Sequence[TableRow], abstract: Mapping,
                   prefix: str, dtype: str, missing_what: str) -> dict:
    """HF tensors (name -> array) -> our params by `table`, shaped like the abstract params
    `abstract` (as `init` gives them, in their logical boxes), in `dtype`. A wrong shape is a
    ValueError naming the tensor; missing tensors are one ValueError "missing {missing_what}:
    names"."""
    abstract = nn.unbox(abstract)
    params: dict = {}   # path -> array
    missing: list[str] = []
    for rel, path, kind in table:
        stacked = "{i}" in rel
        host = np.empty(get(abstract, path).shape, io.DTYPES[dtype])
        for i in range(host.shape[0]) if stacked else [0]:
            name = prefix + rel.format(i=i)
            if name not in tensors:
                missing.append(name)
                continue
            slot = host[i] if stacked else host
            t = np.asarray(tensors[name])
            expected = to_hf(slot, kind).shape   # numpy views: nothing is computed
            if tuple(t.shape) != expected:
                raise ValueError(f"tensor {name}: expected shape {expected} (Hugging Face "
                                 f"layout), found {tuple(t.shape)}")
            _read_into(slot, t, kind)
        params[path] = host   # incomplete only when tensors are missing: refused below
    if missing:
        raise ValueError(f"missing {missing_what}: {listing(missing)}")
    return unflatten_dict(params)


def export_tensors(params: Mapping[str, Any], table: Sequence[TableRow], prefix: str,
                   dtype: str | None = None) -> dict[str, np.ndarray]:
    """Our params -> HF name -> array by `table` (the inverse of `import_tensors`), in table
    order, layer by layer within a row; dtype: of the arrays (default: that of the params)."""
    out = {}
    for rel, path, kind in table:
        param = np.asarray(get(params, path))
        for i, a in enumerate(param) if "{i}" in rel else [(0, param)]:
            hf = to_hf(a, kind)
            out[prefix + rel.format(i=i)] = hf if dtype is None else hf.astype(io.DTYPES[dtype])
    return out


def table_names(table: Sequence[TableRow], prefix: str, layers: int) -> set[str]:
    """Every HF name of `table` under `prefix`, with `layers` layers."""
    return {prefix + rel.format(i=i) for rel, _, _ in table
            for i in (range(layers) if "{i}" in rel else [0])}
