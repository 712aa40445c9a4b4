"""Interventions that check a graph against real forward passes: zero one node's output.

*Frozen*: the forward pass runs with every attention pattern, norm scale and MLP gate replaced by
its value on the clean prompt (substituted at the hooks, not differentiated), so the network is the
linear one the graph describes; zeroing a node then changes the objective J by exactly minus its
``total_effect``. With a ``receiver``, every other node's output is also held at its clean value,
so only the direct path remains and the receiver's value changes by exactly minus the edge.
*Ordinary*: the same ablation in the unmodified model, beside it, so the linearisation gap shows.
"""

from __future__ import annotations

import contextlib
import html
import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lin_lens._hooks import HookSet, zeroed
from lin_lens._precision import exact_matmul
from lin_lens._tl import LOGITS, hook_dict, unique_hooks
from lin_lens.errors import InvalidArgumentError, UnsupportedFeatureError
from lin_lens.freeze import read_before_cut
from lin_lens.graph._naming import is_gated
from lin_lens.graph.nodes import SOURCES


@dataclass
class Ablation:
    """The change in ``receiver`` (``"J"``: the objective) when ``node``'s output is zeroed."""

    node: str
    receiver: str
    predicted: float  # by the graph: -total_effect (J) or -edge (a receiver)
    frozen: float  # measured with patterns, scales and gates frozen
    ordinary: float  # measured in the ordinary model

    @property
    def error(self) -> float:
        """``|frozen − predicted|`` relative to ``|predicted|`` (absolute when it is 0)."""
        den = abs(self.predicted)
        return abs(self.frozen - self.predicted) / den if den > 0 else abs(self.frozen)

    def __repr__(self) -> str:
        return (f"Ablation(zero {self.node} → Δ{self.receiver}: predicted {self.predicted:+.6g}, "
                f"frozen {self.frozen:+.6g} (rel. err {self.error:.1e}), "
                f"ordinary {self.ordinary:+.6g})")

    def _repr_html_(self) -> str:
        cells = [self.node, self.receiver, f"{self.predicted:+.6g}", f"{self.frozen:+.6g}",
                 f"{self.error:.1e}", f"{self.ordinary:+.6g}"]
        head = ["zeroed node", "Δ of", "graph predicts", "frozen forward", "rel. error",
                "ordinary forward"]
        return ("<table><tr>" + "".join(f"<th>{h}</th>" for h in head) + "</tr><tr>"
                + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr></table>")


@exact_matmul()
def ablate(model: Any, graph: Any, node: int | str, receiver: int | str | None = None
           ) -> Ablation:
    """Zero ``node``'s output (a bias: the parameter) and compare with the graph's prediction.

    ``receiver=None``: the change in J, predicted ``-total_effect[node]`` (all paths). A
    receiver (a head, neuron, MLP or target of the graph): every other node held at its clean
    output, predicted ``-adjacency[receiver, node]`` (the direct edge).
    """
    a = graph.index_of(node)
    if graph.kinds[a] == "target":
        raise InvalidArgumentError(f"node={node!r} is a target; zero a node that sends edges")
    r = None if receiver is None else graph.index_of(receiver)
    if r is not None and graph.kinds[r] in SOURCES:
        raise InvalidArgumentError(f"receiver={receiver!r} is a source and has no value to change")
    predicted = -float(graph.total_effect[a]) if r is None else -float(graph.adjacency[r, a])
    device = next(model.parameters()).device
    tokens = graph.tokens[None].to(device)
    clean = _Run(model, graph, tokens)
    base = _Run(model, graph, tokens, frozen=clean)
    frozen = _Run(model, graph, tokens, frozen=clean, zero=a, hold=clean if r is not None else None)
    plain = _Run(model, graph, tokens, zero=a, hold=clean if r is not None else None)
    read = (lambda run: run.objective()) if r is None else (lambda run: run.reading(r))
    return Ablation(graph.labels[a], "J" if r is None else graph.labels[r], predicted,
                    read(frozen) - read(base), read(plain) - read(clean))


def _slot(graph: Any, i: int) -> tuple[str, tuple]:
    kind, layer, pos, index = (graph.kinds[i], int(graph.layer[i]), int(graph.pos[i]),
                               int(graph.index[i]))
    if kind in ("embed", "pos_embed"):
        return f"hook_{kind}", (0, pos)
    if kind in ("head", "attn"):
        return f"blocks.{layer}.attn.hook_z", (0, pos, index) if kind == "head" else (0, pos)
    if kind in ("neuron", "mlp"):
        return f"blocks.{layer}.mlp.hook_post", (0, pos, index) if kind == "neuron" else (0, pos)
    return "param", (graph.meta["bias_params"][index],)


class _Run:
    """One no-grad forward pass: records the frozen factors and node outputs, and optionally
    substitutes the factors of ``frozen``, zeroes node ``zero`` and holds every node output at
    ``hold``'s values (except the zeroed node)."""

    def __init__(self, model: Any, graph: Any, tokens: Tensor, *, frozen: _Run | None = None,
                 zero: int | None = None, hold: _Run | None = None):
        self.graph, self.seen, self.act = graph, {}, None
        self._frozen, self._hold = frozen, hold
        self._zero = None if zero is None else _slot(graph, zero)
        hook = graph.target["hook"]
        with contextlib.ExitStack() as stack, HookSet(model) as hs:
            stack.enter_context(torch.no_grad())
            stack.enter_context(warnings.catch_warnings())
            warnings.simplefilter("ignore")  # the Bridge warns when a norm's scale is edited
            self._factor_hooks(model, hs)
            for name in ["hook_embed", "hook_pos_embed"] + [
                    f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers)
                    for h in ("attn.hook_z", "mlp.hook_post")]:
                if name in hook_dict(model):
                    hs.add(name, self._node_hook(name))
            if hook != LOGITS:
                hs.add(hook, self._read, prepend=read_before_cut(model, hook))
            if self._zero is not None and self._zero[0] == "param":
                stack.enter_context(zeroed(dict(model.named_parameters())[self._zero[1][0]]))
            logits = model(tokens, return_type="logits")
        self.T = graph.target_values(logits if hook == LOGITS else self.act)

    def _read(self, t: Tensor, hook: Any = None) -> None:
        self.act = t

    def objective(self) -> float:
        return float((self.graph.target["weights"].to(self.T) * self.T).sum())

    def reading(self, i: int) -> float:
        """The value of node ``i`` in this run (a target, a neuron, or a read-out output)."""
        g, kind = self.graph, self.graph.kinds[i]
        if kind == "target":
            return float(self.T[g.targets.index(i)])
        name, where = _slot(g, i)
        out = self.seen[name][where]
        if kind == "neuron":
            return float(out)
        return float((out * g.readouts[i].to(out)).sum())

    def _node_hook(self, name: str):
        def fn(t: Tensor, hook: Any) -> Tensor | None:
            self.seen[name] = t.detach().clone()
            if self._hold is None and (self._zero is None or self._zero[0] != name):
                return None
            out = self._hold.seen[name].clone() if self._hold is not None else t.clone()
            if self._zero is not None and self._zero[0] == name:
                out[self._zero[1]] = 0
            return out

        return fn

    def _factor_hooks(self, model: Any, hs: HookSet) -> None:
        """Patterns, norm scales, gated-MLP gates: record, or substitute the clean values.
        Plain MLPs: act(pre) becomes g·pre with the clean gate g = act(pre₀)/pre₀."""
        act = str(getattr(model.cfg, "act_fn", "") or "")
        for name in unique_hooks(model):
            leaf = name.rsplit(".", 1)[-1]
            parts = name.split(".")
            layer = int(parts[1]) if len(parts) > 2 and parts[1].isdigit() else None
            if leaf in ("hook_expert_weights", "hook_expert_indices"):
                raise UnsupportedFeatureError(f"{name}: mixture-of-experts ablations are not "
                                              "supported")
            if leaf == "hook_scale" and _native_norm(model, name):
                self._native_norm_hooks(model, hs, name.rsplit(".", 1)[0])
            elif leaf in ("hook_scale", "hook_pattern") or (
                    name.endswith("mlp.hook_pre") and layer is not None and is_gated(model, layer)):
                hs.add(name, self._substitute(name))
            elif name.endswith("mlp.hook_pre"):
                hs.add(name, self._substitute(name, record_only=True))
            elif layer is not None and not is_gated(model, layer) and (
                    name.endswith("mlp.hook_mid") if act.endswith("_ln")
                    else name.endswith("mlp.hook_post")):
                hs.add(name, self._frozen_gate(name, f"blocks.{layer}.mlp.hook_pre"))
        cap = getattr(model.cfg, "output_logits_soft_cap", None)
        if cap and cap > 0:
            hs.add_module_hook(model.unembed, self._grab_z)
            hs.add_module_hook(model, self._frozen_cap)

    def _native_norm_hooks(self, model: Any, hs: HookSet, prefix: str) -> None:
        """A Bridge norm that runs Hugging Face's kernel (which may compute in float32). Detached
        mode edits its ``hook_normalized``, which sends the Bridge down its own path (in the
        model's dtype); every run here edits it too, so its values are the graph's, and frozen
        runs give it the form ``x_c / scale₀`` that detached mode differentiates."""
        rms = bool(getattr(model.get_submodule(prefix), "uses_rms_norm", False))

        def grab_in(x: Tensor, hook: Any) -> None:
            self.seen["norm_in:" + prefix] = x.detach()

        def normalized(n: Tensor, hook: Any) -> Tensor | None:
            if self._frozen is None:  # an edit, as detached mode makes: the same fallback path
                return n.clone()
            x = self.seen["norm_in:" + prefix]
            x = x if x.dtype in (torch.float32, torch.float64) else x.float()
            xc = x if rms else x - x.mean(-1, keepdim=True)
            return (xc / self._frozen.seen["factor:" + prefix + ".hook_scale"]).to(n.dtype)

        hs.add(prefix + ".hook_in", grab_in)
        hs.add(prefix + ".hook_scale", self._substitute(prefix + ".hook_scale", record_only=True))
        hs.add(prefix + ".hook_normalized", normalized)

    def _substitute(self, name: str, record_only: bool = False):
        def fn(t: Tensor, hook: Any) -> Tensor | None:
            self.seen["factor:" + name] = t.detach().clone()
            if self._frozen is None or record_only:
                return None
            return self._frozen.seen["factor:" + name].to(t)

        return fn

    def _frozen_gate(self, name: str, pre_name: str):
        def fn(t: Tensor, hook: Any) -> Tensor | None:
            self.seen["factor:" + name] = t.detach().clone()
            if self._frozen is None:
                return None
            pre0 = self._frozen.seen["factor:" + pre_name]
            if bool((pre0 == 0).any()):
                raise UnsupportedFeatureError(
                    f"{name}: a pre-activation is exactly 0 on this prompt, so the frozen gate "
                    "act(x)/x cannot be read off the clean pass")
            return self._frozen.seen["factor:" + name] / pre0 * self.seen["factor:" + pre_name]

        return fn

    def _grab_z(self, module: Any, args: Any, out: Tensor) -> None:
        self.seen["factor:unembed"] = out.detach().clone()

    def _frozen_cap(self, module: Any, args: Any, out: Any) -> Any:
        if not isinstance(out, Tensor):
            return None
        self.seen["factor:logits"] = out.detach().clone()
        if self._frozen is None:
            return None
        z0, y0 = self._frozen.seen["factor:unembed"], self._frozen.seen["factor:logits"]
        g = torch.where(z0 == 0, torch.ones_like(z0), y0 / torch.where(z0 == 0, 1, z0))
        return g * self.seen["factor:unembed"]


def _native_norm(model: Any, scale_hook: str) -> bool:
    """Does this norm run Hugging Face's own kernel (a Bridge RMSNorm, as detached mode finds)?"""
    norm = model.get_submodule(scale_hook.rsplit(".", 1)[0])
    return bool(getattr(norm, "use_native_layernorm_autograd", False) or getattr(
        getattr(norm, "config", None), "layer_norm_folding", False))
