"""A reader's names for config keys and values (:class:`Labeller`, :class:`LabelPlan`,
:data:`READER_NAMES`, :data:`READER_VALUES`), label maps (:func:`load_labels`) and the
keys a figure's title states (:data:`TITLE_KEYS`)."""

from __future__ import annotations

import ast
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .keys import _fmt_value, _sort_key

#: A reader's name for common config keys: what every figure's legend, axes and title
#: call them (``model.posterior.flow`` and ``model.prior.flow`` must not both read
#: "flow"). Other keys read as the key without its first section
#: (``model.posterior.options.num_hidden`` -> ``posterior.options.num_hidden``).
READER_NAMES: dict[str, str] = {
    "data.dataset": "data",
    "data.binarization": "binarisation",
    "data.batch_size": "batch size",
    "model.latent_dim": "latent dim",
    "model.likelihood": "likelihood",
    "model.encoder.name": "encoder",
    "model.decoder.name": "decoder",
    "model.posterior.flow": "posterior",
    "model.posterior.num_layers": "flow steps",
    "model.posterior.hidden": "flow width",
    "model.prior.name": "prior",
    "model.prior.flow": "prior flow",
    "model.prior.num_layers": "prior flow steps",
    "model.prior.num_components": "prior components",
    "train.objective": "objective",
    "train.k": "training k",
    "train.lr": "learning rate",
    "train.optimizer": "optimiser",
    "train.steps": "training steps",
    "train.kl_warmup_steps": "KL warm-up steps",
    "train.free_bits": "free bits",
}
_FLOW_VALUES = {
    "iaf": "IAF",
    "gated_iaf": "gated IAF",
    "conv_iaf": "conv IAF",
    "maf": "MAF",
    "realnvp": "RealNVP",
    "realnvp_image": "RealNVP (image)",
    "nice": "NICE",
    "glow": "Glow",
    "ffjord": "FFJORD",
    "nsf_coupling": "NSF coupling",
    "nsf_autoregressive": "NSF autoregressive",
    "sylvester_householder": "Sylvester (Householder)",
    "sylvester_orthogonal": "Sylvester (orthogonal)",
    "sylvester_triangular": "Sylvester (triangular)",
}
#: A reader's name for common values, per key (the rest print as they are); legends and
#: heat maps list the values in this order (baselines first), the rest after them.
READER_VALUES: dict[str, dict[str, str]] = {
    "model.posterior.flow": {"none": "diagonal Gaussian", **_FLOW_VALUES},
    "model.prior.flow": dict(_FLOW_VALUES),
    "model.prior.name": {
        "standard_normal": "N(0, I)",
        "learned_gaussian": "learned Gaussian",
        "mog": "MoG",
        "vamp": "VampPrior",
    },
    "data.dataset": {
        "mnist": "MNIST",
        "fashion_mnist": "Fashion-MNIST",
        "binarized_mnist": "static MNIST",
        "cifar10": "CIFAR-10",
    },
    "train.objective": {"elbo": "ELBO", "iwae": "IWAE"},
}
#: Keys stated once in a figure's title when they are the same in every run (with the
#: keys of a user's label map); the full config is in results.json.
TITLE_KEYS: tuple[str, ...] = (
    "data.dataset",
    "model.latent_dim",
    "model.posterior.flow",
    "model.posterior.num_layers",
    "model.prior.name",
    "model.prior.flow",
    "train.objective",
    "train.k",
)
_SEP = " · "


def _fallback_name(key: str) -> str:
    """The key without its first section (``model.prior.flow`` -> ``prior.flow``)."""
    return key.split(".", 1)[1] if "." in key else key


def load_labels(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a label map from a TOML (``.toml``) or JSON file.

    The map takes config keys to a reader's name, or to ``{"name": ..., "values":
    {value: name}}``::

        "model.posterior.flow" = "posterior"
        ["model.prior.name"]
        name = "prior"
        values = { vamp = "VampPrior (500 pseudo-inputs)" }
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    if p.suffix == ".toml":
        import tomllib

        return tomllib.loads(text)
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"{p}: a label map is a JSON object (config key -> name)")
    return data


class Labeller:
    """A reader's names for config keys and values: :data:`READER_NAMES` and
    :data:`READER_VALUES`, overridden by a per-experiment label map (see
    :func:`load_labels`)."""

    def __init__(self, labels: Mapping[str, Any] | None = None) -> None:
        self.names = dict(READER_NAMES)
        self.values = {k: dict(v) for k, v in READER_VALUES.items()}
        self.user_keys = list(labels or {})
        for key, spec in (labels or {}).items():
            if isinstance(spec, str):
                self.names[key] = spec
            elif isinstance(spec, Mapping) and set(spec) <= {"name", "values"}:
                if "name" in spec:
                    self.names[key] = str(spec["name"])
                for value, name in dict(spec.get("values", {})).items():
                    self.values.setdefault(key, {})[str(value)] = str(name)
            else:
                raise ValueError(
                    f"label map entry {key!r}: give a name or {{name = ..., values = "
                    f"{{value = name}}}}, got {spec!r}"
                )

    def name(self, key: str) -> str:
        """A reader's name of ``key``."""
        return self.names.get(key) or _fallback_name(key)

    def value(self, key: str, value: Any) -> str:
        """A reader's name of ``value`` under ``key``."""
        text = _fmt_value(value)
        return self.values.get(key, {}).get(text, text)

    def plan(self, configs: Sequence[Mapping[str, Any]], keys: Sequence[str]) -> LabelPlan:
        """The legend entries for series that differ in ``keys`` (see :class:`LabelPlan`)."""
        return LabelPlan(self, configs, keys)

    def title(self, configs: Sequence[Mapping[str, Any]], varying: Sequence[str]) -> str:
        """``"data: static MNIST · latent dim: 40 · prior: VampPrior"``: the title keys
        (:data:`TITLE_KEYS` and the label map's) that are the same in every config and
        not in ``varying``; values reading "none" are left out."""
        parts = []
        for key in dict.fromkeys([*TITLE_KEYS, *self.user_keys]):
            if key in varying or not configs or any(key not in c for c in configs):
                continue
            if key == "model.posterior.num_layers" and not any(_applies(key, c) for c in configs):
                continue  # no posterior flow: its number of steps says nothing
            if key in _NOT_TOPDOWN and key not in self.user_keys and all(map(_topdown, configs)):
                continue  # a top-down model has neither: per-group latents and priors
            if len({repr(c[key]) for c in configs}) == 1:
                text = self.value(key, configs[0][key])
                if key == "model.latent_dim" and key not in self.user_keys:
                    uppers = {_upper_latent_dims(c) for c in configs}
                    if len(uppers) == 1 and (dims := uppers.pop()):
                        # a hierarchy: z1 is model.latent_dim, the upper layers add theirs
                        zs = " + ".join(f"z{i + 1}" for i in range(len(dims) + 1))
                        sizes = " + ".join(str(d) for d in (configs[0][key], *dims))
                        parts.append(f"latent dims ({zs}): {sizes}")
                        continue
                if text != "none":
                    name = self.name(key)
                    if key == "model.posterior.num_layers" and not all(
                        _applies(key, c) for c in configs
                    ):
                        name += " (flow posteriors)"  # some rows have none: not theirs
                    parts.append(f"{name}: {text}")
        return _SEP.join(parts)


#: keys that mean something only under another key's value: key -> (that key, the values
#: under which it does not apply)
_NOT_APPLICABLE: dict[str, tuple[str, tuple[Any, ...]]] = {
    "model.posterior.num_layers": ("model.posterior.flow", ("none", None)),
    "model.posterior.hidden": ("model.posterior.flow", ("none", None)),
    "model.posterior.options": ("model.posterior.flow", ("none", None)),
}


#: model keys a top-down model (``model.topdown``) does not use (the config refuses
#: setting them): its latents and priors are per group, inside its blocks
_NOT_TOPDOWN = ("model.latent_dim", "model.prior.name", "model.prior.flow")


def _topdown(config: Mapping[str, Any]) -> bool:
    """Whether a (flattened) run config is a top-down model's."""
    # a record keeps a missing table as the text "none"
    flat = config.get("model.topdown")
    return any(k.startswith("model.topdown.") for k in config) or flat not in (None, "none", "")


def _upper_latent_dims(config: Mapping[str, Any]) -> tuple[int, ...]:
    """The latent sizes of a bottom-up hierarchy's upper layers (``model.upper_layers``,
    flattened to its text in a record), ``()`` for a one-layer model or an unreadable
    value."""
    raw = config.get("model.upper_layers")
    try:
        layers = ast.literal_eval(raw) if isinstance(raw, str) else raw
        return tuple(int(layer["latent_dim"]) for layer in layers or ())
    except (ValueError, SyntaxError, TypeError, KeyError):
        return ()


def _applies(key: str, config: Mapping[str, Any]) -> bool:
    """Whether ``key`` means anything for ``config`` (see :data:`_NOT_APPLICABLE`; a
    flattened option such as ``model.posterior.options.num_hidden`` falls under its
    parent's rule). Only a config that sets the deciding key can say no: a table row
    holds just its grouping keys."""
    rule = next(
        (r for k, r in _NOT_APPLICABLE.items() if key == k or key.startswith(k + ".")), None
    )
    return rule is None or rule[0] not in config or config[rule[0]] not in rule[1]


class LabelPlan:
    """Legend entries for a set of series that differ in ``keys``.

    Each entry is one thing a reader tells the series apart by, with a unique name: a
    config key, or the prior's ``name`` and ``flow`` merged into one "prior" entry (the
    flow's name when the prior is a flow) when that loses nothing for these configs.
    ``label(config)`` joins them: ``"posterior: IAF · prior: RealNVP"``, leaving out
    entries a config does not set (a key it lacks, or empty options ``{}``) as long as
    the labels stay distinct.
    """

    def __init__(
        self, labeller: Labeller, configs: Sequence[Mapping[str, Any]], keys: Sequence[str]
    ) -> None:
        self.labeller = labeller
        self.configs = list(configs)
        self._compact: bool | None = None
        self.entries: list[tuple[str, tuple[str, ...]]] = []
        keys = list(keys)
        merged = "model.prior.name" in keys and "model.prior.flow" in keys
        if merged:
            seen: dict[str, str] = {}
            for c in configs:
                raw = repr((c.get("model.prior.name"), c.get("model.prior.flow")))
                if seen.setdefault(self._prior(c), raw) != raw:
                    merged = False  # two priors would read the same: keep both keys
                    break
        for key in keys:
            if merged and key == "model.prior.flow":
                continue
            if merged and key == "model.prior.name":
                self.entries.append((labeller.name(key), ("model.prior.name", "model.prior.flow")))
            else:
                self.entries.append((labeller.name(key), (key,)))
        # No two entries may share a name: fall back to the longer forms of the key.
        for rename in (_fallback_name, lambda k: k):
            names = [n for n, _ in self.entries]
            self.entries = [
                (rename(ks[0]) if names.count(n) > 1 else n, ks) for n, ks in self.entries
            ]

    def _prior(self, config: Mapping[str, Any]) -> str:
        name = config.get("model.prior.name")
        if name == "flow":
            return self.labeller.value("model.prior.flow", config.get("model.prior.flow"))
        return self.labeller.value("model.prior.name", name)

    @property
    def names(self) -> list[str]:
        """The entries' names, in order."""
        return [n for n, _ in self.entries]

    def values(self, config: Mapping[str, Any]) -> tuple[str, ...]:
        """Each entry's reader value for ``config``."""
        out = []
        for _, keys in self.entries:
            if len(keys) == 2:
                out.append(self._prior(config))
            elif _applies(keys[0], config):
                out.append(self.labeller.value(keys[0], config.get(keys[0])))
            else:  # a leftover default (the flow steps of a posterior without a flow)
                out.append("—")
        return tuple(out)

    def sort_key(self, config: Mapping[str, Any], only: int | None = None) -> list[tuple]:
        """Order of series: by entry, values in :data:`READER_VALUES` order, then numbers
        by size and other strings alphabetically (``only``: that entry alone)."""
        out: list[tuple] = []
        for i, (_, keys) in enumerate(self.entries):
            if only is not None and i != only:
                continue
            for key in keys:
                value = config.get(key)
                order = list(self.labeller.values.get(key, {}))
                text = _fmt_value(value)
                kind, number, string = _sort_key(value)
                rank = order.index(text) if text in order else len(order)
                out.append((rank, kind, number, string.casefold()))
        return out

    def is_set(self, config: Mapping[str, Any], index: int) -> bool:
        """Whether ``config`` sets entry ``index``: has the key, not as ``{}``, and the
        key applies to it (a posterior without a flow has no flow steps: its
        ``num_layers`` is a leftover default that a legend must not print)."""
        return all(
            config.get(k) not in (None, "{}") and _applies(k, config)
            for k in self.entries[index][1]
        )

    def label(self, config: Mapping[str, Any], skip: Sequence[int] = ()) -> str:
        """``"posterior: IAF · prior: RealNVP"`` (entries at the ``skip`` indices left out)."""
        if self._compact is None:
            compact = [self._join(c, (), True) for c in self.configs]
            self._compact = all(compact) and len(set(compact)) == len(compact)
        return self._join(config, skip, self._compact) or self._join(config, skip, False)

    def _join(self, config: Mapping[str, Any], skip: Sequence[int], compact: bool) -> str:
        return _SEP.join(
            f"{name}: {value}"
            for i, (name, value) in enumerate(zip(self.names, self.values(config), strict=True))
            if i not in skip and (not compact or self.is_set(config, i))
        )
